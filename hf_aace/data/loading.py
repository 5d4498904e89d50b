"""Image-classification datasets from the Hub (or a local copy) as cached uint8 tensors.

[`load_image_classification_dataset`] loads a dataset with `datasets.load_dataset`, decodes every image once with
[`prepare_image`] (the function [`AACEImageProcessor`] uses, so training and inference see the same pixels), checks the
labels, computes the training set's per-channel mean and std, and caches the result on disk as safetensors. Later
calls with the same data and settings read the cache instead of decoding again.

The splits are `torch.utils.data.Dataset`s yielding `{"pixel_values": uint8 (C, H, W), "labels": int64 scalar}`; the
images stay uint8 until [`BatchAugmentation`] turns whole batches into normalised floats on the training device.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import PIL.ExifTags
import PIL.Image
import PIL.ImageOps
import torch
from huggingface_hub import constants as hub_constants
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from transformers.utils import logging

from ..image_processing_aace import AACEImageProcessor, prepare_image

logger = logging.get_logger(__name__)

# Bump when the decoded tensors or the statistics would change for the same inputs; old cache files are then ignored.
_CACHE_FORMAT = 1
_GRAYSCALE_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
_MODE_SAMPLE = 64
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, PIL.Image.DecompressionBombError)
_DIGITS_ID = "sklearn.datasets.load_digits"


@dataclass(frozen=True)
class _Preset:
    """How the paper's datasets are laid out on the Hub and prepared."""

    hub_id: str
    image_column: str
    label_column: str
    test_split: str
    num_channels: int
    image_size: tuple[int, int]
    augmentation: dict[str, Any]
    pad_to_square: bool = False
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    coarse_label_column: str | None = None


_CIFAR_AUGMENTATION = {"crop_padding": 4, "flip": True, "cutout_size": 16, "cutout_p": 0.5}

PRESETS: dict[str, _Preset] = {
    "cifar10": _Preset("uoft-cs/cifar10", "img", "label", "test", 3, (32, 32), _CIFAR_AUGMENTATION),
    "cifar100": _Preset(
        "uoft-cs/cifar100",
        "img",
        "fine_label",
        "test",
        3,
        (32, 32),
        _CIFAR_AUGMENTATION,
        coarse_label_column="coarse_label",
    ),
    "fashion_mnist": _Preset(
        "zalando-datasets/fashion_mnist",
        "image",
        "label",
        "test",
        1,
        (28, 28),
        {"crop_padding": None, "flip": False, "cutout_size": 16, "cutout_p": 0.5},
    ),
    "food101": _Preset(
        "ethz/food101",
        "image",
        "label",
        "validation",
        3,
        (32, 32),
        {"crop_padding": None, "flip": True, "cutout_size": 16, "cutout_p": 0.5},
        pad_to_square=True,
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
    ),
    "digits": _Preset(
        _DIGITS_ID,
        "image",
        "label",
        "test",
        1,
        (8, 8),
        {"crop_padding": 1, "flip": False, "cutout_size": 4, "cutout_p": 0.5},
    ),
}


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


