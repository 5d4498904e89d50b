"""Tests of hf_aace.data's loading: presets, column detection, decoding, validation and the tensor cache (offline)."""

import io
import json
import logging
import re
from dataclasses import dataclass, field, fields
from pathlib import Path

import datasets
import numpy as np
import PIL.ExifTags
import PIL.Image
import pytest
import torch
from safetensors import safe_open
from transformers import HfArgumentParser, default_data_collator
from transformers.utils import logging as transformers_logging

from hf_aace.data import (
    PRESETS,
    AugmentationSettings,
    BatchAugmentation,
    DatasetArguments,
    ImageClassificationSplit,
    decoding,
    get_preset,
    load_image_classification_dataset,
    splits,
)
from hf_aace.image_processing_aace import prepare_image

from hub_datasets import encode, write_hub_dataset, write_integer_label_dataset


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    """Keeps the arrow files `datasets.load_dataset` prepares out of the home directory."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets_cache"))


def random_images(rng, count, shape):
    return [rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(count)]


def class_label(count):
    return datasets.ClassLabel(names=[f"class_{i}" for i in range(count)])


def test_cifar10_preset_from_local_copy_converts_stray_modes(tmp_path):
    rng = np.random.default_rng(0)
    train = random_images(rng, 6, (32, 32, 3))
    test = random_images(rng, 3, (32, 32, 3))
    stray = [PIL.Image.fromarray(train[3][..., 0]), PIL.Image.fromarray(train[4]).convert("RGBA")]
    stray.append(PIL.Image.fromarray(train[5]).convert("P"))
    train_column = [encode(a) for a in train[:3]] + [encode(image) for image in stray]
    features = datasets.Features({"img": datasets.Image(), "label": class_label(10)})
    source = write_hub_dataset(
        tmp_path / "cifar10",
        features,
        {
            "train": {"img": train_column, "label": [0, 1, 2, 3, 4, 5]},
            "test": {"img": [encode(a) for a in test], "label": [7, 8, 9]},
        },
    )

    data = load_image_classification_dataset("cifar10", source=str(source), cache_dir=tmp_path / "cache")

    assert data.name == "cifar10" and data.dataset_id == "uoft-cs/cifar10" and data.test_split == "test"
    assert data.train.images.dtype == torch.uint8 and data.train.images.shape == (6, 3, 32, 32)
    # The images and labels come from the local copy's "img" and "label" columns.
    assert data.test.labels.tolist() == [7, 8, 9] and data.test.labels.dtype == torch.int64
    assert data.train.labels.tolist() == [0, 1, 2, 3, 4, 5]
    expected = [np.asarray(PIL.Image.fromarray(a).convert("RGB")) for a in train[:3]]
    expected += [np.asarray(image.convert("RGB")) for image in stray]
    assert np.array_equal(data.train.images.permute(0, 2, 3, 1).numpy(), np.stack(expected))
    pixels = np.stack(expected).astype(np.float64) / 255
    np.testing.assert_allclose(data.mean, pixels.mean(axis=(0, 1, 2)), rtol=1e-12)
    np.testing.assert_allclose(data.std, pixels.reshape(-1, 3).std(axis=0, ddof=1), rtol=1e-12)
    assert data.augmentation == AugmentationSettings(crop_padding=4, flip=True, cutout_size=16, cutout_p=0.5)


def test_cifar100_preset_fine_and_coarse_labels_share_a_cache_without_mixing(tmp_path):
    rng = np.random.default_rng(1)
    features = datasets.Features(
        {"img": datasets.Image(), "fine_label": class_label(100), "coarse_label": class_label(20)}
    )
    splits = {
        split: {
            "img": [encode(a) for a in random_images(rng, 4, (32, 32, 3))],
            "fine_label": [99, 1, 2, 3],
            "coarse_label": [19, 0, 1, 2],
        }
        for split in ("train", "test")
    }
    source = write_hub_dataset(tmp_path / "cifar100", features, splits)

    # One cache folder: each label choice is decoded into its own entry, never read back from the other's.
    for coarse in (False, True, False, True):
        data = load_image_classification_dataset(
            "cifar100", source=str(source), coarse_labels=coarse, cache_dir=tmp_path / "cache"
        )
        assert data.num_labels == (20 if coarse else 100)
        assert data.label_names[-1] == ("class_19" if coarse else "class_99")
        assert data.train.labels.tolist() == ([19, 0, 1, 2] if coarse else [99, 1, 2, 3])
        assert data.test.labels.tolist() == ([19, 0, 1, 2] if coarse else [99, 1, 2, 3])
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2


def test_fashion_mnist_preset_stays_grayscale(tmp_path):
    rng = np.random.default_rng(2)
    train = random_images(rng, 4, (28, 28))
    rgb = rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)
    features = datasets.Features({"image": datasets.Image(), "label": class_label(10)})
    splits = {
        "train": {"image": [encode(a) for a in train] + [encode(rgb)], "label": [0, 1, 2, 3, 4]},
        "test": {"image": [encode(a) for a in train[:2]], "label": [5, 6]},
    }
    source = write_hub_dataset(tmp_path / "fashion_mnist", features, splits)

    data = load_image_classification_dataset("fashion_mnist", source=str(source), cache_dir=tmp_path / "cache")

    assert data.num_channels == 1 and data.train.images.shape == (5, 1, 28, 28)
    assert np.array_equal(data.train.images[0, 0].numpy(), train[0])
    assert np.array_equal(data.train.images[4, 0].numpy(), np.asarray(PIL.Image.fromarray(rgb).convert("L")))
    assert len(data.mean) == 1 and data.augmentation.crop_padding is None and data.augmentation.flip is False
    assert data.augmentation == AugmentationSettings(crop_padding=None, flip=False, cutout_size=16, cutout_p=0.5)

    # One preset, whatever its spelling: the aliases give the same dataset and share its cache entry.
    assert data.name == "fashion_mnist" and data.dataset_id == "zalando-datasets/fashion_mnist"
    for alias in ("fashionmnist", "Fashion-MNIST"):
        assert get_preset(alias) is PRESETS["fashion_mnist"]
        again = load_image_classification_dataset(alias, source=str(source), cache_dir=tmp_path / "cache")
        assert again.name == "fashion_mnist" and again.dataset_id == "zalando-datasets/fashion_mnist"
        assert torch.equal(again.train.images, data.train.images) and again.augmentation == data.augmentation
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1


def test_food101_preset_pads_resizes_and_matches_image_processor(tmp_path):
    rng = np.random.default_rng(3)
    shapes = [(40, 64, 3), (64, 40, 3), (50, 50, 3), (33, 47, 3), (64, 64, 3)]
    originals = [PIL.Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)) for shape in shapes]
    jpegs = []
    for image in originals:
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG")
        jpegs.append(buffer.getvalue())
    features = datasets.Features({"image": datasets.Image(), "label": class_label(101)})
    splits = {
        "train": {"image": [{"bytes": b, "path": None} for b in jpegs[:3]], "label": [0, 50, 100]},
        "validation": {"image": [{"bytes": b, "path": None} for b in jpegs[3:]], "label": [1, 2]},
    }
    source = write_hub_dataset(tmp_path / "food101", features, splits)

    data = load_image_classification_dataset("food101", source=str(source), cache_dir=tmp_path / "cache")

    assert data.test_split == "validation" and data.pad_to_square and data.image_size == (32, 32)
    assert data.mean == (0.485, 0.456, 0.406) and data.std == (0.229, 0.224, 0.225)
    decoded = [PIL.Image.open(io.BytesIO(b)) for b in jpegs[3:]]
    expected = np.stack([np.asarray(prepare_image(image, 3, (32, 32), True)) for image in decoded])
    assert np.array_equal(data.test.images.permute(0, 2, 3, 1).numpy(), expected)
    # Padding is centred zeros: the 33-pixel-high image leaves black bands above and below.
    assert data.test.images[0, :, :4].max() == 0 and data.test.images[0, :, -4:].max() == 0
    # The saved processor on the original JPEG reproduces what evaluation sees, to float32 rounding.
    processed = data.image_processor()(decoded, return_tensors="pt")["pixel_values"]
    normalized = BatchAugmentation(data.mean, data.std).normalize(data.test.images)
    torch.testing.assert_close(normalized, processed, rtol=0, atol=1e-6)

    resized = load_image_classification_dataset(
        "food101", source=str(source), image_size=16, cache_dir=tmp_path / "cache"
    )
    assert resized.train.images.shape == (3, 3, 16, 16)


def test_digits_end_to_end_and_cache_hit(tmp_path, monkeypatch):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    cache_dir = tmp_path / "not" / "yet" / "made"  # created with its parents
    data = load_image_classification_dataset("digits", cache_dir=cache_dir)

    assert data.train.images.shape == (1437, 1, 8, 8) and data.test.images.shape == (360, 1, 8, 8)
    assert data.train.images.dtype == torch.uint8 and data.train.labels.dtype == torch.int64
    assert data.label_names == [str(i) for i in range(10)] and data.dataset_id == "sklearn.datasets.load_digits"
    # The documented split and scaling, image by image.
    digits = load_digits()
    scaled = torch.from_numpy((digits.images.astype(np.int64) * 255 + 8) // 16).to(torch.uint8)[:, None]
    train_index, test_index = train_test_split(np.arange(1797), test_size=0.2, stratify=digits.target, random_state=0)
    for split, index in ((data.train, np.sort(train_index)), (data.test, np.sort(test_index))):
        assert torch.equal(split.images, scaled[index])
        assert split.labels.tolist() == digits.target[index].tolist()
    assert int(data.train.images.max()) == 255
    per_class = torch.bincount(data.test.labels) / torch.bincount(torch.from_numpy(digits.target))
    assert ((per_class - 0.2).abs() < 0.01).all()
    pixels = data.train.images.double() / 255
    np.testing.assert_allclose(data.mean, [pixels.mean().item()], rtol=1e-12)
    np.testing.assert_allclose(data.std, [pixels.std().item()], rtol=1e-12)

    def fail(*args, **kwargs):
        raise AssertionError("decoded again despite the cache")

    # The file says which settings it holds, for whoever finds it in the cache directory.
    (cache_file,) = cache_dir.glob("*.safetensors")
    with safe_open(cache_file, framework="pt") as cache:
        key = json.loads(cache.metadata()["key"])
    assert key["source"] == "sklearn.datasets.load_digits" and key["image_size"] == [8, 8] and key["format"] >= 1

    monkeypatch.setattr(decoding, "decode_images", fail)
    again = load_image_classification_dataset("digits", cache_dir=cache_dir)
    assert torch.equal(again.train.images, data.train.images) and torch.equal(again.test.labels, data.test.labels)
    assert again.mean == data.mean and again.label_names == data.label_names
    with pytest.raises(AssertionError, match="decoded again"):
        load_image_classification_dataset("digits", cache_dir=cache_dir, image_size=16)


def test_the_revision_reaches_datasets(tmp_path, monkeypatch):
    requested = {}

    def load_dataset(location, **kwargs):
        requested.update(location=location, **kwargs)
        raise ConnectionError("stop here")

    monkeypatch.setattr(splits.datasets, "load_dataset", load_dataset)
    with pytest.raises(ConnectionError, match="stop here"):
        load_image_classification_dataset("cifar10", revision="v1.2", cache_dir=tmp_path)
    assert requested == {"location": "uoft-cs/cifar10", "revision": "v1.2"}


def test_split_serves_trainer_batches(tmp_path):
    images = torch.randint(0, 256, (10, 3, 4, 4), dtype=torch.uint8)
    split = ImageClassificationSplit(images, torch.arange(10))
    item = split[3]
    assert item["pixel_values"].dtype == torch.uint8 and torch.equal(item["pixel_values"], images[3])
    assert item["labels"].dtype == torch.int64 and item["labels"].ndim == 0
    loader = torch.utils.data.DataLoader(split, batch_size=4, shuffle=False, collate_fn=default_data_collator)
    batch = next(iter(loader))
    assert batch["pixel_values"].dtype == torch.uint8 and torch.equal(batch["pixel_values"], images[:4])
    assert batch["labels"].dtype == torch.int64 and batch["labels"].tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="uint8"):
        ImageClassificationSplit(images.long(), torch.arange(10))
    with pytest.raises(ValueError, match="labels must be an int64 tensor with one label per image"):
        ImageClassificationSplit(images, torch.arange(10, dtype=torch.int32))  # the right shape, another dtype
    with pytest.raises(ValueError, match="labels must be an int64 tensor with one label per image"):
        ImageClassificationSplit(images, torch.arange(9))


def test_generic_dataset_detects_columns_and_uses_validation(tmp_path):
    rng = np.random.default_rng(4)
    features = datasets.Features(
        {"caption": datasets.Value("string"), "picture": datasets.Image(), "target": class_label(3)}
    )
    pictures = {split: random_images(rng, 3, (6, 5)) for split in ("train", "validation")}
    splits = {
        "train": {"caption": ["x"] * 3, "picture": [encode(a) for a in pictures["train"]], "target": [2, 0, 1]},
        "validation": {
            "caption": ["x"] * 3,
            "picture": [encode(a) for a in pictures["validation"]],
            "target": [1, 2, 0],
        },
    }
    source = write_hub_dataset(tmp_path / "generic", features, splits)

    data = load_image_classification_dataset(str(source), cache_dir=tmp_path / "cache")

    # The single Image and ClassLabel columns ("picture", "target") are found; "validation" is the test split.
    assert data.test_split == "validation" and data.name == data.dataset_id == str(source)
    assert data.train.images.shape == (3, 1, 6, 5) and data.label_names == ["class_0", "class_1", "class_2"]
    assert np.array_equal(data.train.images[:, 0].numpy(), np.stack(pictures["train"]))
    assert np.array_equal(data.test.images[:, 0].numpy(), np.stack(pictures["validation"]))
    assert data.train.labels.tolist() == [2, 0, 1] and data.test.labels.tolist() == [1, 2, 0]
    assert data.augmentation == AugmentationSettings(crop_padding=1, flip=True, cutout_size=2, cutout_p=0.5)
    assert data.augmentation == AugmentationSettings.scaled_to((6, 5))


def test_column_errors_say_what_to_pass(tmp_path):
    rng = np.random.default_rng(5)
    pictures = [encode(a) for a in random_images(rng, 2, (4, 4))]

    def load(name, features, rows, **kwargs):
        source = write_hub_dataset(tmp_path / name, datasets.Features(features), {"train": rows, "test": rows})
        return load_image_classification_dataset(str(source), cache_dir=tmp_path / "cache", **kwargs)

    two_images = {"a": datasets.Image(), "b": datasets.Image(), "y": class_label(2)}
    listing = "{'a': 'Image', 'b': 'Image', 'y': 'ClassLabel'}"
    with pytest.raises(ValueError) as error:
        load("two", two_images, {"a": pictures, "b": pictures, "y": [0, 1]})
    assert str(error.value) == (
        "Found 2 (['a', 'b']) Image columns, so the image column is ambiguous; the columns are "
        f"{listing}: pass image_column= naming the one to use."
    )
    with pytest.raises(ValueError) as error:
        load("two", two_images, {"a": pictures, "b": pictures, "y": [0, 1]}, image_column="c")
    assert str(error.value) == f"Column 'c' not found; the columns are {listing}: pass image_column= one of them."
    unlabelled = {"a": datasets.Image(), "y": datasets.Value("string")}
    with pytest.raises(ValueError, match="^Found no ClassLabel columns, so the label column is ambiguous"):
        load("strings", unlabelled, {"a": pictures, "y": ["0", "1"]})
    with pytest.raises(ValueError, match="^Column 'y' is Value.*labels must be a ClassLabel or integer column"):
        load("strings", unlabelled, {"a": pictures, "y": ["0", "1"]}, label_column="y")
    with pytest.raises(ValueError, match=r"^Column 'y' is Value\('string'\), not an Image column"):
        load("strings", unlabelled, {"a": pictures, "y": ["0", "1"]}, image_column="y", label_column="a")
    # Unsigned integer labels are labels too.
    data = load(
        "uint", {"a": datasets.Image(), "y": datasets.Value("uint8")}, {"a": pictures, "y": [1, 0]}, label_column="y"
    )
    assert data.train.labels.tolist() == [1, 0] and data.label_names == ["0", "1"]
    # A preset's files without its columns: load them as a plain dataset instead.
    source = write_hub_dataset(
        tmp_path / "other",
        datasets.Features(two_images),
        {"train": {"a": pictures, "b": pictures, "y": [0, 1]}, "test": {"a": pictures, "b": pictures, "y": [0, 1]}},
    )
    with pytest.raises(
        ValueError,
        match=r"\}: the preset expects its Hub layout; pass the directory or id as `name` instead to detect",
    ):
        load_image_classification_dataset("cifar10", source=str(source), cache_dir=tmp_path / "cache")
    # An evaluation split without the training split's label column, or with another image feature.
    train = datasets.Dataset.from_dict(
        {"a": pictures, "y": [0, 1]}, features=datasets.Features({"a": datasets.Image(), "y": class_label(2)})
    )
    for test in (
        datasets.Dataset.from_dict({"a": pictures}, features=datasets.Features({"a": datasets.Image()})),
        datasets.Dataset.from_dict(
            {"a": pictures, "y": [0, 1]},
            features=datasets.Features({"a": datasets.Image(decode=False), "y": class_label(2)}),
        ),
    ):
        with pytest.raises(ValueError, match="^The 'test' split of 'here' lacks the columns 'a' / 'y' of the train"):
            splits.select_columns(train, test, "test", "here", (None, None), is_preset=False)


def test_integer_label_column_by_name(tmp_path):
    rng = np.random.default_rng(5)
    features = datasets.Features({"a": datasets.Image(), "b": datasets.Image(), "y": datasets.Value("int64")})
    images = {(split, column): random_images(rng, 2, (4, 4, 3)) for split in ("train", "test") for column in "ab"}
    splits = {
        split: {
            "a": [encode(x) for x in images[split, "a"]],
            "b": [encode(x) for x in images[split, "b"]],
            "y": [0, 3],
        }
        for split in ("train", "test")
    }
    source = write_hub_dataset(tmp_path / "two_images", features, splits)
    with pytest.raises(ValueError, match="image_column=") as error:
        load_image_classification_dataset(str(source), label_column="y", cache_dir=tmp_path / "cache")
    assert "'a'" in str(error.value) and "'b'" in str(error.value)
    with pytest.raises(ValueError, match="label_column="):
        load_image_classification_dataset(str(source), image_column="a", cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError, match="'nope' not found"):
        load_image_classification_dataset(str(source), image_column="nope", label_column="y", cache_dir=tmp_path)

    data = load_image_classification_dataset(str(source), image_column="b", label_column="y", cache_dir=tmp_path)
    assert data.label_names == ["0", "1", "2", "3"] and data.num_channels == 3
    assert np.array_equal(data.train.images.permute(0, 2, 3, 1).numpy(), np.stack(images["train", "b"]))
    # The columns are part of the cache key: the other image column is decoded afresh, not read from b's entry.
    other = load_image_classification_dataset(str(source), image_column="a", label_column="y", cache_dir=tmp_path)
    assert np.array_equal(other.train.images.permute(0, 2, 3, 1).numpy(), np.stack(images["train", "a"]))
    assert np.array_equal(other.test.images.permute(0, 2, 3, 1).numpy(), np.stack(images["test", "a"]))
    assert len(list(tmp_path.glob("*.safetensors"))) == 2


def test_bad_names_and_arguments(tmp_path):
    with pytest.raises(ValueError, match="cifar10, cifar100, fashion_mnist, food101, digits"):
        load_image_classification_dataset("cifar1000", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="coarse_labels"):
        load_image_classification_dataset("cifar10", coarse_labels=True, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="fixes its columns"):
        load_image_classification_dataset("cifar10", label_column="x", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="image_size"):
        load_image_classification_dataset("digits", image_size=(8, 0), cache_dir=tmp_path)
    # An int is a square size, and 1 is a size.
    assert load_image_classification_dataset("digits", image_size=1, cache_dir=tmp_path).train.images.shape[-2:] == (
        1,
        1,
    )
    with pytest.raises(
        ValueError, match="coarse_labels=True only applies to the presets with superclasses \\('cifar100'\\)"
    ):
        load_image_classification_dataset(str(tmp_path), coarse_labels=True, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="source only redirects a preset \\(cifar10, cifar100, fashion_mnist"):
        load_image_classification_dataset(str(tmp_path), source=str(tmp_path), cache_dir=tmp_path)
    with pytest.raises(ValueError, match="built from scikit-learn"):
        load_image_classification_dataset("Digits", revision="main", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="num_channels must be 1"):
        load_image_classification_dataset("digits", num_channels=2, cache_dir=tmp_path)


def test_a_split_of_one_image_loads(tmp_path):
    features = datasets.Features({"image": datasets.Image(), "label": class_label(2)})
    image = encode(np.zeros((2, 2), np.uint8))
    splits = {"train": {"image": [image, image], "label": [0, 1]}, "test": {"image": [image], "label": [1]}}
    data = load_image_classification_dataset(
        str(write_hub_dataset(tmp_path / "d", features, splits)), cache_dir=tmp_path / "cache"
    )
    assert (len(data.train), len(data.test)) == (2, 1) and data.test.labels.tolist() == [1]


def test_missing_test_split(tmp_path):
    features = datasets.Features({"image": datasets.Image(), "label": class_label(2)})
    source = write_hub_dataset(
        tmp_path / "d", features, {"train": {"image": [encode(np.zeros((2, 2), np.uint8))], "label": [0]}}
    )
    with pytest.raises(ValueError, match=f"^{re.escape(repr(str(source)))} has no 'test' or 'validation' split"):
        load_image_classification_dataset(str(source), cache_dir=tmp_path / "cache")


def test_corrupted_image_names_split_and_row(tmp_path):
    rng = np.random.default_rng(6)
    test_column = [encode(a) for a in random_images(rng, 3, (4, 4, 3))]
    test_column[2] = {"bytes": test_column[2]["bytes"][:30], "path": None}
    features = datasets.Features({"image": datasets.Image(), "label": class_label(2)})
    splits = {
        "train": {"image": [encode(a) for a in random_images(rng, 2, (4, 4, 3))], "label": [0, 1]},
        "test": {"image": test_column, "label": [0, 1, 0]},
    }
    source = write_hub_dataset(tmp_path / "d", features, splits)
    with pytest.raises(ValueError, match="split 'test', row 2"):
        load_image_classification_dataset(str(source), cache_dir=tmp_path / "cache")


def test_labels_outside_class_range(tmp_path):
    rng = np.random.default_rng(7)
    images = {split: [encode(a) for a in random_images(rng, 3, (4, 4))] for split in ("train", "test")}
    declared = datasets.Features({"image": datasets.Image(), "label": class_label(2)})
    stored = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    splits = {
        "train": {"image": images["train"], "label": [0, 1, 1]},
        "test": {"image": images["test"], "label": [0, 2, 1]},  # 2 classes: label 2 is the first one out of range
    }
    source = write_hub_dataset(tmp_path / "d", declared, splits, parquet_features=stored)
    with pytest.raises(ValueError, match=r"Label 2 in split 'test', row 1 .* outside the 2 classes 0\.\.1"):
        load_image_classification_dataset(str(source), cache_dir=tmp_path / "cache")

    unlabelled = {"train": splits["train"], "test": {"image": images["test"], "label": [-1, -1, -1]}}
    source = write_hub_dataset(tmp_path / "u", declared, unlabelled)
    with pytest.raises(ValueError, match="Label -1 in split 'test', row 0"):
        load_image_classification_dataset(str(source), cache_dir=tmp_path / "cache")


def test_varying_sizes_need_image_size(tmp_path):
    rng = np.random.default_rng(8)
    features = datasets.Features({"image": datasets.Image(), "label": class_label(2)})
    splits = {
        split: {
            "image": [encode(rng.integers(0, 256, s, dtype=np.uint8)) for s in [(8, 8, 3), (6, 10, 3)]],
            "label": [0, 1],
        }
        for split in ("train", "test")
    }
    source = write_hub_dataset(tmp_path / "d", features, splits)
    with pytest.raises(ValueError, match=r"split 'train', row 1 is 6x10.*pass image_size"):
        load_image_classification_dataset(str(source), cache_dir=tmp_path / "cache")
    data = load_image_classification_dataset(
        str(source), image_size=8, pad_to_square=True, cache_dir=tmp_path / "cache"
    )
    assert data.test.images.shape == (2, 3, 8, 8) and data.image_size == (8, 8)
    assert data.image_processor().do_pad_to_square is True


def test_decoding_matches_datasets_with_exif_orientation(tmp_path):
    rng = np.random.default_rng(9)
    rotated = PIL.Image.fromarray(rng.integers(0, 256, (12, 20, 3), dtype=np.uint8))
    exif = PIL.Image.Exif()
    exif[PIL.ExifTags.Base.Orientation] = 6
    buffer = io.BytesIO()
    rotated.save(buffer, format="JPEG", exif=exif)
    column = [{"bytes": buffer.getvalue(), "path": None}, encode(rng.integers(0, 256, (20, 12, 3), dtype=np.uint8))]
    features = datasets.Features({"image": datasets.Image(), "label": class_label(2)})
    source = write_hub_dataset(
        tmp_path / "d", features, {s: {"image": column, "label": [0, 1]} for s in ("train", "test")}
    )

    data = load_image_classification_dataset(str(source), cache_dir=tmp_path / "cache")

    decoded = datasets.load_dataset(str(source))["test"]["image"]
    assert decoded[0].size == (12, 20)  # datasets applied the rotation
    expected = np.stack([np.asarray(image.convert("RGB")) for image in decoded])
    assert np.array_equal(data.test.images.permute(0, 2, 3, 1).numpy(), expected)


@pytest.fixture
def progress_bars():
    """Turns transformers' progress bars on for one test, restoring the previous setting afterwards."""
    enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.enable_progress_bar()
    yield
    if not enabled:
        transformers_logging.disable_progress_bar()


