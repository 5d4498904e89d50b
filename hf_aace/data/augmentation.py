"""Batched, on-device training augmentation: the paper's per-image transform chain as a handful of tensor ops.

The reproduction code augments each PIL image on the CPU (torchvision `RandomCrop(size, padding=4)`,
`RandomHorizontalFlip()`, `ToTensor()`, `Normalize(mean, std)`, then davda54/sam's `Cutout(size=16, p=0.5)`).
[`BatchAugmentation`] draws the same random quantities for a whole uint8 batch at once, on the batch's own device,
and applies them without a Python loop over images:

1. crop: a zero-padded random crop of the input size, i.e. a shift of each image by (dy, dx), both uniform over
   [-padding, padding]; the padding is zero in raw pixel values, as torchvision pads the PIL image;
2. flip: horizontal, with probability 0.5;
3. scale to [0, 1] and normalise with the per-channel mean and std;
4. cutout: with probability `cutout_p`, a `cutout_size` x `cutout_size` square whose top-left corner is uniform over
   [-size // 2, side - size // 2 - 1] in each axis (so its centre is uniform over the image), clipped at the borders
   and filled with zeros in the normalised domain.

Every image gets its own draws. Crop and flip are a single row gather on the uint8 batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from transformers.utils import logging

from .presets import AugmentationSettings

if TYPE_CHECKING:
    from .loading import ImageClassificationData

logger = logging.get_logger(__name__)


@dataclass
class AugmentationDraws:
    """The random quantities of one augmented batch, one row per image.

    Attributes:
        shift: `(B, 2)` int64 crop shifts (dy, dx) in [-crop_padding, crop_padding]; output pixel (y, x) is input
            pixel (y + dy, x + dx), zero outside the image. None when cropping is off.
        flip: `(B,)` bool, True where the image is mirrored horizontally. None when flipping is off.
        cutout: `(B,)` bool, True where a square is cut out. None when cutout is off.
        cutout_corner: `(B, 2)` int64 (top, left) of the cutout square before clipping, in
            [-cutout_size // 2, side - cutout_size // 2 - 1]. None when cutout is off.
    """

    shift: torch.Tensor | None = None
    flip: torch.Tensor | None = None
    cutout: torch.Tensor | None = None
    cutout_corner: torch.Tensor | None = None


class BatchAugmentation:
    """The paper's training augmentation for whole uint8 batches, run on the batch's device.

    Calling the object augments a training batch; [`~BatchAugmentation.normalize`] only scales and normalises (the
    evaluation transform, equal to [`AACEImageProcessor`]'s output for the same uint8 image to within 1e-6).

    Random draws come from one `torch.Generator` per device, created on first use and seeded with `seed`. In
    distributed training pass `seed + process_index` so that ranks draw different augmentations. The generator states
    are saved by [`~BatchAugmentation.state_dict`], so a resumed run continues the same random stream.

    Args:
        mean: per-channel mean of the training images in [0, 1].
        std: per-channel standard deviation, same length as `mean`.
        crop_padding: zero padding of the random crop in pixels (the crop has the input's size); None or 0 disables it.
        flip: mirror each image horizontally with probability 0.5.
        cutout_size: side of the Cutout square in pixels; None or 0 disables it.
        cutout_p: probability that an image gets a Cutout square.
        seed: seed of the random generators.

    Example:
    ```python
    >>> import torch
    >>> from hf_aace.data import BatchAugmentation
    >>> augment = BatchAugmentation((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), crop_padding=4, flip=True, cutout_size=16)
    >>> augment(torch.zeros(8, 3, 32, 32, dtype=torch.uint8)).shape
    torch.Size([8, 3, 32, 32])
    ```
    """

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        crop_padding: int | None = None,
        flip: bool = False,
        cutout_size: int | None = None,
        cutout_p: float = 0.5,
        seed: int = 0,
    ):
        if len(mean) != len(std) or len(mean) == 0:
            raise ValueError(
                f"mean and std need one value per channel, got {len(mean)} and {len(std)} values; pass sequences of "
                "the same length (1 for grayscale, 3 for RGB)."
            )
        if any(s <= 0 for s in std):
            raise ValueError(f"std must be positive, got {tuple(std)}.")
        for name, value in (("crop_padding", crop_padding), ("cutout_size", cutout_size)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"{name} must be a non-negative int or None (off), got {value!r}.")
        if not 0.0 <= cutout_p <= 1.0:
            raise ValueError(f"cutout_p is a probability: pass a value in [0, 1], got {cutout_p}.")
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.crop_padding = crop_padding or 0
        self.flip = bool(flip)
        self.cutout_size = cutout_size or 0
        self.cutout_p = float(cutout_p)
        self.seed = int(seed)
        self._generators: dict[str, torch.Generator] = {}
        self._pending_states: dict[str, torch.Tensor] = {}
        self._affines: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(mean={self.mean}, std={self.std}, crop_padding={self.crop_padding}, "
            f"flip={self.flip}, cutout_size={self.cutout_size}, cutout_p={self.cutout_p}, seed={self.seed})"
        )

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Augments a training batch.

        Args:
            images: `(B, C, H, W)` uint8 batch, on any device.

        Returns:
            The augmented, normalised float32 batch on the same device.
        """
        self._check_batch(images)
        batch, _, height, width = images.shape
        return self.apply(images, self.sample(batch, height, width, images.device))

    def sample(self, batch_size: int, height: int, width: int, device: torch.device | str) -> AugmentationDraws:
        """Draws the random quantities of one batch from this device's generator.

        Args:
            batch_size: number of images.
            height: image height in pixels.
            width: image width in pixels.
            device: device of the batch (and of the returned tensors).

        Returns:
            The draws; [`~BatchAugmentation.apply`] turns them into the augmented batch.
        """
        generator = self._generator(torch.device(device))
        device = generator.device
        draws = AugmentationDraws()
        if self.crop_padding:
            pad = self.crop_padding
            draws.shift = torch.randint(-pad, pad + 1, (batch_size, 2), generator=generator, device=device)
        if self.flip:
            draws.flip = torch.rand(batch_size, generator=generator, device=device) < 0.5
        if self.cutout_size:
            half = self.cutout_size // 2
            draws.cutout = torch.rand(batch_size, generator=generator, device=device) < self.cutout_p
            top = torch.randint(-half, height - half, (batch_size,), generator=generator, device=device)
            left = torch.randint(-half, width - half, (batch_size,), generator=generator, device=device)
            draws.cutout_corner = torch.stack((top, left), dim=1)
        return draws

    def apply(self, images: torch.Tensor, draws: AugmentationDraws) -> torch.Tensor:
        """Applies given draws to a uint8 batch: crop and flip, then normalisation, then cutout.

        Args:
            images: `(B, C, H, W)` uint8 batch.
            draws: the output of [`~BatchAugmentation.sample`] for this batch's shape and device.

        Returns:
            The augmented, normalised float32 batch.
        """
        self._check_batch(images)
        images = self._crop_and_flip(images, draws.shift, draws.flip)
        out = self.normalize(images)
        if draws.cutout is not None:
            _, _, height, width = images.shape
            top, left = draws.cutout_corner.unbind(1)
            rows = torch.arange(height, device=images.device)
            cols = torch.arange(width, device=images.device)
            in_rows = (rows >= top[:, None]) & (rows < top[:, None] + self.cutout_size) & draws.cutout[:, None]
            in_cols = (cols >= left[:, None]) & (cols < left[:, None] + self.cutout_size)
            square = in_rows.to(out.dtype)[:, None, :, None] * in_cols.to(out.dtype)[:, None, None, :]
            # out - out * square: exactly +0.0 inside the square, untouched outside; twice as fast as masked_fill_.
            out.addcmul_(out, square, value=-1)
        return out

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """Scales a uint8 batch to [0, 1] and normalises it, with no augmentation (the evaluation transform).

        Computes `(pixels / 255 - mean) / std` as one multiply-add in float32 with constants rounded from float64; it
        matches [`AACEImageProcessor`] (which rounds after each of its three operations) to within 1e-6.

        Args:
            images: `(B, C, H, W)` uint8 batch.

        Returns:
            The normalised float32 batch on the same device.
        """
        self._check_batch(images)
        scale, shift = self._affine(images.device)
        return images.to(torch.float32).mul_(scale).add_(shift)

    def manual_seed(self, seed: int) -> None:
        """Restarts every random stream from `seed` (the trainer passes `args.seed + process_index`)."""
        self.seed = int(seed)
        self._generators.clear()
        self._pending_states.clear()

    def state_dict(self) -> dict[str, Any]:
        """Returns the seed and the state of every device generator created so far (and any not yet restored)."""
        states = dict(self._pending_states)
        states.update({key: generator.get_state() for key, generator in self._generators.items()})
        return {"seed": self.seed, "generator_states": states}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores the generator states saved by [`~BatchAugmentation.state_dict`].

        A state is restored into the generator of the device it was saved on, now or when that generator is first used.

        Args:
            state_dict: the saved state.
        """
        if set(state_dict) != {"seed", "generator_states"}:
            raise ValueError(
                "Expected the output of BatchAugmentation.state_dict(), with keys 'seed' and 'generator_states'; "
                f"got keys {sorted(state_dict)}."
            )
        if state_dict["seed"] != self.seed:
            logger.warning(
                f"Restoring augmentation generators saved with seed {state_dict['seed']} into an augmentation built "
                f"with seed {self.seed}; the restored streams continue the saved run."
            )
        self.seed = int(state_dict["seed"])
        self._pending_states = {}
        for key, state in state_dict["generator_states"].items():
            if key in self._generators:
                self._generators[key].set_state(state)
            else:
                self._pending_states[key] = state

    def _generator(self, device: torch.device) -> torch.Generator:
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        key = str(device)
        if key not in self._generators:
            generator = torch.Generator(device=device)
            generator.manual_seed(self.seed)
            if key in self._pending_states:
                generator.set_state(self._pending_states.pop(key))
            elif self._pending_states:
                logger.warning(
                    f"The restored augmentation state holds generators for {sorted(self._pending_states)}, not {key}; "
                    f"augmentation on {key} starts a fresh stream from seed {self.seed}."
                )
            self._generators[key] = generator
        return self._generators[key]

    def _affine(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel `scale` and `shift` with `pixels * scale + shift == (pixels / 255 - mean) / std`."""
        if device not in self._affines:
            mean = torch.tensor(self.mean, dtype=torch.float64)
            std = torch.tensor(self.std, dtype=torch.float64)
            scale = (1 / (255 * std)).to(device=device, dtype=torch.float32).view(-1, 1, 1)
            shift = (-mean / std).to(device=device, dtype=torch.float32).view(-1, 1, 1)
            self._affines[device] = (scale, shift)
        return self._affines[device]

    def _check_batch(self, images: torch.Tensor) -> None:
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4:
            description = (
                f"{images.dtype} tensor of shape {tuple(images.shape)}" if torch.is_tensor(images) else images
            )
            raise ValueError(
                f"Expected a (batch, channels, height, width) uint8 tensor, got {description}; pass the raw "
                "`pixel_values` of the hf_aace datasets, not normalised floats."
            )
        if images.shape[1] != len(self.mean):
            raise ValueError(
                f"The batch has {images.shape[1]} channels but mean/std have {len(self.mean)}; build the augmentation "
                "from the statistics of the dataset being trained on."
            )

    def _crop_and_flip(
        self, images: torch.Tensor, shift: torch.Tensor | None, flip: torch.Tensor | None
    ) -> torch.Tensor:
        """Shifted, optionally mirrored copy of a uint8 batch; pixels shifted in from outside the image are 0.

        The batch is zero-padded once, next to a mirrored copy when flipping. Every output row is then a contiguous
        run of `width` bytes somewhere in that buffer, so one `index_select` over a sliding-window view of the
        buffer gathers whole rows (several times faster than a per-pixel gather).
        """
        if shift is None and flip is None:
            return images
        batch, channels, height, width = images.shape
        pad = self.crop_padding if shift is not None else 0
        padded_height, padded_width = height + 2 * pad, width + 2 * pad
        buffer = images.new_zeros((1 if flip is None else 2, batch, channels, padded_height, padded_width))
        buffer[0, :, :, pad : pad + height, pad : pad + width] = images
        device = images.device
        source = torch.arange(batch, device=device)
        top = torch.full((batch,), pad, device=device)
        left = torch.full((batch,), pad, device=device)
        if shift is not None:
            top = top + shift[:, 0]
            left = left + shift[:, 1]
        if flip is not None:
            buffer[1, :, :, pad : pad + height, pad : pad + width] = images.flip(-1)
            # Mirroring the crop of the padded image at column `left` equals cropping the mirrored padded image at
            # column padded_width - width - left.
            source = torch.where(flip, source + batch, source)
            left = torch.where(flip, padded_width - width - left, left)
        rows = (source[:, None] * channels + torch.arange(channels, device=device))[:, :, None] * padded_height
        rows = rows + top[:, None, None] + torch.arange(height, device=device)
        starts = (rows * padded_width + left[:, None, None]).view(-1)
        flat = buffer.view(-1)
        windows = flat.as_strided((flat.numel() - width + 1, width), (1, 1))
        return windows.index_select(0, starts).view(batch, channels, height, width)


def augmentation_for(data: ImageClassificationData, seed: int = 0, **overrides: Any) -> BatchAugmentation:
    """Builds the training augmentation of a loaded dataset: its default settings and its mean/std.

    Args:
        data: the output of [`load_image_classification_dataset`].
        seed: seed of the random generators; pass `seed + process_index` in distributed training.
        **overrides: fields of [`AugmentationSettings`] (`crop_padding`, `flip`, `cutout_size`, `cutout_p`) replacing
            the dataset's default.

    Returns:
        The configured [`BatchAugmentation`].
    """
    names = [f.name for f in dataclasses.fields(AugmentationSettings)]
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        raise ValueError(f"Unknown augmentation settings {unknown}; the settings are {names}.")
    settings = dataclasses.replace(data.augmentation, **overrides)
    return BatchAugmentation(data.mean, data.std, seed=seed, **settings.as_kwargs())
