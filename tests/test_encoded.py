"""Tests of hf_aace.data.encoded: RandomResizedCrop and centre crop of encoded images decoded per item (offline)."""

import io
import math

import datasets
import numpy as np
import PIL.ExifTags
import PIL.Image
import pytest
import torch

from hf_aace.data import EncodedImageSplit, load_image_classification_dataset
from hf_aace.data.encoded import CENTER_CROP_FRACTION, random_resized_crop_box
from hf_aace.image_processing_aace import center_crop

from hub_datasets import encode, write_hub_dataset


def encoded_split(images, size, train=True, seed=0, image_format="PNG"):
    """An EncodedImageSplit over in-memory images (uint8 arrays or stored `{"bytes", "path"}` dicts)."""
    column = [image if isinstance(image, dict) else encode(image, image_format) for image in images]
    dataset = datasets.Dataset.from_dict(
        {"image": column, "label": [0] * len(column)},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["x"])}),
    )
    labels = torch.zeros(len(column), dtype=torch.int64)
    return EncodedImageSplit(dataset, "image", labels, 3, size, train=train, seed=seed)


@pytest.mark.parametrize("width, height", [(500, 375), (64, 64), (300, 20)])
def test_random_resized_crop_box_stays_within_the_image_scale_and_ratio(width, height):
    rng = np.random.default_rng(0)
    areas, ratios = [], []
    for _ in range(300):
        left, top, box_width, box_height = random_resized_crop_box(width, height, rng)
        assert 0 <= left and left + box_width <= width and 0 <= top and top + box_height <= height
        areas.append(box_width * box_height / (width * height))
        ratios.append(box_width / box_height)
    # Rounding the sides to whole pixels moves area and ratio by at most about one pixel per side.
    slack = 2 / min(height, width) + 2 / math.sqrt(0.08 * width * height)
    assert min(areas) >= 0.08 - 4 * slack and max(areas) <= 1
    assert 3 / 4 * (1 - 2 * slack) <= min(ratios) and max(ratios) <= 4 / 3 * (1 + 2 * slack)
    if height > 100:
        assert max(areas) - min(areas) > 0.5  # the draws spread over the scale range, not a fixed box


def test_training_items_have_the_crop_size_and_follow_the_seed():
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (48, 64, 3), dtype=np.uint8) for _ in range(6)]
    split = encoded_split(images, 16, seed=3)
    first = torch.stack([split[i]["pixel_values"] for i in range(6)])
    assert first.shape == (6, 3, 16, 16) and first.dtype == torch.uint8
    again = torch.stack([encoded_split(images, 16, seed=3)[i]["pixel_values"] for i in range(6)])
    other_seed = torch.stack([encoded_split(images, 16, seed=4)[i]["pixel_values"] for i in range(6)])
    split.set_epoch(1)
    next_epoch = torch.stack([split[i]["pixel_values"] for i in range(6)])
    assert torch.equal(first, again)
    assert not torch.equal(first, other_seed) and not torch.equal(first, next_epoch)
    # Two DataLoader workers give the items that this process gives (draws depend on seed, epoch and index only).
    loader = torch.utils.data.DataLoader(split, batch_size=3, num_workers=2)
    assert torch.equal(torch.cat([batch["pixel_values"] for batch in loader]), next_epoch)


def test_evaluation_is_a_deterministic_centre_crop():
    # 64x48 image: the evaluation box is the centre 42.7 x 42.7 pixels (shorter side 48 resized to 18, crop 16).
    pixels = np.zeros((48, 64, 3), dtype=np.uint8)
    pixels[:, :, 2] = 255
    pixels[:, :9, 0] = 255  # red bands outside the centre box
    pixels[:, -9:, 0] = 255
    split = encoded_split([pixels], 16, train=False, seed=1)
    item = split[0]["pixel_values"]
    split.set_epoch(5)
    assert torch.equal(encoded_split([pixels], 16, train=False, seed=2)[0]["pixel_values"], item)
    assert torch.equal(split[0]["pixel_values"], item)
    assert item.shape == (3, 16, 16)
    assert item[0].max() == 0 and item[2].min() == 255  # the bands are cut off, nothing is flipped in
    # The training crops do reach the bands.
    training = encoded_split([pixels], 16, train=True)
    reds = []
    for epoch in range(20):
        training.set_epoch(epoch)
        reds.append(training[0]["pixel_values"][0].max().item())
    assert max(reds) > 0