def test_first_decode_shows_progress_and_logs_the_cache(tmp_path, capfd, caplog, progress_bars):
    with caplog.at_level(logging.INFO, logger="hf_aace"):
        load_image_classification_dataset("digits", cache_dir=tmp_path / "shown")
    shown = capfd.readouterr().err
    assert "Decoding the train images" in shown and "1437/1437" in shown and " images/s]" in shown
    assert "Decoding the test images" in shown and "360/360" in shown
    (cache_file,) = (tmp_path / "shown").glob("*.safetensors")
    assert f"Decoding sklearn.datasets.load_digits; it will be cached in {cache_file}" in caplog.text
    assert f"and cached it in {cache_file}" in caplog.text

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="hf_aace"):
        load_image_classification_dataset("digits", cache_dir=tmp_path / "shown")
    assert f"Read the decoded sklearn.datasets.load_digits from {cache_file}" in caplog.text
    assert "Decoding" not in caplog.text and "Decoding" not in capfd.readouterr().err

    # Quiet on request, or when transformers' progress bars are off (--disable_tqdm, non-main processes).
    load_image_classification_dataset("digits", cache_dir=tmp_path / "quiet", show_progress=False)
    transformers_logging.disable_progress_bar()
    load_image_classification_dataset("digits", cache_dir=tmp_path / "disabled")
    assert "Decoding" not in capfd.readouterr().err
    assert len(list(tmp_path.glob("*/*.safetensors"))) == 3  # both were decoded, not read from a cache


