"""Conversion of the AACE paper's reference checkpoints into hf_aace models.

The paper's reproduction code (T-Ratchatorn/AACE) saves `model.state_dict()` of its own WideResNet and PyramidNet.
[`convert_reference_checkpoint`] reads such a state dict, finds the architecture whose converter (the
`convert_*.py` module beside each model, listed in the architecture table) recognises its keys, lets it infer the
size and the dataset's input channels, pooling and labels, renames every tensor and loads them strictly. The weights
are not changed: the converted model gives the reference network's logits.
"""

import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from transformers import PreTrainedModel
from transformers.utils import logging

from .hub import architecture_name
from .image_processing_aace import AACEImageProcessor
from .models.architectures import ARCHITECTURES, Architecture
from .models.conversion_utils import reference_preset

logger = logging.get_logger(__name__)

# Keys under which training scripts commonly nest the state dict in a saved dict.
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net")


def load_reference_state_dict(checkpoint: str | os.PathLike | Mapping) -> dict[str, torch.Tensor]:
    """Reads a reference checkpoint into a flat state dict.

    Args:
        checkpoint: a `.pth`/`.pt` file written by `torch.save(model.state_dict(), ...)`, or the state dict itself.
            A dict nesting the state dict under `state_dict`, `model_state_dict`, `model` or `net` is unwrapped, and a
            `module.` prefix (left by `nn.DataParallel`) is removed.

    Returns:
        The state dict, keys as the reference network names them.

    Raises:
        FileNotFoundError: if the path does not exist.
        ValueError: if the path is a folder, or the file cannot be read as a PyTorch checkpoint or does not hold a dict
            of tensors.
    """
    if isinstance(checkpoint, (str, os.PathLike)):
        path = Path(checkpoint)
        if path.is_dir():
            found = sorted(p.name for p in path.iterdir() if p.suffix in (".pth", ".pt"))
            raise ValueError(
                f"{str(path)!r} is a folder; pass the checkpoint file itself"
                + (f" (it holds {', '.join(found)})." if found else ", a .pth/.pt file.")
            )
        if not path.is_file():
            raise FileNotFoundError(f"Checkpoint file {str(path)!r} does not exist.")
        try:
            # weights_only: a checkpoint is data; never run the pickled code of a downloaded file.
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # torch.load raises pickle, zip and runtime errors alike for foreign files
            # torch's own message for pickled objects advises weights_only=False, which this function never uses.
            unsupported = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
            if isinstance(error, pickle.UnpicklingError) and unsupported:
                raise ValueError(
                    f"{str(path)!r} is not a plain state dict (it holds a {unsupported.group(1)} object): it pickles "
                    "objects, e.g. a whole model saved with torch.save(model), and loading it would run their code. "
                    "Where the paper's code is installed, re-save it with torch.save(model.state_dict(), path), then "
                    "convert that."
                ) from error
            reason = str(error).split(". ")[0]
            raise ValueError(
                f"Cannot read {str(path)!r} as a PyTorch checkpoint ({type(error).__name__}: {reason}); the file is "
                "truncated or not written by torch.save. Pass the file torch.save(model.state_dict(), path) wrote."
            ) from error
        origin = repr(str(path))
    else:
        loaded, origin = checkpoint, "the given object"
    if not isinstance(loaded, Mapping):
        raise ValueError(f"{origin} holds a {type(loaded).__name__}, expected a state dict (a dict of tensors).")
    for wrapper in _WRAPPER_KEYS:
        if wrapper in loaded and isinstance(loaded[wrapper], Mapping):
            loaded = loaded[wrapper]
            break
    not_tensors = [key for key, value in loaded.items() if not isinstance(value, torch.Tensor)]
    if not loaded or not_tensors:
        raise ValueError(
            f"{origin} is not a state dict of tensors: found {len(loaded)} entries, non-tensor ones "
            f"{not_tensors[:5]}. Expected what torch.save(model.state_dict(), path) writes."
        )
    state_dict = {str(key): value for key, value in loaded.items()}
    if all(key.startswith("module.") for key in state_dict):
        state_dict = {key[len("module.") :]: value for key, value in state_dict.items()}
    return state_dict


