"""Image-classification datasets from the Hub (or a local copy) as cached uint8 tensors.

[`load_image_classification_dataset`] loads a dataset with `datasets.load_dataset`, decodes every image once with
[`prepare_image`] (the function [`AACEImageProcessor`] uses, so training and inference see the same pixels), checks the
labels, computes the training set's per-channel mean and std, and caches the result on disk as safetensors. Later
calls with the same data and settings read the cache instead of decoding again.

The splits are `torch.utils.data.Dataset`s yielding `{"pixel_values": uint8 (C, H, W), "labels": int64 scalar}`; the
images stay uint8 until [`BatchAugmentation`] turns whole batches into normalised floats on the training device.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import datasets
import torch
from transformers.utils import logging

from ..image_processing_aace import AACEImageProcessor
from .cache import DecodedCache
from .decoding import Preparation, checked_labels, decode_to_cache, default_decode_workers, detect_num_channels
from .encoded import CENTER_CROP_FRACTION, EncodedImageSplit
from .presets import DIGITS_ID, IMAGENET_MEAN, IMAGENET_STD, PRESETS, AugmentationSettings, DatasetPreset, get_preset
from .splits import load_splits, select_columns

logger = logging.get_logger(__name__)


class ImageClassificationSplit(torch.utils.data.Dataset):
    """One split as uint8 tensors, usable directly as the Trainer's dataset.

    Items are `{"pixel_values": uint8 (C, H, W), "labels": int64 scalar}`, views into the split's tensors;
    `default_data_collator` stacks a batch of them with one copy. (A `__getitems__` gathering the batch with one
    `index_select` measured 2-8x slower per batch of 256 on 2 CPU cores: the collator copies the gathered rows again.)

    Args:
        images: `(N, C, H, W)` uint8 tensor.
        labels: `(N,)` int64 tensor.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(
                f"images must be an (N, C, H, W) uint8 tensor, got {images.dtype} of shape {tuple(images.shape)}."
            )
        if labels.dtype != torch.int64 or labels.shape != (images.shape[0],):
            raise ValueError(
                f"labels must be an int64 tensor with one label per image ({images.shape[0]}), got {labels.dtype} of "
                f"shape {tuple(labels.shape)}."
            )
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.images[index], "labels": self.labels[index]}

    def with_labels(self, labels: torch.Tensor) -> ImageClassificationSplit:
        """The same images with other labels (for example noisy ones), as a new split."""
        return ImageClassificationSplit(self.images, labels)

    def for_evaluation(self) -> ImageClassificationSplit:
        """The split to evaluate on: itself (its items are not augmented; the device augments training batches)."""
        return self


@dataclass
class ImageClassificationData:
    """A loaded dataset: uint8 train and test splits plus what training and the saved image processor need.

    Attributes:
        name: the preset's name (whichever alias was passed), or the Hub id or local directory passed to
            [`load_image_classification_dataset`].
        dataset_id: the dataset's Hub id (the preset's id even when loaded from a local copy), or
            "sklearn.datasets.load_digits" for the `digits` preset.
        train: the training split ([`EncodedImageSplit`] with `random_resized_crop`).
        test: the evaluation split (likewise).
        test_split: name of the split used for evaluation ("test" or "validation").
        label_names: class names, indexed by label.
        mean: per-channel mean of the training images in [0, 1] (fixed to ImageNet's for Food101).
        std: per-channel standard deviation (unbiased), same conventions.
        num_channels: 1 (grayscale) or 3 (RGB).
        image_size: `(height, width)` of every image (the crop's with `random_resized_crop`).
        pad_to_square: whether images were padded to a centred square before resizing.
        augmentation: the dataset's default training augmentation (see [`augmentation_for`]).
    """

    name: str
    dataset_id: str
    train: ImageClassificationSplit | EncodedImageSplit
    test: ImageClassificationSplit | EncodedImageSplit
    test_split: str
    label_names: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_channels: int
    image_size: tuple[int, int]
    pad_to_square: bool
    augmentation: AugmentationSettings
    center_crop_fraction: float | None = None

    @property
    def num_labels(self) -> int:
        """Number of classes."""
        return len(self.label_names)

    @property
    def id2label(self) -> dict[int, str]:
        """Label index to class name, as model configs store it."""
        return dict(enumerate(self.label_names))

    @property
    def label2id(self) -> dict[str, int]:
        """Class name to label index."""
        return {name: index for index, name in enumerate(self.label_names)}

    def image_processor(self) -> AACEImageProcessor:
        """Returns the [`AACEImageProcessor`] reproducing this dataset's evaluation preprocessing."""
        height, width = self.image_size
        return AACEImageProcessor(
            size={"height": height, "width": width},
            image_mean=list(self.mean),
            image_std=list(self.std),
            num_channels=self.num_channels,
            do_pad_to_square=self.pad_to_square,
            center_crop_fraction=self.center_crop_fraction,
        )