@dataclass
class TrainingDataArguments(DatasetArguments):
    image_size: int | None = field(default=None, metadata={"help": "Resize images to this size."})


def test_dataset_arguments_parse_and_load(tmp_path):
    parser = HfArgumentParser(DatasetArguments)
    (args,) = parser.parse_args_into_dataclasses(["--dataset", "cifar10", "--coarse_labels", "--cache_dir", "c"])
    assert args == DatasetArguments(dataset="cifar10", coarse_labels=True, cache_dir="c")
    (help_text,) = [f.metadata["help"] for f in fields(DatasetArguments) if f.name == "dataset"]
    for preset in PRESETS.values():
        assert preset.name in help_text and all(alias in help_text for alias in preset.aliases)
    assert "uoft-cs/cifar100" in help_text and "ethz/food101" in help_text
    with pytest.raises(ValueError, match="coarse_labels=True only applies"):
        args.load()

    rng = np.random.default_rng(10)
    pixels = random_images(rng, 4, (28, 28))
    features = datasets.Features({"image": datasets.Image(), "label": class_label(10)})
    splits = {split: {"image": [encode(a) for a in pixels], "label": [0, 1, 2, 3]} for split in ("train", "test")}
    source = write_hub_dataset(tmp_path / "fashion_mnist", features, splits)
    argv = ["--dataset", "fashionmnist", "--dataset_source", str(source), "--cache_dir", str(tmp_path / "cache")]
    (args,) = parser.parse_args_into_dataclasses(argv)
    data = args.load(image_size=14, num_channels=3, show_progress=False)
    assert data.name == "fashion_mnist" and data.train.images.shape == (4, 3, 14, 14)
    assert list(tmp_path.glob("cache/zalando-datasets_fashion_mnist-*.safetensors"))

    # A script's own data options extend the shared ones.
    (args,) = HfArgumentParser(TrainingDataArguments).parse_args_into_dataclasses(
        ["--image_size", "16", "--cache_dir", str(tmp_path / "cache")]
    )
    data = args.load(image_size=args.image_size, pad_to_square=True, show_progress=False)
    assert data.name == "digits" and data.image_size == (16, 16) and data.pad_to_square


