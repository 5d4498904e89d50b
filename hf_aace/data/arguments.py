"""The command-line arguments choosing a dataset, shared by the training and evaluation scripts."""

from __future__ import annotations

from dataclasses import dataclass, field

from .loading import ImageClassificationData, load_image_classification_dataset
from .presets import DIGITS_ID, PRESETS


def _dataset_help() -> str:
    presets = []
    for preset in PRESETS.values():
        origin = "scikit-learn's 8x8 digits, offline" if preset.hub_id == DIGITS_ID else preset.hub_id
        aliases = f"; also {', '.join(preset.aliases)}" if preset.aliases else ""
        presets.append(f"{preset.name} ({origin}{aliases})")
    return f"A preset: {', '.join(presets)}; or a Hub dataset id or a local directory in the Hub layout."


@dataclass
class DatasetArguments:
    """Which dataset to load and from where, as `transformers.HfArgumentParser` reads it from the command line.

    Subclass it to add a script's own data options; [`~DatasetArguments.load`] loads the chosen dataset.

    Attributes:
        dataset: a preset name or alias, a Hub dataset id or a local directory.
        dataset_source: where to load a preset's files from instead of its Hub id.
        image_column: the image column of a non-preset dataset.
        label_column: the label column of a non-preset dataset.
        coarse_labels: use CIFAR-100's 20 superclasses as labels.
        cache_dir: directory of the decoded-dataset cache (default `$HF_HOME/hf_aace`).
        decode_workers: processes decoding the images on a first load (default: the usable cores, at most 8).
        random_resized_crop: keep the encoded images and decode them in the DataLoader workers with a
            RandomResizedCrop of this size (see [`load_image_classification_dataset`]); None: the decoded cache.
    """

    dataset: str = field(default="digits", metadata={"help": _dataset_help()})
    dataset_source: str | None = field(
        default=None, metadata={"help": "Load a preset's files from this local directory or Hub id instead."}
    )
    image_column: str | None = field(default=None, metadata={"help": "Image column of a non-preset dataset."})
    label_column: str | None = field(default=None, metadata={"help": "Label column of a non-preset dataset."})
    coarse_labels: bool = field(default=False, metadata={"help": "CIFAR-100: train on the 20 superclasses."})
    cache_dir: str | None = field(default=None, metadata={"help": "Cache of decoded datasets."})
    decode_workers: int | None = field(
        default=None,
        metadata={
            "help": "Processes decoding the images on a first load, straight into the cache file (1: in this "
            "process, in memory). Default: the usable cores, at most 8."
        },
    )
    random_resized_crop: int | None = field(
        default=None,
        metadata={
            "help": "Keep the encoded images (no decoded cache) and decode them in the DataLoader workers "
            "(--dataloader_num_workers): training crops are RandomResizedCrop to this size (scale 0.08-1, ratio "
            "3/4-4/3) plus flips, evaluation crops the centre after resizing the shorter side to size / 0.875. "
            "Normalised with the preset's fixed statistics, else ImageNet's."
        },
    )

    def load(
        self,
        *,
        image_size: int | tuple[int, int] | None = None,
        pad_to_square: bool | None = None,
        num_channels: int | None = None,
        show_progress: bool = True,
        seed: int = 0,
    ) -> ImageClassificationData:
        """Loads the chosen dataset with [`load_image_classification_dataset`].

        Args:
            image_size: resize every image to this `(height, width)` (or `size` x `size`); None: the preset's or
                stored size.
            pad_to_square: pad images to a centred square before resizing; None: the preset's choice.
            num_channels: 1 or 3; None: the preset's or detected number of channels.
            show_progress: show progress bars while decoding (pass False on all but the main process).
            seed: seed of the crops and flips of `random_resized_crop`.

        Returns:
            The loaded [`ImageClassificationData`].
        """
        return load_image_classification_dataset(
            self.dataset,
            source=self.dataset_source,
            image_column=self.image_column,
            label_column=self.label_column,
            coarse_labels=self.coarse_labels,
            image_size=image_size,
            pad_to_square=pad_to_square,
            num_channels=num_channels,
            cache_dir=self.cache_dir,
            show_progress=show_progress,
            decode_workers=self.decode_workers,
            random_resized_crop=self.random_resized_crop,
            seed=seed,
        )