@dataclass
class ImageClassificationData:
    """A loaded dataset: uint8 train and test splits plus what training and the saved image processor need.

    Attributes:
        name: the name passed to [`load_image_classification_dataset`] (a preset, Hub id or local directory).
        dataset_id: the dataset's Hub id (the preset's id even when loaded from a local copy), or
            "sklearn.datasets.load_digits" for the `digits` preset.
        source: what was actually loaded: a Hub id or a local directory.
        train: the training split.
        test: the evaluation split.
        test_split: name of the split used for evaluation ("test" or "validation").
        label_names: class names, indexed by label.
        mean: per-channel mean of the training images in [0, 1] (fixed to ImageNet's for Food101).
        std: per-channel standard deviation (unbiased), same conventions.
        num_channels: 1 (grayscale) or 3 (RGB).
        image_size: `(height, width)` of every image.
        pad_to_square: whether images were padded to a centred square before resizing.
        image_column: the column the images came from.
        label_column: the column the labels came from.
        augmentation: default settings of [`BatchAugmentation`] for this dataset (see [`augmentation_for`]).
    """

    name: str
    dataset_id: str
    source: str
    train: ImageClassificationSplit
    test: ImageClassificationSplit
    test_split: str
    label_names: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_channels: int
    image_size: tuple[int, int]
    pad_to_square: bool
    image_column: str
    label_column: str
    augmentation: dict[str, Any] = field(default_factory=dict)

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
) -> ImageClassificationData:
    """Loads an image-classification dataset as cached uint8 tensors.

    `name` is one of the presets, a Hub dataset id, or a local directory in the Hub layout (anything
    `datasets.load_dataset` accepts). The presets follow the paper:

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

    `digits` turns `sklearn.datasets.load_digits()` (1,797 images with values 0..16) into a `datasets.Dataset` with an
    `Image` and a `ClassLabel` ("0".."9") column, scaling pixels to uint8 as `(v * 255 + 8) // 16` (0 -> 0, 16 ->
    255, rounding halves up). Its split is stratified and fixed: `sklearn.model_selection.train_test_split(indices,
    test_size=0.2, stratify=target, random_state=0)`, each part kept in the original order (1,437 train, 360 test).

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
    settings; a later call with the same key reads it instead of decoding.

    Args:
        name: a preset name, a Hub dataset id ("owner/name") or a local directory.
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
    preset = _resolve_preset(name, source, revision, image_column, label_column, coarse_labels)
    size = _as_size(image_size) if image_size is not None else (preset.image_size if preset else None)
    if pad_to_square is None:
        pad_to_square = preset.pad_to_square if preset else False
    if num_channels is not None and num_channels not in (1, 3):
        raise ValueError(f"num_channels must be 1 (grayscale) or 3 (RGB), got {num_channels}.")
    if num_channels is None and preset is not None:
        num_channels = preset.num_channels

    if name == "digits":
        source, dataset_id, splits = _DIGITS_ID, _DIGITS_ID, _digits_dataset_dict()
    else:
        dataset_id = preset.hub_id if preset else name
        source = source or dataset_id
        splits = _load_splits(source, revision)
    if not isinstance(splits, datasets.DatasetDict):
        raise ValueError(f"{source!r} loaded as {type(splits).__name__}; expected a dataset with named splits.")
    test_split = preset.test_split if preset else _find_test_split(splits, source)
    for split in ("train", test_split):
        if split not in splits:
            raise ValueError(f"{source!r} has no {split!r} split (splits: {sorted(splits)}).")
    train, test = splits["train"], splits[test_split]

    if preset is not None:
        image_column = preset.image_column
        label_column = preset.coarse_label_column if coarse_labels else preset.label_column
    image_column, label_column = _find_columns(train.features, image_column, label_column, preset is not None)
    for split, dataset in (("train", train), (test_split, test)):
        if dataset.num_rows == 0:
            raise ValueError(f"The {split!r} split of {source!r} is empty.")
        if dataset.features.get(image_column) != train.features[image_column] or label_column not in dataset.features:
            raise ValueError(
                f"The {split!r} split of {source!r} lacks the columns {image_column!r} / {label_column!r} of the "
                f"train split (its columns: {list(dataset.features)})."
            )

    key = {
        "format": _CACHE_FORMAT,
        "source": os.path.abspath(source) if os.path.isdir(source) else source,
        "revision": revision,
        # The fingerprints identify the data files datasets prepared (their content for in-memory datasets).
        "fingerprints": [train._fingerprint, test._fingerprint],
        "test_split": test_split,
        "columns": [image_column, label_column],
        "image_size": size,
        "pad_to_square": pad_to_square,
        "num_channels": num_channels,
        "statistics": [preset.mean, preset.std] if preset else None,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    cache_root = Path(cache_dir) if cache_dir is not None else Path(hub_constants.HF_HOME) / "hf_aace"
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in dataset_id)[-60:]
    cache_file = cache_root / f"{stem}-{digest}.safetensors"

    tensors = None
    if cache_file.exists():
        logger.info(f"Loading decoded {dataset_id} from {cache_file}")
        try:
            tensors, label_names = _read_cache(cache_file)
        except (SafetensorError, OSError, ValueError, KeyError) as error:
            # A run killed while writing, a full disk or a bad copy: decoding again replaces the file.
            logger.warning(f"The decoded-dataset cache {cache_file} is unreadable ({error}); decoding again.")
    if tensors is None:
        start = time.perf_counter()
        tensors, label_names = _prepare_tensors(
            train, test, test_split, image_column, label_column, size, pad_to_square, num_channels
        )
        if preset is not None and preset.mean is not None:
            tensors["mean"] = torch.tensor(preset.mean, dtype=torch.float64)
            tensors["std"] = torch.tensor(preset.std, dtype=torch.float64)
        logger.info(f"Decoded {dataset_id} in {time.perf_counter() - start:.1f} s; caching it in {cache_file}")
        _write_cache(cache_file, tensors, label_names, key)

    images = tensors["train_images"]
    return ImageClassificationData(
        name=name,
        dataset_id=dataset_id,
        source=source,
        train=ImageClassificationSplit(images, tensors["train_labels"]),
        test=ImageClassificationSplit(tensors["test_images"], tensors["test_labels"]),
        test_split=test_split,
        label_names=label_names,
        mean=tuple(tensors["mean"].tolist()),
        std=tuple(tensors["std"].tolist()),
        num_channels=images.shape[1],
        image_size=(images.shape[2], images.shape[3]),
        pad_to_square=pad_to_square,
        image_column=image_column,
        label_column=label_column,
        augmentation=dict(preset.augmentation) if preset else _generic_augmentation(images.shape[2:]),
    )


def _load_splits(source: str, revision: str | None) -> datasets.DatasetDict:
    try:
        return datasets.load_dataset(source, revision=revision)
    except ValueError as error:
        # datasets reports an empty split without naming the dataset.
        empty = re.search(r'Instruction "([^"]+)" corresponds to no data', str(error))
        if empty is None:
            raise
        raise ValueError(
            f"The {empty.group(1)!r} split of {source!r} is empty: add its rows or remove the split from the dataset."
        ) from error


def _resolve_preset(
    name: str,
    source: str | None,
    revision: str | None,
    image_column: str | None,
    label_column: str | None,
    coarse_labels: bool,
) -> _Preset | None:
    if name in PRESETS:
        if image_column is not None or label_column is not None:
            raise ValueError(
                f"The {name!r} preset fixes its columns; drop image_column/label_column (use coarse_labels=True for "
                f"CIFAR-100's superclasses), or load {PRESETS[name].hub_id!r} as a plain Hub dataset."
            )
        if coarse_labels and PRESETS[name].coarse_label_column is None:
            raise ValueError(f"coarse_labels=True only applies to the 'cifar100' preset, not {name!r}.")
        if name == "digits" and (source is not None or revision is not None):
            raise ValueError("The 'digits' preset is built from scikit-learn: drop source and revision.")
        return PRESETS[name]
    if coarse_labels:
        raise ValueError(
            f"coarse_labels=True only applies to the 'cifar100' preset; for {name!r} pass label_column instead."
        )
    if source is not None:
        raise ValueError(
            f"source only redirects a preset ({', '.join(PRESETS)}); {name!r} is not one: pass the local directory "
            "or Hub id as the name."
        )
    if "/" not in name and not os.path.isdir(name):
        raise ValueError(
            f"Unknown dataset {name!r}: pass a preset ({', '.join(PRESETS)}), a Hub dataset id ('owner/name') or a "
            "local directory in the Hub layout."
        )
    return None


def _as_size(image_size: int | tuple[int, int]) -> tuple[int, int]:
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(size) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size):
        raise ValueError(f"image_size must be a positive int or a (height, width) pair of them, got {image_size!r}.")
    return size


def _find_test_split(splits: datasets.DatasetDict, source: str) -> str:
    for split in ("test", "validation"):
        if split in splits:
            return split
    raise ValueError(
        f"{source!r} has no 'test' or 'validation' split (splits: {sorted(splits)}); create one, e.g. with "
        "`dataset['train'].train_test_split(...)` saved in the Hub layout, and load that directory."
    )


def _find_columns(
    features: datasets.Features, image_column: str | None, label_column: str | None, is_preset: bool
) -> tuple[str, str]:
    """Picks the image and label columns, checking their feature types."""
    columns = {name: type(feature).__name__ for name, feature in features.items()}
    candidates = {
        "image_column": [name for name, feature in features.items() if isinstance(feature, datasets.Image)],
        "label_column": [name for name, feature in features.items() if isinstance(feature, datasets.ClassLabel)],
    }
    chosen = {"image_column": image_column, "label_column": label_column}
    for argument, column in chosen.items():
        kind = "Image" if argument == "image_column" else "ClassLabel"
        if column is not None:
            if column not in features:
                fix = (
                    "the preset expects its Hub layout; pass the directory or id as `name` instead to detect columns"
                    if is_preset
                    else f"pass {argument}= one of them"
                )
                raise ValueError(f"Column {column!r} not found; the columns are {columns}: {fix}.")
            continue
        found = candidates[argument]
        if len(found) != 1:
            problem = "no" if not found else f"{len(found)} ({found})"
            raise ValueError(
                f"Found {problem} {kind} columns, so the {argument.split('_')[0]} column is ambiguous; the columns "
                f"are {columns}: pass {argument}= naming the one to use."
            )
        chosen[argument] = found[0]
    image_column, label_column = chosen["image_column"], chosen["label_column"]
    if not isinstance(features[image_column], datasets.Image):
        raise ValueError(
            f"Column {image_column!r} is {features[image_column]!r}, not an Image column; columns: {columns}."
        )
    label = features[label_column]
    if not (
        isinstance(label, datasets.ClassLabel)
        or (isinstance(label, datasets.Value) and label.dtype.startswith(("int", "uint")))
    ):
        raise ValueError(
            f"Column {label_column!r} is {label!r}; labels must be a ClassLabel or integer column. Columns: {columns}."
        )
    return image_column, label_column


def _prepare_tensors(
    train: datasets.Dataset,
    test: datasets.Dataset,
    test_split: str,
    image_column: str,
    label_column: str,
    size: tuple[int, int] | None,
    pad_to_square: bool,
    num_channels: int | None,
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Decodes both splits, checks their labels and computes the training statistics."""
    train_labels = _read_labels(train, label_column)
    test_labels = _read_labels(test, label_column)
    feature = train.features[label_column]
    if isinstance(feature, datasets.ClassLabel):
        label_names = list(feature.names)
    else:
        label_names = _integer_label_names(train_labels, test_labels, test_split, label_column)
    for split, labels in (("train", train_labels), (test_split, test_labels)):
        invalid = ((labels < 0) | (labels >= len(label_names))).nonzero()[0]
        if len(invalid):
            row = int(invalid[0])
            raise ValueError(
                f"Label {int(labels[row])} in split {split!r}, row {row} (column {label_column!r}) is outside the "
                f"{len(label_names)} classes 0..{len(label_names) - 1} ({len(invalid)} such rows); fix or drop them "
                "(unlabelled test sets cannot be used for evaluation)."
            )
    if num_channels is None:
        num_channels = _detect_num_channels(train, image_column)
    train_images = _decode_images(train, image_column, "train", num_channels, size, pad_to_square)
    test_images = _decode_images(test, image_column, test_split, num_channels, size, pad_to_square)
    if train_images.shape[2:] != test_images.shape[2:]:
        raise ValueError(
            f"The train images are {tuple(train_images.shape[2:])} but the {test_split!r} images are "
            f"{tuple(test_images.shape[2:])}; pass image_size=(height, width) to resize both."
        )
    mean, std = _channel_statistics(train_images)
    tensors = {
        "train_images": train_images,
        "train_labels": torch.from_numpy(train_labels),
        "test_images": test_images,
        "test_labels": torch.from_numpy(test_labels),
        "mean": mean,
        "std": std,
    }
    return tensors, label_names