def test_the_decoded_cache_defaults_to_hf_home():
    from huggingface_hub import constants

    from hf_aace.data.cache import DecodedCache

    cache = DecodedCache.locate(None, "someone/my data", image_size=32)
    assert cache.path.parent == Path(constants.HF_HOME) / "hf_aace"
    assert cache.path.name.startswith("someone_my_data-") and cache.path.suffix == ".safetensors"
    assert DecodedCache.locate("elsewhere", "someone/my data", image_size=32).path.name == cache.path.name


def test_integer_labels_name_their_classes_and_a_stray_one_is_located(tmp_path):
    data = load_image_classification_dataset(
        write_integer_label_dataset(tmp_path, [0, 1, 2, 3], [3, 0]), label_column="label", cache_dir=tmp_path
    )
    assert data.label_names == ["0", "1", "2", "3"] and data.test.labels.tolist() == [3, 0]
    # The largest label is in the test split: the message points there, with the column.
    source = write_integer_label_dataset(tmp_path, [0, 1, 2], [1, 50, 2])
    with pytest.raises(ValueError, match=r"^Column 'label' holds integer labels up to 50, .*in split 'test', row 1;"):
        load_image_classification_dataset(source, label_column="label", cache_dir=tmp_path)
    # No label at all (-1 everywhere, as unlabelled copies mark them): no classes, and the first row is named.
    source = write_integer_label_dataset(tmp_path, [-1, -1], [-1])
    with pytest.raises(
        ValueError, match=r"^Label -1 in split 'train', row 0 \(column 'label'\) is outside the 0 classes"
    ):
        load_image_classification_dataset(source, label_column="label", cache_dir=tmp_path)
    source = write_integer_label_dataset(tmp_path, [0, 1, 50], [1, 2])
    with pytest.raises(ValueError, match=r"^Column 'label' holds integer labels up to 50, .*in split 'train', row 2;"):
        load_image_classification_dataset(source, label_column="label", cache_dir=tmp_path)