def infer_architecture(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Names the architecture whose reference key layout `state_dict` has, e.g. `wide_resnet` or `pyramidnet`.

    Raises:
        ValueError: if no architecture's converter recognises the keys.
    """
    for architecture in ARCHITECTURES.values():
        if architecture.converter.is_reference_layout(state_dict):
            return architecture.name
    layouts = " or ".join(architecture.converter.LAYOUT for architecture in ARCHITECTURES.values())
    raise ValueError(f"Unknown key layout (first keys: {list(state_dict)[:5]}): expected the paper's {layouts}.")


def _listing(keys: list[str], limit: int = 5) -> str:
    return ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def _checked_architecture(state_dict: Mapping[str, torch.Tensor], architecture: str | None) -> Architecture:
    if architecture is not None and architecture not in ARCHITECTURES:
        raise ValueError(
            f"Unknown architecture {architecture!r}; pass one of {list(ARCHITECTURES)} or None to infer it."
        )
    inferred = infer_architecture(state_dict)
    if architecture not in (None, inferred):
        raise ValueError(
            f"architecture={architecture!r} but the keys are those of the paper's {inferred}; "
            "pass architecture=None to infer it."
        )
    return ARCHITECTURES[inferred]


def convert_reference_checkpoint(
    checkpoint: str | os.PathLike | Mapping, dataset: str, architecture: str | None = None
) -> PreTrainedModel:
    """Converts a checkpoint of the AACE paper's reproduction code into an hf_aace model.

    Args:
        checkpoint: path of a `.pth`/`.pt` file written by `torch.save(model.state_dict(), ...)`, or the state dict
            (also nested under `state_dict`/`model`, with or without a `module.` prefix).
        dataset: the dataset the checkpoint was trained on: a convertible preset (`cifar10`, `cifar100`,
            `fashion_mnist` or `food101`) or an alias such as the paper's `fashionmnist`. It fixes the input channels,
            the pooling (the paper's code uses a fixed `AvgPool2d` window on CIFAR and on Fashion-MNIST with
            WideResNet, global pooling otherwise) and the labels.
        architecture: an architecture name (`wide_resnet` or `pyramidnet`); None infers it from the keys.

    Returns:
        A [`WideResNetForImageClassification`] or [`PyramidNetForImageClassification`] in eval mode, whose depth,
        width and number of labels are read from the tensors.

    Raises:
        ValueError: if the checkpoint is not a state dict of the expected layout, a key is missing or unexpected, a
            tensor does not fit, or the dataset is unknown or does not match the checkpoint.

    Example:
    ```python
    >>> from hf_aace import convert_reference_checkpoint
    >>> model = convert_reference_checkpoint("wrn28_10_cifar100.pth", dataset="cifar100")  # doctest: +SKIP
    >>> model.save_pretrained("wrn-28-10-cifar100-aace")  # doctest: +SKIP
    ```
    """
    preset = reference_preset(dataset)
    state_dict = load_reference_state_dict(checkpoint)
    arch = _checked_architecture(state_dict, architecture)
    config = arch.converter.config_from_state_dict(state_dict, preset)
    model = arch.model_class(config)

    # hf_aace key -> (reference key, tensor); errors name the reference keys, which the user can find in the file.
    converted: dict[str, tuple[str, torch.Tensor]] = {}
    unexpected = []
    for key, tensor in state_dict.items():
        target = arch.converter.rename_key(key)
        if target is None or target in converted:
            unexpected.append(key)
        else:
            converted[target] = (key, tensor)
    expected = model.state_dict()
    unexpected += [key for target, (key, _) in converted.items() if target not in expected]
    missing = [key for key in expected if key not in converted]
    summary = f"{arch.name} (depth {config.depth}) that the checkpoint's first tensors describe"
    if unexpected or missing:
        raise ValueError(
            f"The checkpoint does not match the paper's {summary}: "
            + (f"unexpected keys {_listing(unexpected)}; " if unexpected else "")
            + (f"missing tensors (hf_aace names) {_listing(missing)}; " if missing else "")
            + "pass a complete, unmodified state dict of the paper's code."
        )
    mismatched = [
        f"{key} {tuple(tensor.shape)} (expected {tuple(expected[target].shape)})"
        for target, (key, tensor) in converted.items()
        if tensor.shape != expected[target].shape
    ]
    if mismatched:
        raise ValueError(
            f"Tensors do not fit the paper's {summary}: {_listing(mismatched)}; pass an unmodified state dict of the "
            "paper's code."
        )
    model.load_state_dict({target: tensor for target, (_, tensor) in converted.items()}, strict=True)
    model.eval()
    logger.info(
        "Converted %d tensors of a reference checkpoint into %s.", len(converted), architecture_name(model.config)
    )
    return model


def reference_image_processor(dataset: str) -> AACEImageProcessor:
    """The [`AACEImageProcessor`] reproducing the paper's test-time preprocessing for `dataset` (a preset or alias)."""
    preset = reference_preset(dataset)
    height, width = preset.image_size
    return AACEImageProcessor(
        num_channels=preset.num_channels,
        do_pad_to_square=preset.pad_to_square,
        size={"height": height, "width": width},
        image_mean=list(preset.reference_mean),
        image_std=list(preset.reference_std),
    )


__all__ = [
    "convert_reference_checkpoint",
    "infer_architecture",
    "load_reference_state_dict",
    "reference_image_processor",
]