def _integer_label_names(
    train_labels: np.ndarray, test_labels: np.ndarray, test_split: str, label_column: str
) -> list[str]:
    """Names "0".."max label" for an integer label column, refusing a range that most classes leave empty."""
    present = np.unique(np.concatenate([train_labels, test_labels]))
    present = present[present >= 0]  # negative labels are reported with the other out-of-range ones
    num_classes = int(present[-1]) + 1 if len(present) else 0
    # More classes without a single example than with one: a stray label, not a class list.
    if num_classes - len(present) > len(present):
        split, labels = ("train", train_labels) if train_labels.max() == present[-1] else (test_split, test_labels)
        raise ValueError(
            f"Column {label_column!r} holds integer labels up to {num_classes - 1}, but only {len(present)} of those "
            f"{num_classes} classes occur: a model would get {num_classes} outputs. The largest label is in split "
            f"{split!r}, row {int(labels.argmax())}; fix or drop such rows, or cast the column to a ClassLabel naming "
            "the classes."
        )
    return [str(i) for i in range(num_classes)]


def _raw_images(dataset: datasets.Dataset, column: str):
    """Yields the stored `(bytes, path)` of every image in order, without decoding."""
    raw = dataset.select_columns([column]).cast_column(column, datasets.Image(decode=False)).with_format("arrow")
    for batch in raw.iter(batch_size=1024):
        images = batch.column(column).combine_chunks()
        yield from zip(images.field("bytes").to_pylist(), images.field("path").to_pylist())


