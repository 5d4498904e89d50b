"""Tests of hf_aace.data.augmentation: distributions of the draws, exactness against a per-image reference, seeding."""

import logging

import numpy as np
import PIL.Image
import pytest
import torch

from hf_aace.data import AugmentationSettings, BatchAugmentation, augmentation_for, load_image_classification_dataset
from hf_aace.image_processing_aace import AACEImageProcessor

MEAN = (0.49, 0.48, 0.45)
STD = (0.25, 0.24, 0.26)


def cifar_augmentation(seed=0):
    return BatchAugmentation(MEAN, STD, seed=seed, crop_padding=4, flip=True, cutout_size=16, cutout_p=0.5)


def random_batch(batch_size=16, channels=3, height=32, width=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch_size, channels, height, width), dtype=torch.uint8, generator=generator)


def reference_augment(image, dy, dx, flip, cut, top, left, padding, cutout_size, mean, std):
    """The paper's chain for one (C, H, W) uint8 image with given draws, written with plain slicing."""
    channels, height, width = image.shape
    padded = np.zeros((channels, height + 2 * padding, width + 2 * padding), dtype=np.uint8)
    padded[:, padding : padding + height, padding : padding + width] = image.numpy()
    # torchvision's RandomCrop: the crop's top-left corner in the padded image is (padding + dy, padding + dx).
    out = padded[:, padding + dy : padding + dy + height, padding + dx : padding + dx + width]
    if flip:
        out = out[:, :, ::-1]
    out = torch.from_numpy(out.copy()).to(torch.float64) / 255
    out = ((out - torch.tensor(mean).view(-1, 1, 1)) / torch.tensor(std).view(-1, 1, 1)).to(torch.float32)
    if cut:
        out[:, max(0, top) : top + cutout_size, max(0, left) : left + cutout_size] = 0
    return out


@pytest.mark.parametrize(
    "settings, size",
    [
        ({"crop_padding": 4, "flip": True, "cutout_size": 16}, (32, 32)),  # CIFAR
        ({"crop_padding": 4, "flip": True, "cutout_size": 16}, (28, 20)),
        ({"crop_padding": None, "flip": True, "cutout_size": 16}, (32, 32)),  # Food101
        ({"crop_padding": None, "flip": False, "cutout_size": 16}, (28, 28)),  # Fashion-MNIST
        ({"crop_padding": 1, "flip": False, "cutout_size": 4}, (8, 8)),  # digits
    ],
)
def test_batched_equals_per_image_reference(settings, size):
    augmentation = BatchAugmentation(MEAN, STD, seed=3, **settings)
    images = random_batch(64, height=size[0], width=size[1])
    draws = augmentation.sample(64, *size, images.device)
    out = augmentation.apply(images, draws)
    assert out.dtype == torch.float32 and out.shape == images.shape
    assert (draws.shift is None) == (not settings["crop_padding"]) and (draws.flip is None) == (not settings["flip"])
    for i in range(64):
        dy, dx = draws.shift[i].tolist() if draws.shift is not None else (0, 0)
        top, left = draws.cutout_corner[i].tolist()
        flip = draws.flip is not None and bool(draws.flip[i])
        expected = reference_augment(
            images[i], dy, dx, flip, bool(draws.cutout[i]), top, left, 4, settings["cutout_size"], MEAN, STD
        )
        torch.testing.assert_close(out[i], expected, rtol=0, atol=1e-6)
        assert torch.equal(out[i] == 0, expected == 0)