def load_image_classification_dataset(
    name: str,
    *,
    source: str | None = None,
    revision: str | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    coarse_labels: bool = False,
    image_size: int | tuple[int, int] | None = None,
    pad_to_square: bool | None = None,
    num_channels: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    show_progress: bool = True,
    decode_workers: int | None = None,
    random_resized_crop: int | None = None,
    seed: int = 0,
) -> ImageClassificationData:
    """Loads an image-classification dataset as cached uint8 tensors, or as encoded images cropped per item.

    `name` is one of the presets (`hf_aace.data.presets.PRESETS`, also by an alias such as "fashionmnist", in any
    case), a Hub dataset id, or a local directory in the Hub layout (anything `datasets.load_dataset` accepts). The
    presets follow the paper:

    | preset | Hub id | columns | test split | preparation |
    |---|---|---|---|---|
    | `cifar10` | uoft-cs/cifar10 | img / label | test | 32x32 RGB |
    | `cifar100` | uoft-cs/cifar100 | img / fine_label (coarse_label with `coarse_labels=True`) | test | 32x32 RGB |
    | `fashion_mnist` | zalando-datasets/fashion_mnist | image / label | test | 28x28, 1 channel |
    | `food101` | ethz/food101 | image / label | validation | pad to square, resize to 32; ImageNet mean/std |
    | `digits` | scikit-learn's bundled 8x8 digits (no network) | image / label | test | 8x8, 1 channel |

    Each preset carries the paper's augmentation in `augmentation` (pixel sizes, whatever `image_size`): CIFAR crop
    with padding 4, flip and Cutout 16; Fashion-MNIST Cutout 16; Food101 flip and Cutout 16; digits crop with padding
    1 and Cutout 4. Other datasets get the CIFAR recipe scaled to the shorter image side (padding side / 8, Cutout
    side / 2) with flip. All Cutouts have p = 0.5. [`augmentation_for`] builds the augmentation from these.

    `digits` is `sklearn.datasets.load_digits()` scaled to uint8 and split 80/20, stratified and fixed (1,437 train,
    360 test images; see `hf_aace.data.digits`).

    Other datasets: the image column is the single `Image` column and the label column the single `ClassLabel` column
    unless `image_column` / `label_column` name them (an integer label column without class names gets the names
    "0".."max label"). The test split is `test`, else `validation`. The number of channels follows the dataset's
    `Image(mode=...)` or, without one, the majority of the first training images' modes (grayscale modes give 1,
    others 3); images of another mode are converted. Without `image_size` every image must have the size of the
    first one: images of varying size need `image_size` (with `pad_to_square=True` to keep their aspect ratio).

    Mean and std are computed over the training split in float64 (unbiased std, as `torch.std` in the reference
    code), except for Food101 whose statistics the paper fixes to ImageNet's.

    The decoded tensors, labels and statistics are cached under `cache_dir` (default `$HF_HOME/hf_aace`) in a file
    keyed by the source, revision, the `datasets` fingerprints of both splits, the columns and the preparation
    settings; a later call with the same key reads it instead of decoding. The first decode shows a progress bar per
    split, which `show_progress=False` or `transformers.utils.logging.disable_progress_bar()` turn off.

    The first decode runs in `decode_workers` processes (datasets under 256 MiB of decoded pixels per worker decode in
    this process): each decodes a contiguous range of rows straight into the cache file, so memory stays flat whatever
    the dataset's size and the cache may be larger than RAM. The cached tensors are memory-mapped from the file, not
    read into memory. The result is the same, bit for bit, with any number of workers.

    With `random_resized_crop=size` nothing is decoded or cached: both splits are [`EncodedImageSplit`]s that keep the
    stored (encoded) images and decode each item where the DataLoader asks for it (in the Trainer's
    `dataloader_num_workers` processes), training items with RandomResizedCrop(size, scale=(0.08, 1), ratio=(3/4, 4/3))
    and a random horizontal flip, evaluation items with the ImageNet-style centre crop; the training augmentation
    ([`augmentation_for`]) then only normalises. Computing statistics would take a decode pass, so the normalisation
    uses the preset's fixed statistics, else ImageNet's for RGB images; grayscale datasets without fixed statistics
    are refused (load them with `num_channels=3`). `image_size` and `pad_to_square` do not apply. The saved image
    processor (`image_processor()`) takes the same centre crop (`center_crop_fraction`), so inference on raw images
    sees what this evaluation saw.

    Args:
        name: a preset name or alias, a Hub dataset id ("owner/name") or a local directory.
        source: for a preset, where to load its files from instead of its Hub id: a local directory in the Hub layout
            (parquet files and a README.md with the same columns, e.g. a downloaded snapshot) or a mirror's Hub id.
        revision: the Hub revision (branch, tag or commit) to load.
        image_column: the image column of a non-preset dataset.
        label_column: the label column of a non-preset dataset.
        coarse_labels: `cifar100` only: train on the 20 superclasses (`coarse_label`) instead of the 100 classes.
        image_size: resize every image to this `(height, width)` (or `size` x `size`) with bilinear filtering. Presets
            default to their native size (Food101: 32).
        pad_to_square: pad images to a centred square with zeros before resizing. Default: True for Food101, False
            otherwise.
        num_channels: 1 or 3, to override the detected (or preset) number of channels.
        cache_dir: directory of the decoded-tensor cache.
        show_progress: show progress bars while decoding (pass False on all but the main process).
        decode_workers: the most processes decoding the images on a first load; 1 decodes in this process, in
            memory. Default: the cores this process may use, at most 8.
        random_resized_crop: side of the square crops of encoded images decoded per item (see above); None: the
            decoded cache.
        seed: seed of the crop and flip draws of `random_resized_crop` (scripts/train.py passes `--seed`).

    Returns:
        The loaded [`ImageClassificationData`].

    Example:
    ```python
    >>> from hf_aace.data import load_image_classification_dataset
    >>> data = load_image_classification_dataset("digits")
    >>> data.train.images.shape, data.train.images.dtype, data.label_names[:3]
    (torch.Size([1437, 1, 8, 8]), torch.uint8, ['0', '1', '2'])
    ```
    """
    preset = _checked_preset(name, source, revision, (image_column, label_column), coarse_labels)
    if decode_workers is None:
        decode_workers = default_decode_workers()
    elif isinstance(decode_workers, bool) or not isinstance(decode_workers, int) or decode_workers < 1:
        raise ValueError(
            "decode_workers must be a positive number of processes (1: decode in this process), got "
            f"{decode_workers!r}."
        )
    if random_resized_crop is not None and (image_size is not None or pad_to_square):
        raise ValueError(
            "random_resized_crop crops the stored images directly, so image_size and pad_to_square do not apply: "
            "drop them (scripts/train.py: --image_size, --pad_to_square), or drop random_resized_crop."
        )
    dataset_id = preset.hub_id if preset else name
    location = source or dataset_id
    preparation = _preparation(preset, image_size, pad_to_square, num_channels)
    train, test, test_split = load_splits(location, revision, preset.test_split if preset else None)
    if preset is not None:
        image_column = preset.image_column
        label_column = preset.coarse_label_column if coarse_labels else preset.label_column
    columns = select_columns(train, test, test_split, location, (image_column, label_column), preset is not None)
    if random_resized_crop is not None:
        return _encoded_data(
            preset.name if preset else name,
            dataset_id,
            (train, test, test_split),
            columns,
            preparation,
            random_resized_crop,
            seed,
        )
    cache = DecodedCache.locate(
        cache_dir,
        dataset_id,
        source=os.path.abspath(location) if os.path.isdir(location) else location,
        revision=revision,
        # The fingerprints identify the data files datasets prepared (their content for in-memory datasets).
        fingerprints=[train._fingerprint, test._fingerprint],
        test_split=test_split,
        columns=columns,
        image_size=preparation.size,
        pad_to_square=preparation.pad_to_square,
        num_channels=preparation.num_channels,
        statistics=[preparation.mean, preparation.std] if preset else None,
    )
    decode = functools.partial(
        decode_to_cache, train, test, test_split, columns, preparation, cache, decode_workers, show_progress
    )
    tensors, label_names = _read_or_decode(cache, dataset_id, decode)

    images = tensors["train_images"]
    return ImageClassificationData(
        name=preset.name if preset else name,
        dataset_id=dataset_id,
        train=ImageClassificationSplit(images, tensors["train_labels"]),
        test=ImageClassificationSplit(tensors["test_images"], tensors["test_labels"]),
        test_split=test_split,
        label_names=label_names,
        mean=tuple(tensors["mean"].tolist()),
        std=tuple(tensors["std"].tolist()),
        num_channels=images.shape[1],
        image_size=(images.shape[2], images.shape[3]),
        pad_to_square=preparation.pad_to_square,
        augmentation=preset.augmentation if preset else AugmentationSettings.scaled_to(images.shape[2:]),
    )