def _open_image(data: bytes | None, path: str | None) -> PIL.Image.Image:
    """Decodes one stored image exactly as `datasets.Image().decode_example` does, EXIF orientation included."""
    if data is None:
        # Images stored as paths (local or remote) only: let datasets resolve and open them.
        return datasets.Image().decode_example({"bytes": None, "path": path})
    image = PIL.Image.open(io.BytesIO(data))
    image.load()
    if image.getexif().get(PIL.ExifTags.Base.Orientation) is not None:
        image = PIL.ImageOps.exif_transpose(image)
    return image


def _detect_num_channels(dataset: datasets.Dataset, column: str) -> int:
    """1 if the dataset declares a grayscale mode or most of its first images are grayscale, else 3."""
    mode = dataset.features[column].mode
    if mode is None:
        modes = []
        for row, (data, path) in enumerate(
            _raw_images(dataset.select(range(min(_MODE_SAMPLE, len(dataset)))), column)
        ):
            try:
                with _open_image(data, path) as image:
                    modes.append(image.mode)
            except _DECODE_ERRORS as error:
                raise ValueError(f"Could not read the image in split 'train', row {row}: {error}") from error
        grayscale = sum(m in _GRAYSCALE_MODES for m in modes)
        return 1 if grayscale > len(modes) - grayscale else 3
    return 1 if mode in _GRAYSCALE_MODES else 3


