"""Image processor saved with every hf_aace model.

It turns a PIL image (or an H x W (x C) uint8 array) into the normalised tensor the model was trained on: colour mode
fixed to the model's channel count, optionally padded to a square with zeros and resized (the paper's Food101
preprocessing), scaled to [0, 1] and normalised with the training set's per-channel mean and std. The training data
pipeline decodes images with `prepare_image` from this file, so `pipeline("image-classification")` sees exactly what
evaluation saw. Only PIL, numpy and transformers are imported: the file travels with pushed models as remote code.
"""

import numpy as np
import PIL.Image
from transformers.image_processing_backends import PilBackend
from transformers.image_processing_utils import BatchFeature
from transformers.processing_utils import ImagesKwargs

_MODES = {1: "L", 3: "RGB"}
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")


class AACEImageProcessorKwargs(ImagesKwargs, total=False):
    """Extra keyword arguments of [`AACEImageProcessor`].

    num_channels (`int`): 1 (grayscale) or 3 (RGB); images are converted to this mode first.
    do_pad_to_square (`bool`): pad to a centred square with zeros before resizing.
    center_crop_fraction (`float`): resize so that the shorter side is `round(size / fraction)`, then take the centre
        `size` x `size` (the evaluation of models trained on encoded images with RandomResizedCrop; 0.875 gives 224
        of 256); None resizes the whole image to `size`.
    """

    num_channels: int
    do_pad_to_square: bool
    center_crop_fraction: float | None


def prepare_image(
    image: PIL.Image.Image, num_channels: int, size: tuple[int, int] | None = None, pad_to_square: bool = False
) -> PIL.Image.Image:
    """Converts a PIL image to the model's colour mode, then optionally pads it to a square and resizes it.

    Args:
        image: the decoded image, any PIL mode; 16-bit grayscale is scaled to 8 bits, not clipped.
        num_channels: 1 for grayscale ("L"), 3 for RGB.
        size: `(height, width)` to resize to with bilinear filtering, or None to keep the image's size. Images that
            already have this size are left untouched.
        pad_to_square: pad the shorter side with zeros, centred, before resizing (the paper's Food101 pipeline).

    Returns:
        The prepared PIL image.
    """
    if num_channels not in _MODES:
        raise ValueError(f"num_channels must be 1 or 3, got {num_channels}.")
    mode = _MODES[num_channels]
    if image.mode in _SIXTEEN_BIT_MODES:
        # PIL's convert clips 16-bit grayscale at 255; scale 0..65535 to 0..255 instead (x / 257, rounded).
        pixels = (np.asarray(image).astype(np.uint32) + 128) // 257
        image = PIL.Image.fromarray(pixels.astype(np.uint8))
    if image.mode != mode:
        # RGBA and palette images lose their alpha channel here, as PIL's convert does for "RGB".
        image = image.convert(mode)
    if pad_to_square and image.width != image.height:
        side = max(image.width, image.height)
        canvas = PIL.Image.new(mode, (side, side), 0)
        canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
        image = canvas
    if size is not None and (image.height, image.width) != tuple(size):
        image = image.resize((size[1], size[0]), PIL.Image.Resampling.BILINEAR)
    return image


def center_crop_box(width: int, height: int, size: int, fraction: float) -> tuple[float, float, float, float]:
    """The box of an image that becomes its centre crop: resizing the image so that its shorter side is
    `round(size / fraction)` and taking the centre `size` x `size` equals resizing this (square, sub-pixel) box to
    `size` x `size`.

    Returns:
        `(left, top, box_width, box_height)` in the image's pixels.
    """
    side = size * min(width, height) / round(size / fraction)
    return (width - side) / 2, (height - side) / 2, side, side


def center_crop(image: PIL.Image.Image, size: int, fraction: float) -> PIL.Image.Image:
    """The `size` x `size` centre crop of `image` resized so that its shorter side is `round(size / fraction)`, in one
    bilinear resize of the matching box."""
    left, top, width, height = center_crop_box(image.width, image.height, size, fraction)
    return image.resize((size, size), PIL.Image.Resampling.BILINEAR, box=(left, top, left + width, top + height))


class AACEImageProcessor(PilBackend):
    """Image processor of the hf_aace WideResNet and PyramidNet models.

    Example:
    ```python
    >>> from hf_aace import AACEImageProcessor
    >>> processor = AACEImageProcessor(
    ...     size={"height": 32, "width": 32}, image_mean=[0.49, 0.48, 0.45], image_std=[0.25, 0.24, 0.26]
    ... )
    >>> processor(images, return_tensors="pt")["pixel_values"].shape  # doctest: +SKIP
    torch.Size([1, 3, 32, 32])
    ```
    """

    valid_kwargs = AACEImageProcessorKwargs
    model_input_names = ["pixel_values"]
    num_channels = 3
    do_pad_to_square = False
    center_crop_fraction = None
    do_resize = True
    size = {"height": 32, "width": 32}
    resample = PIL.Image.Resampling.BILINEAR
    do_rescale = True
    do_normalize = True
    image_mean = [0.5, 0.5, 0.5]
    image_std = [0.5, 0.5, 0.5]

    def process_image(
        self,
        image,
        num_channels=None,
        do_pad_to_square=None,
        do_resize=None,
        size=None,
        center_crop_fraction=None,
        **kwargs,
    ):
        """Converts one input image to a channels-first uint8 array, prepared as the training data was."""
        if isinstance(image, np.ndarray) or hasattr(image, "numpy"):
            array = np.asarray(image)
            if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
                array = np.moveaxis(array, 0, -1)
            image = PIL.Image.fromarray(array.squeeze(-1) if array.ndim == 3 and array.shape[-1] == 1 else array)
        if not isinstance(image, PIL.Image.Image):
            raise ValueError(f"Expected a PIL image, numpy array or torch tensor, got {type(image).__name__}.")
        target = (size.height, size.width) if do_resize and size is not None else None
        if center_crop_fraction is not None and target is not None:
            if target[0] != target[1]:
                raise ValueError(f"center_crop_fraction needs a square size, got {target[0]}x{target[1]}.")
            image = center_crop(prepare_image(image, num_channels), target[0], center_crop_fraction)
        else:
            image = prepare_image(image, num_channels, target, bool(do_pad_to_square))
        array = np.asarray(image)
        return array[None] if array.ndim == 2 else np.moveaxis(array, -1, 0)

    def _preprocess(
        self, images, do_rescale, rescale_factor, do_normalize, image_mean, image_std, return_tensors, **kwargs
    ) -> BatchFeature:
        processed = []
        for image in images:
            image = image.astype(np.float32)
            if do_rescale:
                image = image * np.float32(rescale_factor)
            if do_normalize:
                mean = np.asarray(image_mean, dtype=np.float32).reshape(-1, 1, 1)
                std = np.asarray(image_std, dtype=np.float32).reshape(-1, 1, 1)
                image = (image - mean) / std
            processed.append(image)
        return BatchFeature(data={"pixel_values": processed}, tensor_type=return_tensors)


__all__ = ["AACEImageProcessor", "prepare_image"]