def test_out_of_range_labels_are_named_with_their_split_and_column(tmp_path):
    features = datasets.Features({"image": datasets.Image(), "label": class_label(2)})
    image = encode(np.zeros((2, 2), np.uint8))
    for split in ("train", "test"):
        rows = {"train": {"image": [image, image], "label": [0, 1]}, "test": {"image": [image], "label": [1]}}
        rows[split]["label"][0] = -1
        source = write_hub_dataset(tmp_path / split, features, rows)
        expected = rf"^Label -1 in split '{split}', row 0 \(column 'label'\) is outside the 2 classes"
        with pytest.raises(ValueError, match=expected):
            load_image_classification_dataset(str(source), cache_dir=tmp_path / "cache")


def _image_files(tmp_path, modes):
    paths = []
    for i, mode in enumerate(modes):
        path = tmp_path / f"{i}.png"
        PIL.Image.new(mode, (4, 4), 0 if mode == "L" else (0, 0, 0)).save(path)
        paths.append(str(path))
    return datasets.Dataset.from_dict({"image": paths}).cast_column("image", datasets.Image())


def test_channels_follow_the_declared_mode_else_the_majority_of_images(tmp_path):
    # Images stored as file paths (no bytes in the dataset) are opened from their files.
    assert decoding.detect_num_channels(_image_files(tmp_path, ["L", "L", "RGB"]), "image") == 1
    assert decoding.detect_num_channels(_image_files(tmp_path, ["L", "RGB"]), "image") == 3  # a tie: colour
    rgb = _image_files(tmp_path, ["RGB", "RGB"])
    assert decoding.detect_num_channels(rgb.cast_column("image", datasets.Image(mode="L")), "image") == 1
    gray = _image_files(tmp_path, ["L", "L"])
    assert decoding.detect_num_channels(gray.cast_column("image", datasets.Image(mode="RGB")), "image") == 3
    images = decoding.decode_images(
        gray, "image", "train", 1, decoding.Preparation(size=None, pad_to_square=False, num_channels=1)
    )
    assert images.shape == (2, 1, 4, 4) and images.dtype == torch.uint8