def _decode_images(
    dataset: datasets.Dataset,
    column: str,
    split: str,
    num_channels: int,
    size: tuple[int, int] | None,
    pad_to_square: bool,
) -> torch.Tensor:
    """Decodes a split's images with `prepare_image` into one `(N, C, H, W)` uint8 tensor.

    Without `size` every image must keep the first image's size.
    """
    array = None
    for row, (data, path) in enumerate(_raw_images(dataset, column)):
        try:
            with _open_image(data, path) as image:
                pixels = np.asarray(prepare_image(image, num_channels, size, pad_to_square))
        except _DECODE_ERRORS as error:
            raise ValueError(
                f"Could not decode the image in split {split!r}, row {row} (column {column!r}): {error}. Fix or drop "
                "that row."
            ) from error
        if array is None:
            array = np.empty((len(dataset), *pixels.shape[:2], num_channels), dtype=np.uint8)
        if pixels.shape[:2] != array.shape[1:3]:
            raise ValueError(
                f"The image in split {split!r}, row {row} is {pixels.shape[0]}x{pixels.shape[1]} but the first one is "
                f"{array.shape[1]}x{array.shape[2]}; pass image_size=(height, width) to resize all images (and "
                "pad_to_square=True to keep their aspect ratio); scripts/train.py: --image_size and --pad_to_square."
            )
        array[row] = pixels.reshape(array.shape[1:])
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