def _encoded_data(
    name: str,
    dataset_id: str,
    splits: tuple[datasets.Dataset, datasets.Dataset, str],
    columns: tuple[str, str],
    preparation: Preparation,
    size: int,
    seed: int,
) -> ImageClassificationData:
    """Both splits as [`EncodedImageSplit`]s, normalised with fixed statistics (no pass over the pixels)."""
    train, test, test_split = splits
    image_column, label_column = columns
    train_labels, test_labels, label_names = checked_labels(train, test, test_split, label_column)
    num_channels = preparation.num_channels or detect_num_channels(train, image_column)
    mean, std = preparation.mean, preparation.std
    if mean is None and num_channels == 3:
        mean, std = IMAGENET_MEAN, IMAGENET_STD
        logger.info(f"{name}: random_resized_crop normalises with ImageNet's mean {mean} and std {std}.")
    elif mean is None:
        raise ValueError(
            f"{name} is grayscale and has no fixed statistics; random_resized_crop normalises with fixed statistics "
            "(computing them would decode every image) and only ImageNet's RGB ones are known. Load it with "
            "num_channels=3 (converted to RGB), or without random_resized_crop."
        )
    encoded = {
        split: EncodedImageSplit(
            dataset,
            image_column,
            torch.from_numpy(labels),
            num_channels,
            size,
            train=split == "train",
            seed=seed,
            split=split,
        )
        for split, dataset, labels in (("train", train, train_labels), (test_split, test, test_labels))
    }
    return ImageClassificationData(
        name=name,
        dataset_id=dataset_id,
        train=encoded["train"],
        test=encoded[test_split],
        test_split=test_split,
        label_names=label_names,
        mean=tuple(mean),
        std=tuple(std),
        num_channels=num_channels,
        image_size=(size, size),
        pad_to_square=False,
        # The crop and flip happen in the DataLoader; the device only normalises.
        augmentation=AugmentationSettings(),
        center_crop_fraction=CENTER_CROP_FRACTION,
    )


