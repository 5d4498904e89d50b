"""Tests of the parallel first decode straight into the cache file, and of the memory-mapped cache read (offline)."""

import re
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from transformers import HfArgumentParser

from hf_aace.data import DatasetArguments, arguments, decoding, load_image_classification_dataset

from hub_datasets import encode, write_hub_dataset

FEATURES = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b", "c"])})


@pytest.fixture(autouse=True)
def every_dataset_in_workers(tmp_path, monkeypatch):
    """Sends even these tiny datasets to the worker processes, and keeps datasets' arrow files in tmp_path."""
    monkeypatch.setattr(decoding, "_MIN_BYTES_PER_WORKER", 1)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets_cache"))


def images(seed, count, shape=(8, 8, 3)):
    """JPEG, PNG and grayscale PNG images in turn (the grayscale ones are converted to RGB when decoded)."""
    rng = np.random.default_rng(seed)
    column = []
    for i in range(count):
        pixels = rng.integers(0, 256, shape, dtype=np.uint8)
        column.append(encode(pixels[..., 0] if i % 3 == 2 else pixels, "JPEG" if i % 3 == 0 else "PNG"))
    return column


def write(root, train, test, split="test"):
    splits = {"train": {"image": train, "label": [i % 3 for i in range(len(train))]}}
    splits[split] = {"image": test, "label": [i % 3 for i in range(len(test))]}
    return str(write_hub_dataset(root, FEATURES, splits))


def in_process_only(*args, **kwargs):
    raise AssertionError("decoded in this process, not by the workers")


@pytest.mark.parametrize("preset", [None, "food101"])
def test_workers_decode_the_same_tensors_and_statistics_bit_for_bit(tmp_path, monkeypatch, preset):
    # 13 train images over 2 workers: tasks of 2 rows, the last one shorter. Food101 pads, resizes and fixes its
    # statistics; the plain dataset keeps the stored size and computes them.
    source = write(tmp_path / "d", images(0, 13, (6, 9, 3)), images(1, 5, (6, 9, 3)), "validation")
    name, settings = (preset, {"source": source, "image_size": 5}) if preset else (source, {})

    single = load_image_classification_dataset(name, cache_dir=tmp_path / "one", decode_workers=1, **settings)
    monkeypatch.setattr(decoding, "_decode_in_memory", in_process_only)
    parallel = load_image_classification_dataset(name, cache_dir=tmp_path / "two", decode_workers=2, **settings)

    assert parallel.train.images.shape == (13, 3, 5, 5) if preset else (13, 3, 6, 9)
    for split in ("train", "test"):
        assert torch.equal(getattr(parallel, split).images, getattr(single, split).images)
        assert torch.equal(getattr(parallel, split).labels, getattr(single, split).labels)
    assert parallel.mean == single.mean and parallel.std == single.std and parallel.label_names == single.label_names
    if preset is None:
        assert parallel.mean != (0.485, 0.456, 0.406)  # computed, not a fixed statistic
    # The worker-written file is an ordinary cache entry: read back, not decoded again.
    again = load_image_classification_dataset(name, cache_dir=tmp_path / "two", **settings)
    assert torch.equal(again.train.images, single.train.images) and again.std == single.std


def test_a_bad_image_in_a_worker_is_named_and_leaves_no_file(tmp_path, monkeypatch):
    monkeypatch.setattr(decoding, "_decode_in_memory", in_process_only)
    cache = tmp_path / "cache"
    train = images(2, 12)
    # Two bad rows in different tasks: the first one is reported, as decoding in order would.
    for row in (7, 10):
        train[row] = {"bytes": train[row]["bytes"][:30], "path": None}
    source = write(tmp_path / "d", train, images(3, 4))
    with pytest.raises(
        ValueError, match=re.escape("Could not decode the image in split 'train', row 7 (column 'image')")
    ):
        load_image_classification_dataset(source, cache_dir=cache, decode_workers=2, num_channels=3)
    assert not list(cache.iterdir())  # neither a cache entry nor the temporary file

    test = images(4, 4) + images(5, 1, (8, 6, 3))
    source = write(tmp_path / "sizes", images(2, 12), test)
    with pytest.raises(ValueError, match=r"split 'test', row 4 is 8x6 but the first one is 8x8; pass image_size"):
        load_image_classification_dataset(source, cache_dir=cache, decode_workers=2)
    assert not list(cache.iterdir())

    # Fixed, it decodes into the same cache folder.
    source = write(tmp_path / "fixed", images(2, 12), images(4, 4))
    data = load_image_classification_dataset(source, cache_dir=cache, decode_workers=2)
    assert data.train.images.shape == (12, 3, 8, 8) and [p.suffix for p in cache.iterdir()] == [".safetensors"]


def mapped_file(tensor: torch.Tensor) -> str | None:
    """What holds the tensor's data as /proc/self/maps names it: a file's path, "[heap]", or None (anonymous)."""
    address = tensor.data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        start, end = (int(bound, 16) for bound in fields[0].split("-"))
        if start <= address < end:
            return fields[5] if len(fields) == 6 else None
    return None


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads the process's memory maps (Linux)")
def test_the_cache_is_mapped_from_its_file_not_copied(tmp_path):
    source = write(tmp_path / "d", images(6, 6), images(7, 2))
    parallel = load_image_classification_dataset(source, cache_dir=tmp_path / "two", decode_workers=2)
    (cache_file,) = (tmp_path / "two").glob("*.safetensors")
    assert mapped_file(parallel.train.images) == str(cache_file)
    assert mapped_file(parallel.test.images) == str(cache_file)

    # A cache hit is mapped too, whichever way the file was written.
    in_memory = load_image_classification_dataset(source, cache_dir=tmp_path / "one", decode_workers=1)
    (cache_file,) = (tmp_path / "one").glob("*.safetensors")
    again = load_image_classification_dataset(source, cache_dir=tmp_path / "one")
    assert mapped_file(again.train.images) == str(cache_file)
    assert mapped_file(in_memory.train.images) != str(cache_file)  # decoded in this process: memory, not the file


def test_decode_workers_is_checked_and_reaches_the_loader(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="decode_workers must be a positive number of processes"):
        load_image_classification_dataset("digits", cache_dir=tmp_path, decode_workers=0)
    (args,) = HfArgumentParser(DatasetArguments).parse_args_into_dataclasses(["--decode_workers", "3"])
    passed = {}
    monkeypatch.setattr(arguments, "load_image_classification_dataset", lambda *a, **kwargs: passed.update(kwargs))
    args.load()
    assert passed["decode_workers"] == 3
    assert 1 <= decoding.default_decode_workers() <= 8