def _read_labels(dataset: datasets.Dataset, column: str) -> np.ndarray:
    table = dataset.select_columns([column]).with_format("arrow")[:]
    return table.column(column).to_numpy().astype(np.int64)


def _channel_statistics(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and unbiased std of uint8 images scaled to [0, 1], exact in float64 via histograms."""
    values = torch.arange(256, dtype=torch.float64) / 255
    means, stds = [], []
    for channel in images.unbind(1):
        counts = torch.bincount(channel.reshape(-1), minlength=256).to(torch.float64)
        total = counts.sum()
        mean = (counts * values).sum() / total
        variance = (counts * (values - mean) ** 2).sum() / (total - 1).clamp(min=1)
        means.append(mean)
        stds.append(variance.sqrt())
    return torch.stack(means), torch.stack(stds)


def _generic_augmentation(size: Sequence[int]) -> dict[str, Any]:
    """The CIFAR recipe (padding 4, flip, cutout 16 at 32 px) scaled to the image's shorter side."""
    side = min(size)
    return {"crop_padding": max(1, round(side / 8)), "flip": True, "cutout_size": max(1, side // 2), "cutout_p": 0.5}


def _digits_dataset_dict() -> datasets.DatasetDict:
    """scikit-learn's 8x8 digits as a DatasetDict with PNG `Image` and `ClassLabel` columns (see the loader's doc)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    pixels = ((digits.images.astype(np.int64) * 255 + 8) // 16).astype(np.uint8)
    train_index, test_index = train_test_split(
        np.arange(len(pixels)), test_size=0.2, stratify=digits.target, random_state=0
    )
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(i) for i in range(10)])}
    )
    splits = {}
    for split, index in (("train", np.sort(train_index)), ("test", np.sort(test_index))):
        encoded = []
        for i in index:
            buffer = io.BytesIO()
            PIL.Image.fromarray(pixels[i]).save(buffer, format="PNG")
            encoded.append({"bytes": buffer.getvalue(), "path": None})
        splits[split] = datasets.Dataset.from_dict(
            {"image": encoded, "label": digits.target[index].tolist()}, features=features, split=split
        )
    return datasets.DatasetDict(splits)


def _write_cache(path: Path, tensors: dict[str, torch.Tensor], label_names: list[str], key: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    metadata = {"label_names": json.dumps(label_names), "key": json.dumps(key, sort_keys=True)}
    save_file(tensors, temporary, metadata=metadata)
    # Atomic rename: concurrent processes (one per GPU) never read a half-written file.
    os.replace(temporary, path)


def _read_cache(path: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    with safe_open(path, framework="pt") as cache:
        label_names = json.loads(cache.metadata()["label_names"])
        tensors = {name: cache.get_tensor(name) for name in cache.keys()}
    return tensors, label_names