def test_exif_orientation_is_applied_before_cropping():
    # Stored 40 wide, 20 tall with orientation 6 (rotate 90 degrees clockwise): shown 20 wide, 40 tall.
    stored = np.zeros((20, 40, 3), dtype=np.uint8)
    stored[:, 20:] = 255
    exif = PIL.Image.Exif()
    exif[PIL.ExifTags.Base.Orientation] = 6
    buffer = io.BytesIO()
    PIL.Image.fromarray(stored).save(buffer, format="PNG", exif=exif)
    upright = np.asarray(PIL.Image.fromarray(stored).transpose(PIL.Image.Transpose.ROTATE_270))
    assert upright.shape == (40, 20, 3)

    item = encoded_split([{"bytes": buffer.getvalue(), "path": None}], 8, train=False)[0]["pixel_values"]
    expected = encoded_split([upright], 8, train=False)[0]["pixel_values"]
    assert torch.equal(item, expected)
    assert item[:, :3].max() == 0 and item[:, -3:].min() == 255  # top half black, bottom half white


def test_loading_with_random_resized_crop_and_its_refusals(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets_cache"))
    rng = np.random.default_rng(2)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    sizes = [(30, 40), (50, 20), (24, 24)]
    splits = {
        split: {"image": [encode(rng.integers(0, 256, (*size, 3), dtype=np.uint8), "JPEG") for size in sizes],
                "label": [0, 1, 0]}
        for split in ("train", "test")
    }  # fmt: skip
    source = str(write_hub_dataset(tmp_path / "d", features, splits))

    data = load_image_classification_dataset(source, random_resized_crop=12, cache_dir=tmp_path / "cache")
    assert isinstance(data.train, EncodedImageSplit) and data.train.train and not data.test.train
    assert data.train[1]["pixel_values"].shape == (3, 12, 12) and data.image_size == (12, 12)
    assert (data.mean, data.std) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert (data.augmentation.crop_padding, data.augmentation.flip, data.augmentation.cutout_size) == (
        None,
        False,
        None,
    )
    assert not (tmp_path / "cache").exists()  # nothing decoded into a cache
    # Evaluating on the training split takes the centre crop, not the training draws.
    evaluated = data.train.for_evaluation()
    assert not evaluated.train and torch.equal(evaluated.labels, data.train.labels)
    raw = data.train.dataset.cast_column("image", datasets.Image(decode=False))[0]["image"]["bytes"]
    centre = center_crop(PIL.Image.open(io.BytesIO(raw)).convert("RGB"), 12, CENTER_CROP_FRACTION)
    assert torch.equal(evaluated[0]["pixel_values"], torch.from_numpy(np.asarray(centre)).permute(2, 0, 1))
    # The image processor saved with the model takes the evaluation's centre crop: inference on a raw image sees what
    # the evaluation saw (after the normalisation the device applies to the uint8 items).
    processor = data.image_processor()
    mean, std = torch.tensor(data.mean).view(3, 1, 1), torch.tensor(data.std).view(3, 1, 1)
    stored = data.test.dataset.cast_column("image", datasets.Image(decode=False))
    for row, item in enumerate(stored):
        raw = PIL.Image.open(io.BytesIO(item["image"]["bytes"]))
        expected = (data.test[row]["pixel_values"].float() / 255 - mean) / std
        got = processor(raw, return_tensors="pt")["pixel_values"][0]
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="image_size and pad_to_square do not apply"):
        load_image_classification_dataset(source, random_resized_crop=12, image_size=16, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="grayscale and has no fixed statistics.*num_channels=3"):
        load_image_classification_dataset("digits", random_resized_crop=8, cache_dir=tmp_path)
    rgb_digits = load_image_classification_dataset("digits", random_resized_crop=8, num_channels=3, cache_dir=tmp_path)
    assert rgb_digits.test[0]["pixel_values"].shape == (3, 8, 8)


def test_training_flips_half_the_items_horizontally():
    pixels = np.random.default_rng(5).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    split = encoded_split([pixels] * 40, 16)
    split.scale, split.ratio = (1.0, 1.0), (1.0, 1.0)  # the box is the whole image: only the flip changes it
    upright = torch.from_numpy(pixels).permute(2, 0, 1)
    flipped = [not torch.equal(split[i]["pixel_values"], upright) for i in range(40)]
    assert all(torch.equal(split[i]["pixel_values"], upright.flip(-1)) for i in range(40) if flipped[i])
    assert 8 <= sum(flipped) <= 32