def test_crop_pads_with_raw_zero_before_normalising():
    augmentation = BatchAugmentation(MEAN, STD, crop_padding=4, seed=0)
    images = torch.full((1, 3, 8, 8), 200, dtype=torch.uint8)
    draws = augmentation.sample(1, 8, 8, "cpu")
    draws.shift = torch.tensor([[4, -4]])
    out = augmentation.apply(images, draws)
    # Shifted by 4 rows down the image and 4 columns left: the bottom rows and left columns come from the padding.
    padding_value = (-torch.tensor(MEAN) / torch.tensor(STD)).view(3, 1, 1)
    torch.testing.assert_close(out[0, :, 4:, :], padding_value.expand(3, 4, 8))
    torch.testing.assert_close(out[0, :, :, :4], padding_value.expand(3, 8, 4))
    torch.testing.assert_close(out[0, :, :4, 4:], augmentation.normalize(images)[0, :, :4, :4])


def test_draw_distributions():
    augmentation = cifar_augmentation(seed=0)
    draws = augmentation.sample(90_000, 32, 32, "cpu")
    # Crop shifts uniform over [-4, 4]: Pearson chi-square over the 9 values (df 8; 0.1% critical value 26.1).
    for axis in range(2):
        counts = torch.bincount(draws.shift[:, axis] + 4, minlength=9).double()
        assert draws.shift[:, axis].min() == -4 and draws.shift[:, axis].max() == 4
        assert ((counts - 10_000) ** 2 / 10_000).sum() < 26.1
    # Cutout corners uniform over [-8, 23], so the centre is uniform over the image (df 31; 0.1% value 61.1).
    for axis in range(2):
        counts = torch.bincount(draws.cutout_corner[:, axis] + 8, minlength=32).double()
        assert counts.numel() == 32
        assert ((counts - counts.mean()) ** 2 / counts.mean()).sum() < 61.1
    assert abs(draws.flip.double().mean() - 0.5) < 0.01
    assert abs(draws.cutout.double().mean() - 0.5) < 0.01
    # Independence: the draws of one image do not predict its own other draws or the next image's.
    columns = torch.stack(
        [draws.shift[:, 0], draws.shift[:, 1], draws.flip, draws.cutout, draws.cutout_corner[:, 0]], dim=1
    ).double()
    correlation = torch.corrcoef(torch.cat([columns[1:], columns[:-1]], dim=1).T)
    off_diagonal = correlation - torch.eye(correlation.shape[0], dtype=torch.float64)
    assert off_diagonal.abs().max() < 0.02


def test_cutout_probability_and_square_size():
    augmentation = BatchAugmentation(MEAN, STD, cutout_size=16, cutout_p=0.25, seed=1)
    images = torch.full((4000, 3, 32, 32), 255, dtype=torch.uint8)
    zeros = (augmentation(images) == 0).all(dim=1).sum(dim=(1, 2))
    assert abs((zeros > 0).double().mean() - 0.25) < 0.03
    # Clipped at the borders: between 8x8 (centre in a corner) and 16x16 pixels.
    assert zeros[zeros > 0].min() >= 64 and zeros.max() == 256
    never = BatchAugmentation(MEAN, STD, cutout_size=16, cutout_p=0.0)
    assert not (never(images) == 0).any()


def test_seeding_and_resume(caplog):
    images = random_batch(32)
    first, same, other = cifar_augmentation(seed=42), cifar_augmentation(seed=42), cifar_augmentation(seed=43)
    out = first(images)
    assert torch.equal(out, same(images))
    assert not torch.equal(out, other(images))
    assert not torch.equal(first(images), out)

    state = first.state_dict()
    continued = [first(images) for _ in range(2)]
    resumed = cifar_augmentation(seed=42)
    resumed.load_state_dict(state)
    assert all(torch.equal(resumed(images), expected) for expected in continued)
    # Restoring into a generator that is already in use works too.
    same.load_state_dict(state)
    assert torch.equal(same(images), continued[0])
    with pytest.raises(ValueError, match="generator_states"):
        same.load_state_dict({"seed": 42})
    # A state saved on another device cannot continue here: say so rather than silently restarting.
    moved = cifar_augmentation(seed=42)
    moved.load_state_dict({"seed": 42, "generator_states": {"cuda:7": state["generator_states"]["cpu"]}})
    with caplog.at_level(logging.WARNING):
        assert torch.equal(moved(images), out)
    assert "starts a fresh stream" in caplog.text