def test_a_preset_reads_its_own_test_split(tmp_path):
    # Food-101's test split is "validation": a copy that also has a "test" split is still evaluated on "validation".
    features = datasets.Features({"image": datasets.Image(), "label": class_label(2)})
    image = encode(np.zeros((4, 4, 3), np.uint8))
    rows = {split: {"image": [image] * n, "label": [0, 1, 0][:n]} for split, n in (("train", 2), ("validation", 3))}
    rows["test"] = {"image": [image], "label": [1]}
    source = write_hub_dataset(tmp_path / "food", features, rows)
    data = load_image_classification_dataset("food101", source=str(source), image_size=4, cache_dir=tmp_path)
    assert data.test_split == "validation" and len(data.test) == 3


def test_each_setting_the_pixels_depend_on_is_part_of_the_cache_key(tmp_path):
    features = datasets.Features({"image": datasets.Image(), "label": class_label(2)})
    rng = np.random.default_rng(7)

    def write():
        rows = {
            split: {
                "image": [encode(rng.integers(0, 256, (4, 8, 3), dtype=np.uint8)) for _ in range(2)],
                "label": [0, 1],
            }
            for split in ("train", "test")
        }
        return str(write_hub_dataset(tmp_path / "d", features, rows))

    source = write()
    cache = tmp_path / "cache"

    def load(**settings):
        return load_image_classification_dataset(source, image_size=4, cache_dir=cache, **settings).train.images

    plain = load()
    padded = load(pad_to_square=True)  # 4 x 8 images: padding to a square changes every resized pixel
    gray = load(num_channels=1)
    assert len(list(cache.glob("*.safetensors"))) == 3
    assert not torch.equal(padded, plain) and gray.shape[1] == 1 and torch.equal(load(), plain)


def test_a_relative_folder_name_loads_with_its_size(tmp_path, monkeypatch):
    # A folder named without a "/" is still a folder, not an unknown preset; sizes need not be square.
    features = datasets.Features({"image": datasets.Image(), "label": class_label(2)})
    image = encode(np.zeros((6, 6, 3), np.uint8))
    rows = {split: {"image": [image, image], "label": [0, 1]} for split in ("train", "test")}
    write_hub_dataset(tmp_path / "mydata", features, rows)
    monkeypatch.chdir(tmp_path)
    data = load_image_classification_dataset("mydata", image_size=(4, 6), cache_dir=tmp_path / "cache")
    assert data.train.images.shape[-2:] == (4, 6) and data.image_size == (4, 6)
    assert data.augmentation == AugmentationSettings.scaled_to((4, 6))
