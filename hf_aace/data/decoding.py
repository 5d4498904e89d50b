"""Decoding a dataset's stored images and labels into uint8 and int64 tensors, with the training statistics.

Images are read from the Arrow table as stored bytes and decoded one by one with [`prepare_image`] (the function
[`AACEImageProcessor`] uses), exactly as `datasets.Image().decode_example` would open them, EXIF orientation included.

[`decode_to_cache`] decodes small datasets in this process, in memory; larger ones in worker processes, each writing
a contiguous range of rows straight into the cache file, so no process holds the whole dataset and the cache may be
larger than RAM. Both give the same tensors and statistics, bit for bit.
"""

from __future__ import annotations

import concurrent.futures
import functools
import io
import math
import multiprocessing
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import datasets
import numpy as np
import PIL.ExifTags
import PIL.Image
import PIL.ImageOps
import torch
from transformers.utils import logging

from ..image_processing_aace import prepare_image
from .cache import DecodedCache, TensorSlot

_GRAYSCALE_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
# How many of the first training images vote on the number of channels when the dataset declares no mode.
_MODE_SAMPLE = 64
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, PIL.Image.DecompressionBombError)
# Below this many bytes of decoded pixels per worker (seconds of decoding 224x224 JPEGs on one core), starting the
# workers costs more than they save: such datasets decode in this process.
_MIN_BYTES_PER_WORKER = 256 * 2**20
# The most rows one task of a worker decodes (tasks are smaller for small splits, so every worker gets several).
_MAX_TASK_ROWS = 4096
# A worker writes its decoded rows to the cache file in blocks of about this many bytes.
_WRITE_BYTES = 16 * 2**20
# The splits a worker process decodes from, set once per process by `_set_worker_splits`.
_worker_splits: dict[str, datasets.Dataset] = {}


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
    labels = checked_labels(train, test, test_split, label_column)
    num_channels = preparation.num_channels or detect_num_channels(train, image_column)
    return _decode_in_memory(train, test, test_split, image_column, labels, num_channels, preparation, show_progress)


