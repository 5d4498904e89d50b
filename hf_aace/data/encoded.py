"""Encoded images decoded per item in DataLoader workers: RandomResizedCrop for training, centre crop for evaluation.

High-resolution recipes (ImageNet-style) crop a random region of the full stored image every epoch, which a cache of
images decoded once at a fixed size cannot give. [`EncodedImageSplit`] keeps a split's images as the Arrow table
stores them (encoded bytes, memory-mapped) and decodes one per `__getitem__`, so the Trainer's
`dataloader_num_workers` processes do the decoding:

- training: a RandomResizedCrop (a box covering a uniform fraction in `scale` of the image's area, with a log-uniform
  aspect ratio in `ratio`, at a uniform position; after 10 draws out of bounds, the centred largest box of an allowed
  aspect) resized to `size` x `size`, then a horizontal flip with probability 0.5;
- evaluation: the centre `size` x `size` of the image resized so that its shorter side is `size / 0.875` (256 for
  224), computed as one resize of the matching box of the stored image.

Images are opened with [`open_image`] (EXIF orientation included) and converted with [`prepare_image`], as the cached
path does; boxes are resized with PIL's bilinear filter (the filter of the cached path and of the saved image
processor; PIL widens it when shrinking, so downscaled crops are antialiased). Items are
`{"pixel_values": uint8 (C, size, size), "labels": int64 scalar}`, normalised on the device by
[`BatchAugmentation`] as the cached splits are.

The draws of item `index` come from a numpy generator seeded with `(seed, epoch, index)`: the same seed gives the
same crops whatever the number of workers or processes, and each epoch gets new ones. The epoch reaches the split
through `set_epoch`, which accelerate's DataLoader calls before each epoch; workers started before that call
(`dataloader_persistent_workers=True`) keep the epoch they started with.
"""

from __future__ import annotations

import math

import datasets
import numpy as np
import PIL.Image
import torch

from ..image_processing_aace import center_crop, prepare_image
from .decoding import _DECODE_ERRORS, open_image, undecodable

# The evaluation crop's side over the resized image's shorter side (224 of 256, the usual ImageNet evaluation).
CENTER_CROP_FRACTION = 0.875
# RandomResizedCrop draws a box this many times before falling back to the centred box.
_CROP_ATTEMPTS = 10


def random_resized_crop_box(
    width: int,
    height: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """Draws the box of a RandomResizedCrop in an image.

    Args:
        width: the image's width in pixels.
        height: the image's height in pixels.
        rng: the generator the draws come from.
        scale: bounds of the box's area as a fraction of the image's area.
        ratio: bounds of the box's aspect ratio (width / height); the ratio is drawn uniformly in log space.

    Returns:
        `(left, top, box_width, box_height)` in pixels, inside the image.
    """
    area = width * height
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(_CROP_ATTEMPTS):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_low, log_high))
        box_width = round(math.sqrt(target * aspect))
        box_height = round(math.sqrt(target / aspect))
        if 0 < box_width <= width and 0 < box_height <= height:
            left = int(rng.integers(0, width - box_width + 1))
            top = int(rng.integers(0, height - box_height + 1))
            return left, top, box_width, box_height
    # Every draw left the image (an image far outside the ratio bounds): its largest centred box of an allowed aspect.
    box_width, box_height = width, height
    if width / height < ratio[0]:
        box_height = min(height, max(1, round(width / ratio[0])))
    elif width / height > ratio[1]:
        box_width = min(width, max(1, round(height * ratio[1])))
    return (width - box_width) // 2, (height - box_height) // 2, box_width, box_height


class EncodedImageSplit(torch.utils.data.Dataset):
    """One split kept as encoded images, decoded and cropped per item (see the module docstring).

    Args:
        dataset: the split as `datasets` loaded it.
        column: its image column.
        labels: `(N,)` int64 labels, one per row.
        num_channels: 1 or 3; images of another mode are converted as [`prepare_image`] converts them.
        size: side of the square crops.
        train: RandomResizedCrop and flip (True) or the evaluation centre crop (False).
        seed: seed of the crop and flip draws.
        scale: area bounds of RandomResizedCrop, fractions of the image's area.
        ratio: aspect-ratio bounds of RandomResizedCrop (width / height).
        split: the split's name, for error messages.
    """

    def __init__(
        self,
        dataset: datasets.Dataset,
        column: str,
        labels: torch.Tensor,
        num_channels: int,
        size: int,
        *,
        train: bool,
        seed: int = 0,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        split: str = "train",
    ):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"The crop size must be a positive number of pixels, got {size!r}.")
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < low <= high <= 1 (fractions of the area), got {scale}.")
        if not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < low <= high (width / height), got {ratio}.")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}.")
        if labels.dtype != torch.int64 or labels.shape != (len(dataset),):
            raise ValueError(
                f"labels must be an int64 tensor with one label per image ({len(dataset)}), got {labels.dtype} of "
                f"shape {tuple(labels.shape)}."
            )
        self.dataset = dataset
        self.column = column
        self.labels = labels
        self.num_channels = num_channels
        self.size = size
        self.train = train
        self.seed = seed
        self.scale = tuple(scale)
        self.ratio = tuple(ratio)
        self.split = split
        self.epoch = 0
        # The stored bytes and path of each image, read per row without decoding.
        self._stored = dataset.select_columns([column]).cast_column(column, datasets.Image(decode=False))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        index = int(index)
        stored = self._stored[index][self.column]
        try:
            with open_image(stored["bytes"], stored["path"]) as opened:
                image = prepare_image(opened, self.num_channels)
                flip = False
                if self.train:
                    rng = np.random.default_rng((self.seed, self.epoch, index))
                    left, top, width, height = random_resized_crop_box(
                        image.width, image.height, rng, self.scale, self.ratio
                    )
                    flip = bool(rng.random() < 0.5)
                    image = image.resize(
                        (self.size, self.size),
                        PIL.Image.Resampling.BILINEAR,
                        box=(left, top, left + width, top + height),
                    )
                else:
                    # The saved image processor's centre crop, so that inference on raw images sees this evaluation.
                    image = center_crop(image, self.size, CENTER_CROP_FRACTION)
        except _DECODE_ERRORS as error:
            raise undecodable(error, self.split, index, self.column) from error
        pixels = np.asarray(image)
        pixels = pixels[:, :, None] if pixels.ndim == 2 else pixels
        if flip:
            pixels = pixels[:, ::-1]
        return {
            "pixel_values": torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1))),
            "labels": self.labels[index],
        }

    def set_epoch(self, epoch: int) -> None:
        """Selects the epoch whose draws the next items use (accelerate's DataLoader calls it every epoch)."""
        self.epoch = int(epoch)

    def with_labels(self, labels: torch.Tensor) -> EncodedImageSplit:
        """The same images with other labels (for example noisy ones), as a new split."""
        return self._replace(labels=labels)

    def for_evaluation(self) -> EncodedImageSplit:
        """The same items with the evaluation's centre crop (no random crop or flip), for evaluating on this split."""
        return self._replace(train=False)

    def _replace(self, **changes) -> EncodedImageSplit:
        settings = dict(
            dataset=self.dataset,
            column=self.column,
            labels=self.labels,
            num_channels=self.num_channels,
            size=self.size,
            train=self.train,
            seed=self.seed,
            scale=self.scale,
            ratio=self.ratio,
            split=self.split,
        )
        return EncodedImageSplit(**{**settings, **changes})