def test_normalize_matches_image_processor():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    processor = AACEImageProcessor(size={"height": 32, "width": 32}, image_mean=list(MEAN), image_std=list(STD))
    expected = processor(PIL.Image.fromarray(rgb), return_tensors="pt")["pixel_values"]
    actual = BatchAugmentation(MEAN, STD).normalize(torch.from_numpy(rgb).permute(2, 0, 1)[None])
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-6)


def test_digits_normalize_matches_its_processor_and_defaults(tmp_path):
    data = load_image_classification_dataset("digits", cache_dir=tmp_path)
    assert data.augmentation == AugmentationSettings(crop_padding=1, flip=False, cutout_size=4, cutout_p=0.5)
    augmentation = augmentation_for(data, seed=5, cutout_p=1.0)
    assert (augmentation.crop_padding, augmentation.flip, augmentation.cutout_size) == (1, False, 4)
    assert augmentation.cutout_p == 1.0 and augmentation.mean == data.mean and augmentation.seed == 5
    assert data.augmentation.cutout_p == 0.5  # an override leaves the dataset's defaults alone
    switched = augmentation_for(data, crop_padding=0, flip=True, cutout_size=2)
    assert (switched.crop_padding, switched.flip, switched.cutout_size, switched.cutout_p) == (0, True, 2, 0.5)
    images = [PIL.Image.fromarray(image[0].numpy()) for image in data.test.images[:20]]
    expected = data.image_processor()(images, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(augmentation.normalize(data.test.images[:20]), expected, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match=r"Unknown augmentation settings \['crop_size'\].*'cutout_p'"):
        augmentation_for(data, crop_size=3)


def test_generic_augmentation_scales_the_cifar_recipe():
    cifar = AugmentationSettings(crop_padding=4, flip=True, cutout_size=16, cutout_p=0.5)
    assert AugmentationSettings.scaled_to((32, 32)) == cifar
    assert AugmentationSettings.scaled_to((64, 96)) == AugmentationSettings(8, True, 32, 0.5)
    assert AugmentationSettings.scaled_to((3, 40)) == AugmentationSettings(1, True, 1, 0.5)
    assert BatchAugmentation(MEAN, STD, **cifar.as_kwargs()).cutout_size == 16


def test_bad_inputs():
    augmentation = cifar_augmentation()
    # The message describes what was passed: dtype and shape, or the object itself.
    with pytest.raises(ValueError, match=r"uint8 tensor, got torch.float32 tensor of shape \(16, 3, 32, 32\)"):
        augmentation(random_batch().float())
    with pytest.raises(ValueError, match=r"uint8 tensor, got \[1, 2\]"):
        augmentation.normalize([1, 2])
    with pytest.raises(ValueError, match="channels"):
        augmentation(random_batch(channels=1))
    with pytest.raises(ValueError, match="one value per channel"):
        BatchAugmentation((0.5,), (0.2, 0.2))
    for std in ((0.2, 0.0, 0.2), (0.2, -0.1, 0.2)):  # zero too: dividing by it gives infinities
        with pytest.raises(ValueError, match="std must be positive"):
            BatchAugmentation(MEAN, std)
    # Sizes are non-negative whole pixels: negative, fractional and boolean values are refused by name.
    for name in ("crop_padding", "cutout_size"):
        for value in (-1, 1.5, True):
            with pytest.raises(ValueError, match=f"{name} must be a non-negative int"):
                BatchAugmentation(MEAN, STD, **{name: value})
    with pytest.raises(ValueError, match="cutout_p"):
        BatchAugmentation(MEAN, STD, cutout_size=4, cutout_p=1.5)


def test_repr_names_every_setting():
    assert repr(cifar_augmentation(seed=3)) == (
        f"BatchAugmentation(mean={MEAN}, std={STD}, crop_padding=4, flip=True, cutout_size=16, cutout_p=0.5, seed=3)"
    )
