"""Decoding a dataset's stored images and labels into uint8 and int64 tensors, with the training statistics.

Images are read from the Arrow table as stored bytes and decoded one by one with [`prepare_image`] (the function
[`AACEImageProcessor`] uses), exactly as `datasets.Image().decode_example` would open them, EXIF orientation included.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass

import datasets
import numpy as np
import PIL.ExifTags
import PIL.Image
import PIL.ImageOps
import torch
from transformers.utils import logging

from ..image_processing_aace import prepare_image

_GRAYSCALE_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
# How many of the first training images vote on the number of channels when the dataset declares no mode.
_MODE_SAMPLE = 64
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, PIL.Image.DecompressionBombError)


@dataclass(frozen=True)
class Preparation:
    """How stored images become uint8 tensors and which statistics normalise them.

    Attributes:
        size: `(height, width)` every image is resized to; None keeps the stored size (which must then be the same
            for every image).
        pad_to_square: pad each image to a centred square with zeros before resizing.
        num_channels: 1 or 3; None detects it from the training images.
        mean: fixed per-channel mean; None computes it from the training images.
        std: fixed per-channel std, given together with `mean`.
    """

    size: tuple[int, int] | None
    pad_to_square: bool
    num_channels: int | None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None


def decode_splits(
    train: datasets.Dataset,
    test: datasets.Dataset,
    test_split: str,
    columns: tuple[str, str],
    preparation: Preparation,
    show_progress: bool = True,
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Decodes both splits, checks their labels and computes the training statistics.

    Args:
        train: the training split.
        test: the evaluation split.
        test_split: the evaluation split's name, for error messages.
        columns: the image and label columns.
        preparation: how to decode the images.
        show_progress: show a progress bar per split (unless transformers' progress bars are disabled).

    Returns:
        The tensors `train_images`, `train_labels`, `test_images`, `test_labels`, `mean` and `std` (float64), and the
        class names indexed by label.
    """
    image_column, label_column = columns
    train_labels = read_labels(train, label_column)
    test_labels = read_labels(test, label_column)
    feature = train.features[label_column]
    if isinstance(feature, datasets.ClassLabel):
        label_names = list(feature.names)
    else:
        label_names = _integer_label_names(train_labels, test_labels, test_split, label_column)
    for split, labels in (("train", train_labels), (test_split, test_labels)):
        _check_label_range(labels, len(label_names), split, label_column)

    num_channels = preparation.num_channels or detect_num_channels(train, image_column)
    images = {
        split: decode_images(dataset, image_column, split, num_channels, preparation, show_progress)
        for split, dataset in (("train", train), (test_split, test))
    }
    train_images, test_images = images["train"], images[test_split]
    if train_images.shape[2:] != test_images.shape[2:]:
        raise ValueError(
            f"The train images are {tuple(train_images.shape[2:])} but the {test_split!r} images are "
            f"{tuple(test_images.shape[2:])}; pass image_size=(height, width) to resize both."
        )
    if preparation.mean is None:
        mean, std = channel_statistics(train_images)
    else:
        mean = torch.tensor(preparation.mean, dtype=torch.float64)
        std = torch.tensor(preparation.std, dtype=torch.float64)
    tensors = {
        "train_images": train_images,
        "train_labels": torch.from_numpy(train_labels),
        "test_images": test_images,
        "test_labels": torch.from_numpy(test_labels),
        "mean": mean,
        "std": std,
    }
    return tensors, label_names


def read_labels(dataset: datasets.Dataset, column: str) -> np.ndarray:
    """The label column as int64, read from the Arrow table without going through Python objects."""
    table = dataset.select_columns([column]).with_format("arrow")[:]
    return table.column(column).to_numpy().astype(np.int64)


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


def _check_label_range(labels: np.ndarray, num_labels: int, split: str, label_column: str) -> None:
    invalid = ((labels < 0) | (labels >= num_labels)).nonzero()[0]
    if len(invalid):
        row = int(invalid[0])
        raise ValueError(
            f"Label {int(labels[row])} in split {split!r}, row {row} (column {label_column!r}) is outside the "
            f"{num_labels} classes 0..{num_labels - 1} ({len(invalid)} such rows); fix or drop them "
            "(unlabelled test sets cannot be used for evaluation)."
        )


def raw_images(dataset: datasets.Dataset, column: str) -> Iterator[tuple[bytes | None, str | None]]:
    """Yields the stored `(bytes, path)` of every image in order, without decoding."""
    raw = dataset.select_columns([column]).cast_column(column, datasets.Image(decode=False)).with_format("arrow")
    for batch in raw.iter(batch_size=1024):
        images = batch.column(column).combine_chunks()
        yield from zip(images.field("bytes").to_pylist(), images.field("path").to_pylist())


def open_image(data: bytes | None, path: str | None) -> PIL.Image.Image:
    """Decodes one stored image exactly as `datasets.Image().decode_example` does, EXIF orientation included."""
    if data is None:
        # Images stored as paths (local or remote) only: let datasets resolve and open them.
        return datasets.Image().decode_example({"bytes": None, "path": path})
    image = PIL.Image.open(io.BytesIO(data))
    image.load()
    if image.getexif().get(PIL.ExifTags.Base.Orientation) is not None:
        image = PIL.ImageOps.exif_transpose(image)
    return image


def detect_num_channels(dataset: datasets.Dataset, column: str) -> int:
    """1 if the dataset declares a grayscale mode or most of its first images are grayscale, else 3."""
    mode = dataset.features[column].mode
    if mode is not None:
        return 1 if mode in _GRAYSCALE_MODES else 3
    sample = dataset.select(range(min(_MODE_SAMPLE, len(dataset))))
    modes = []
    for row, (data, path) in enumerate(raw_images(sample, column)):
        try:
            with open_image(data, path) as image:
                modes.append(image.mode)
        except _DECODE_ERRORS as error:
            raise ValueError(f"Could not read the image in split 'train', row {row}: {error}") from error
    grayscale = sum(m in _GRAYSCALE_MODES for m in modes)
    return 1 if grayscale > len(modes) - grayscale else 3


def decode_images(
    dataset: datasets.Dataset,
    column: str,
    split: str,
    num_channels: int,
    preparation: Preparation,
    show_progress: bool = True,
) -> torch.Tensor:
    """Decodes a split's images with `prepare_image` into one `(N, C, H, W)` uint8 tensor.

    Without `preparation.size` every image must keep the first image's size.
    """
    size, pad_to_square = preparation.size, preparation.pad_to_square
    rows = logging.tqdm(
        raw_images(dataset, column),
        total=len(dataset),
        desc=f"Decoding the {split} images",
        unit=" images",
        disable=not show_progress,
    )
    array = None
    for row, (data, path) in enumerate(rows):
        try:
            with open_image(data, path) as image:
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


def channel_statistics(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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