def _decode_in_memory(
    train: datasets.Dataset,
    test: datasets.Dataset,
    test_split: str,
    image_column: str,
    labels: tuple[np.ndarray, np.ndarray, list[str]],
    num_channels: int,
    preparation: Preparation,
    show_progress: bool,
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """[`decode_splits`] once the labels (`checked_labels`) and the number of channels are known."""
    train_labels, test_labels, label_names = labels
    images = {
        split: decode_images(dataset, image_column, split, num_channels, preparation, show_progress)
        for split, dataset in (("train", train), (test_split, test))
    }
    train_images, test_images = images["train"], images[test_split]
    _check_same_size(train_images.shape, test_images.shape, test_split)
    mean, std = _normalization(preparation, lambda: channel_statistics(train_images))
    tensors = {
        "train_images": train_images,
        "train_labels": torch.from_numpy(train_labels),
        "test_images": test_images,
        "test_labels": torch.from_numpy(test_labels),
        "mean": mean,
        "std": std,
    }
    return tensors, label_names


def decode_to_cache(
    train: datasets.Dataset,
    test: datasets.Dataset,
    test_split: str,
    columns: tuple[str, str],
    preparation: Preparation,
    cache: DecodedCache,
    workers: int,
    show_progress: bool = True,
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Decodes both splits into the cache file and returns what [`decode_splits`] returns.

    With `workers` > 1 and at least 256 MiB of decoded pixels per worker, worker processes decode contiguous
    ranges of rows straight into the file and count the training pixel values for the statistics; the returned
    tensors then map the file. Otherwise this process decodes everything in memory with [`decode_splits`] and writes
    the file afterwards. Either way the file replaces the cache entry only once complete.

    Args:
        train, test, test_split, columns, preparation, show_progress: as for [`decode_splits`].
        cache: the cache entry to write.
        workers: the most processes to decode with; 1 decodes in this process.

    Returns:
        The decoded tensors and the class names, as [`decode_splits`] returns them.
    """
    image_column, label_column = columns
    labels = checked_labels(train, test, test_split, label_column)
    train_labels, test_labels, label_names = labels
    num_channels = preparation.num_channels or detect_num_channels(train, image_column)
    splits = {"train": train, test_split: test}
    shapes = {}
    if workers > 1:
        shapes = {
            split: (
                len(dataset),
                num_channels,
                *_split_image_size(dataset, image_column, split, num_channels, preparation),
            )
            for split, dataset in splits.items()
        }
        workers = min(workers, sum(math.prod(shape) for shape in shapes.values()) // _MIN_BYTES_PER_WORKER)
    if workers <= 1:
        tensors, label_names = _decode_in_memory(
            train, test, test_split, image_column, labels, num_channels, preparation, show_progress
        )
        cache.write(tensors, label_names)
        return tensors, label_names

    specs = {
        "train_images": (torch.uint8, shapes["train"]),
        "train_labels": (torch.int64, train_labels.shape),
        "test_images": (torch.uint8, shapes[test_split]),
        "test_labels": (torch.int64, test_labels.shape),
        "mean": (torch.float64, (num_channels,)),
        "std": (torch.float64, (num_channels,)),
    }
    with cache.writing(specs, label_names) as slots:
        pool = concurrent.futures.ProcessPoolExecutor(
            workers, mp_context=_worker_context(), initializer=_set_worker_splits, initargs=(splits,)
        )
        with pool:
            counts = {
                split: _decode_in_pool(
                    pool,
                    functools.partial(
                        _decode_rows,
                        split,
                        image_column,
                        num_channels,
                        preparation,
                        slots["train_images" if split == "train" else "test_images"],
                        split == "train" and preparation.mean is None,
                    ),
                    len(dataset),
                    f"Decoding the {split} images",
                    workers,
                    show_progress,
                )
                for split, dataset in splits.items()
            }
        _check_same_size(shapes["train"], shapes[test_split], test_split)
        mean, std = _normalization(preparation, lambda: statistics_from_counts(torch.from_numpy(counts["train"])))
        for name, values in (
            ("train_labels", train_labels),
            ("test_labels", test_labels),
            ("mean", mean),
            ("std", std),
        ):
            slots[name].write_rows(0, values)
    return cache.load()


def _normalization(
    preparation: Preparation, statistics: Callable[[], tuple[torch.Tensor, torch.Tensor]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The preparation's fixed mean and std (float64), else `statistics()` of the training images."""
    if preparation.mean is None:
        return statistics()
    return torch.tensor(preparation.mean, dtype=torch.float64), torch.tensor(preparation.std, dtype=torch.float64)


def default_decode_workers() -> int:
    """The number of processes decoding a dataset by default: the cores this process may use, at most 8."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(cores, 8)


def checked_labels(
    train: datasets.Dataset, test: datasets.Dataset, test_split: str, label_column: str
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Both splits' labels as int64 and the class names, refusing labels outside the classes."""
    train_labels = read_labels(train, label_column)
    test_labels = read_labels(test, label_column)
    feature = train.features[label_column]
    if isinstance(feature, datasets.ClassLabel):
        label_names = list(feature.names)
    else:
        label_names = _integer_label_names(train_labels, test_labels, test_split, label_column)
    for split, labels in (("train", train_labels), (test_split, test_labels)):
        _check_label_range(labels, len(label_names), split, label_column)
    return train_labels, test_labels, label_names


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


def raw_images(
    dataset: datasets.Dataset, column: str, rows: range | None = None
) -> Iterator[tuple[bytes | None, str | None]]:
    """Yields the stored `(bytes, path)` of every image in order (or of the contiguous `rows`), without decoding."""
    raw = dataset.select_columns([column]).cast_column(column, datasets.Image(decode=False)).with_format("arrow")
    rows = range(len(raw)) if rows is None else rows
    for start in range(rows.start, rows.stop, 1024):
        images = raw[start : min(start + 1024, rows.stop)].column(column).combine_chunks()
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
    array = None
    with _progress(len(dataset), f"Decoding the {split} images", show_progress) as progress:
        for row, (data, path) in enumerate(raw_images(dataset, column)):
            pixels = _prepared_pixels(data, path, row, split, column, num_channels, preparation)
            if array is None:
                array = np.empty((len(dataset), *pixels.shape[:2], num_channels), dtype=np.uint8)
            _check_image_size(pixels, row, split, array.shape[1:3])
            array[row] = pixels.reshape(array.shape[1:])
            progress.update()
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


def _progress(total: int, description: str, show_progress: bool) -> logging.tqdm:
    return logging.tqdm(total=total, desc=description, unit=" images", disable=not show_progress)


def _prepared_pixels(
    data: bytes | None,
    path: str | None,
    row: int,
    split: str,
    column: str,
    num_channels: int,
    preparation: Preparation,
) -> np.ndarray:
    """One stored image decoded and prepared as an `(H, W)` or `(H, W, C)` uint8 array, errors naming where it is."""
    try:
        with open_image(data, path) as image:
            return np.asarray(prepare_image(image, num_channels, preparation.size, preparation.pad_to_square))
    except _DECODE_ERRORS as error:
        raise undecodable(error, split, row, column) from error


def undecodable(error: Exception, split: str, row: int, column: str) -> ValueError:
    """The error for a stored image that cannot be decoded, naming where it is and what to do."""
    return ValueError(
        f"Could not decode the image in split {split!r}, row {row} (column {column!r}): {error}. Fix or drop that row."
    )


def _check_image_size(pixels: np.ndarray, row: int, split: str, first_size: tuple[int, int]) -> None:
    if pixels.shape[:2] != tuple(first_size):
        raise ValueError(
            f"The image in split {split!r}, row {row} is {pixels.shape[0]}x{pixels.shape[1]} but the first one is "
            f"{first_size[0]}x{first_size[1]}; pass image_size=(height, width) to resize all images (and "
            "pad_to_square=True to keep their aspect ratio); scripts/train.py: --image_size and --pad_to_square."
        )


def _check_same_size(train_shape: tuple[int, ...], test_shape: tuple[int, ...], test_split: str) -> None:
    """Refuses splits whose `(N, C, H, W)` images differ in height and width."""
    if tuple(train_shape[2:]) != tuple(test_shape[2:]):
        raise ValueError(
            f"The train images are {tuple(train_shape[2:])} but the {test_split!r} images are "
            f"{tuple(test_shape[2:])}; pass image_size=(height, width) to resize both."
        )


def _split_image_size(
    dataset: datasets.Dataset, column: str, split: str, num_channels: int, preparation: Preparation
) -> tuple[int, int]:
    """The `(height, width)` every image of the split must get: the requested size, else the first image's."""
    if preparation.size is not None:
        return tuple(preparation.size)
    ((data, path),) = raw_images(dataset, column, range(1))
    return _prepared_pixels(data, path, 0, split, column, num_channels, preparation).shape[:2]


def _worker_context() -> multiprocessing.context.BaseContext:
    """How decoding workers start: forked from a clean server process that imported this module once (forkserver).

    Not forked from this process, which may hold threads (torch's, pyarrow's) whose locks a fork would copy held, nor
    spawned, where every worker would import transformers afresh (seconds each). The server lives as long as this
    process, holding its imported modules (about 0.3 GB).
    """
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return context


def _set_worker_splits(splits: dict[str, datasets.Dataset]) -> None:
    """Worker initialiser: the splits arrive once per process (memory-mapped datasets pickle as file names)."""
    _worker_splits.update(splits)


def _decode_in_pool(
    pool: concurrent.futures.Executor,
    task: Callable[[range], np.ndarray | None],
    num_rows: int,
    description: str,
    workers: int,
    show_progress: bool,
) -> np.ndarray | None:
    """Runs `task` over contiguous ranges of rows in the pool and sums the value counts they return.

    A failing range stops the ranges not yet started; once the running ones end, the error of the first failing row
    is raised, as decoding in order would have raised it.
    """
    size = max(1, min(_MAX_TASK_ROWS, math.ceil(num_rows / (4 * workers))))
    futures = {
        pool.submit(task, range(start, min(start + size, num_rows))): start for start in range(0, num_rows, size)
    }
    counts, failures = None, []
    with _progress(num_rows, description, show_progress) as progress:
        for future in concurrent.futures.as_completed(futures):
            if future.cancelled():
                continue
            if future.exception() is not None:
                failures.append((futures[future], future.exception()))
                for other in futures:
                    other.cancel()
                continue
            result = future.result()
            counts = result if counts is None else counts + result
            progress.update(min(size, num_rows - futures[future]))
    if failures:
        raise min(failures, key=lambda failure: failure[0])[1]
    return counts


def _decode_rows(
    split: str,
    column: str,
    num_channels: int,
    preparation: Preparation,
    slot: TensorSlot,
    count_values: bool,
    rows: range,
) -> np.ndarray | None:
    """Worker task: decodes `rows` of `split` into `slot`; with `count_values`, returns their (C, 256) value counts."""
    _, channels, height, width = slot.shape
    block = np.empty(
        (max(1, min(len(rows), _WRITE_BYTES // (channels * height * width))), channels, height, width), np.uint8
    )
    counts = np.zeros((channels, 256), np.int64) if count_values else None
    filled = 0
    for row, (data, path) in enumerate(raw_images(_worker_splits[split], column, rows), rows.start):
        pixels = _prepared_pixels(data, path, row, split, column, num_channels, preparation)
        _check_image_size(pixels, row, split, (height, width))
        block[filled] = pixels.reshape(height, width, channels).transpose(2, 0, 1)
        filled += 1
        if filled == len(block) or row == rows.stop - 1:
            slot.write_rows(row + 1 - filled, block[:filled])
            if counts is not None:
                for channel in range(channels):
                    counts[channel] += np.bincount(block[:filled, channel].reshape(-1), minlength=256)
            filled = 0
    return counts


def channel_statistics(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and unbiased std of uint8 images scaled to [0, 1], exact in float64 via histograms."""
    return statistics_from_counts(
        torch.stack([torch.bincount(channel.reshape(-1), minlength=256) for channel in images.unbind(1)])
    )


def statistics_from_counts(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and unbiased std of values in [0, 1] from the `(C, 256)` counts of each uint8 value."""
    values = torch.arange(256, dtype=torch.float64) / 255
    means, stds = [], []
    for channel in counts.to(torch.float64).unbind(0):
        total = channel.sum()
        mean = (channel * values).sum() / total
        variance = (channel * (values - mean) ** 2).sum() / (total - 1).clamp(min=1)
        means.append(mean)
        stds.append(variance.sqrt())
    return torch.stack(means), torch.stack(stds)