def _checked_preset(
    name: str,
    source: str | None,
    revision: str | None,
    columns: tuple[str | None, str | None],
    coarse_labels: bool,
) -> DatasetPreset | None:
    """The preset `name` refers to (None for other datasets), refusing arguments that do not apply to it."""
    preset = get_preset(name)
    with_superclasses = ", ".join(repr(p.name) for p in PRESETS.values() if p.coarse_label_column is not None)
    if preset is None:
        if coarse_labels:
            raise ValueError(
                f"coarse_labels=True only applies to the presets with superclasses ({with_superclasses}); for "
                f"{name!r} pass label_column instead."
            )
        if source is not None:
            raise ValueError(
                f"source only redirects a preset ({', '.join(PRESETS)}); {name!r} is not one: pass the local "
                "directory or Hub id as the name."
            )
        if "/" not in name and not os.path.isdir(name):
            raise ValueError(
                f"Unknown dataset {name!r}: pass a preset ({', '.join(PRESETS)}), a Hub dataset id ('owner/name') or "
                "a local directory in the Hub layout."
            )
        return None
    if columns != (None, None):
        raise ValueError(
            f"The {preset.name!r} preset fixes its columns; drop image_column/label_column (use coarse_labels=True "
            f"for the superclasses of {with_superclasses}), or load {preset.hub_id!r} as a plain Hub dataset."
        )
    if coarse_labels and preset.coarse_label_column is None:
        raise ValueError(
            f"coarse_labels=True only applies to the presets with superclasses ({with_superclasses}), not {name!r}."
        )
    if preset.hub_id == DIGITS_ID and (source is not None or revision is not None):
        raise ValueError(f"The {preset.name!r} preset is built from scikit-learn: drop source and revision.")
    return preset


def _preparation(
    preset: DatasetPreset | None,
    image_size: int | tuple[int, int] | None,
    pad_to_square: bool | None,
    num_channels: int | None,
) -> Preparation:
    """The requested preparation, with the preset's settings (or the generic defaults) where none is given."""
    if num_channels is not None and num_channels not in (1, 3):
        raise ValueError(f"num_channels must be 1 (grayscale) or 3 (RGB), got {num_channels}.")
    size = _as_size(image_size) if image_size is not None else None
    if preset is None:
        return Preparation(size, bool(pad_to_square), num_channels)
    return Preparation(
        size=size or preset.image_size,
        pad_to_square=preset.pad_to_square if pad_to_square is None else pad_to_square,
        num_channels=preset.num_channels if num_channels is None else num_channels,
        mean=preset.mean,
        std=preset.std,
    )


def _as_size(image_size: int | tuple[int, int]) -> tuple[int, int]:
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(size) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size):
        raise ValueError(f"image_size must be a positive int or a (height, width) pair of them, got {image_size!r}.")
    return size


def _read_or_decode(
    cache: DecodedCache, dataset_id: str, decode: Callable[[], tuple[dict[str, torch.Tensor], list[str]]]
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The cached tensors and class names, or those of `decode()`, which writes them to the cache."""
    cached = cache.read()
    if cached is not None:
        logger.info(f"Read the decoded {dataset_id} from {cache.path}")
        return cached
    logger.info(f"Decoding {dataset_id}; it will be cached in {cache.path}")
    start = time.perf_counter()
    tensors, label_names = decode()
    logger.info(f"Decoded {dataset_id} in {time.perf_counter() - start:.1f} s and cached it in {cache.path}")
    return tensors, label_names
