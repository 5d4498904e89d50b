"""Conversion of the AACE paper's reference checkpoints into hf_aace models.

The paper's reproduction code (T-Ratchatorn/AACE) saves `model.state_dict()` of its own WideResNet (an
`nn.Sequential` named `f` with keys such as `f.1_block.block.0.norm_act.0_normalization.weight`) and PyramidNet
(`conv1`, `layer1.0.bn1`, `bn_final`, `fc`, ...). [`convert_reference_checkpoint`] reads such a state dict, infers
the architecture's size from the tensors, builds the matching [`WideResNetForImageClassification`] or
[`PyramidNetForImageClassification`] with the paper's per-dataset input channels and pooling, renames every tensor
with an explicit mapping and loads them strictly. The weights are not changed: the converted model gives the
reference network's logits.
"""

import os
import pickle
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel
from transformers.utils import logging

from .data.loading import PRESETS
from .hub import CITATION, architecture_name
from .image_processing_aace import AACEImageProcessor
from .models import (
    PyramidNetConfig,
    PyramidNetForImageClassification,
    WideResNetConfig,
    WideResNetForImageClassification,
)

logger = logging.get_logger(__name__)

ARCHITECTURES = ("wide_resnet", "pyramidnet")

_CIFAR10_LABELS = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

# CIFAR-100 fine labels, in the dataset's (alphabetical) index order.
_CIFAR100_LABELS = (
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel "
    "can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur "
    "dolphin elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion "
    "lizard lobster man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree "
    "pear pickup_truck pine_tree plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea "
    "seal shark shrew skunk skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table tank "
    "telephone television tiger tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm"
).split()

_FASHION_MNIST_LABELS = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip

# The paper's code trains on torchvision's Food101, which numbers the classes in Python's sorted() order
# ("cheese_plate" before "cheesecake"); the display tuple in its data module swaps those two.
_FOOD101_LABELS = sorted(
    "apple_pie baby_back_ribs baklava beef_carpaccio beef_tartare beet_salad beignets bibimbap bread_pudding "
    "breakfast_burrito bruschetta caesar_salad cannoli caprese_salad carrot_cake ceviche cheese_plate "
    "cheesecake chicken_curry chicken_quesadilla chicken_wings chocolate_cake chocolate_mousse churros "
    "clam_chowder club_sandwich crab_cakes creme_brulee croque_madame cup_cakes deviled_eggs donuts dumplings "
    "edamame eggs_benedict escargots falafel filet_mignon fish_and_chips foie_gras french_fries "
    "french_onion_soup french_toast fried_calamari fried_rice frozen_yogurt garlic_bread gnocchi greek_salad "
    "grilled_cheese_sandwich grilled_salmon guacamole gyoza hamburger hot_and_sour_soup hot_dog "
    "huevos_rancheros hummus ice_cream lasagna lobster_bisque lobster_roll_sandwich macaroni_and_cheese "
    "macarons miso_soup mussels nachos omelette onion_rings oysters pad_thai paella pancakes panna_cotta "
    "peking_duck pho pizza pork_chop poutine prime_rib pulled_pork_sandwich ramen ravioli red_velvet_cake "
    "risotto samosa sashimi scallops seaweed_salad shrimp_and_grits spaghetti_bolognese spaghetti_carbonara "
    "spring_rolls steak strawberry_shortcake sushi tacos takoyaki tiramisu tuna_tartare waffles".split()
)


@dataclass(frozen=True)
class ReferenceDataset:
    """What the paper's code fixes per dataset: input format, pooling of each architecture, labels, normalisation.

    Attributes:
        name: canonical name (`cifar10`, `cifar100`, `fashionmnist`, `food101`).
        hub_id: the dataset's Hugging Face Hub id.
        num_channels: input channels of the stem convolution.
        image_size: side of the (square) network input.
        pooling_size: `{"wide_resnet": ..., "pyramidnet": ...}`: the fixed `AvgPool2d` window of each architecture,
            None for global pooling.
        labels: class names in label-index order.
        image_mean: per-channel normalisation mean.
        image_std: per-channel normalisation std.
        pad_to_square: whether images are zero-padded to a centred square before resizing.
        normalization_source: where `image_mean` and `image_std` come from, for the model card.
    """

    name: str
    hub_id: str
    num_channels: int
    image_size: int
    pooling_size: Mapping[str, int | None]
    labels: tuple[str, ...]
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]
    pad_to_square: bool
    normalization_source: str


_TRAINING_SET_STATS = (
    "the widely used per-channel mean and std over all training-set pixels, the statistics that the paper's code "
    "computes from the training set at run time"
)

_IMAGENET_STATS = "the ImageNet mean and std, as in the paper's code"


def _reference(
    name: str,
    preset: str,
    pooling_size: Mapping[str, int | None],
    labels: Sequence[str],
    image_mean: tuple[float, ...] | None = None,
    image_std: tuple[float, ...] | None = None,
) -> ReferenceDataset:
    """A dataset's conversion settings; Hub id, input format and any fixed statistics come from its data preset."""
    source = PRESETS[preset]
    return ReferenceDataset(
        name=name,
        hub_id=source.hub_id,
        num_channels=source.num_channels,
        image_size=source.image_size[0],
        pooling_size=pooling_size,
        labels=tuple(labels),
        image_mean=image_mean or source.mean,
        image_std=image_std or source.std,
        pad_to_square=source.pad_to_square,
        normalization_source=_TRAINING_SET_STATS if image_mean else _IMAGENET_STATS,
    )


REFERENCE_DATASETS: dict[str, ReferenceDataset] = {
    "cifar10": _reference(
        "cifar10",
        "cifar10",
        {"wide_resnet": 8, "pyramidnet": 8},
        _CIFAR10_LABELS,
        (0.4914, 0.4822, 0.4465),
        (0.2470, 0.2435, 0.2616),
    ),
    "cifar100": _reference(
        "cifar100",
        "cifar100",
        {"wide_resnet": 8, "pyramidnet": 8},
        _CIFAR100_LABELS,
        (0.5071, 0.4865, 0.4409),
        (0.2673, 0.2564, 0.2762),
    ),
    # The paper's WideResNet pools a fixed 4x4 window of the 7x7 map (its top-left corner); its PyramidNet pools
    # globally.
    "fashionmnist": _reference(
        "fashionmnist",
        "fashion_mnist",
        {"wide_resnet": 4, "pyramidnet": None},
        _FASHION_MNIST_LABELS,
        (0.2860,),
        (0.3530,),
    ),
    "food101": _reference("food101", "food101", {"wide_resnet": None, "pyramidnet": None}, _FOOD101_LABELS),
}

_DATASET_ALIASES = {"fashion_mnist": "fashionmnist", "fashion-mnist": "fashionmnist"}

# Keys under which training scripts commonly nest the state dict in a saved dict.
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net")

_BN_BUFFERS = "weight|bias|running_mean|running_var|num_batches_tracked"


def get_reference_dataset(dataset: str) -> ReferenceDataset:
    """Returns the paper's settings for a dataset name (`fashion_mnist` is accepted for `fashionmnist`).

    Raises:
        ValueError: for an unknown name.
    """
    key = _DATASET_ALIASES.get(dataset.strip().lower(), dataset.strip().lower()) if isinstance(dataset, str) else None
    if key not in REFERENCE_DATASETS:
        raise ValueError(
            f"Unknown dataset {dataset!r}; pass one of {sorted(REFERENCE_DATASETS)} (or 'fashion_mnist'), the dataset "
            "the checkpoint was trained on."
        )
    return REFERENCE_DATASETS[key]


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
    """Names the reference architecture whose key layout `state_dict` has: `wide_resnet` or `pyramidnet`.

    Raises:
        ValueError: if the keys match neither layout.
    """
    if "f.0_convolution.weight" in state_dict:
        return "wide_resnet"
    if "conv1.weight" in state_dict and "layer1.0.bn1.weight" in state_dict:
        return "pyramidnet"
    raise ValueError(
        f"Unknown key layout (first keys: {list(state_dict)[:5]}): expected the paper's WideResNet "
        "('f.0_convolution.weight', ...) or PyramidNet ('conv1.weight', 'layer1.0.bn1.weight', ...)."
    )


# Within one WideResNet unit: the reference's module path -> hf_aace's WideResNetLayer attribute. The downsampling
# unit and the basic units use different Sequential indices, so one table serves both.
_WIDE_RESNET_UNIT_MODULES = {
    "norm_act.0_normalization": "norm1",  # downsampling unit: BN-ReLU shared by both branches
    "block.0_convolution": "conv1",
    "block.1_normalization": "norm2",
    "block.4_convolution": "conv2",
    "downsample": "shortcut",
    "block.0_normalization": "norm1",  # basic unit
    "block.2_convolution": "conv1",
    "block.3_normalization": "norm2",
    "block.6_convolution": "conv2",
}
_WIDE_RESNET_UNIT = re.compile(rf"f\.([123])_block\.block\.(\d+)\.(.+)\.({_BN_BUFFERS})")
_WIDE_RESNET_TOP = {
    "f.0_convolution": "wide_resnet.embedder",
    "f.4_normalization": "wide_resnet.norm",
    "f.8_classification": "classifier",
}


def wide_resnet_key(reference_key: str) -> str | None:
    """Maps a key of the paper's WideResNet state dict to hf_aace's, or returns None for a key it does not know."""
    unit = _WIDE_RESNET_UNIT.fullmatch(reference_key)
    if unit:
        stage, index, module, tensor = unit.groups()
        target = _WIDE_RESNET_UNIT_MODULES.get(module)
        if target is None:
            return None
        return f"wide_resnet.encoder.stages.{int(stage) - 1}.layers.{index}.{target}.{tensor}"
    module, _, tensor = reference_key.rpartition(".")
    return f"{_WIDE_RESNET_TOP[module]}.{tensor}" if module in _WIDE_RESNET_TOP else None


_PYRAMIDNET_UNIT = re.compile(rf"layer([123])\.(\d+)\.(bn[1-4]|conv[1-3])\.({_BN_BUFFERS})")
_PYRAMIDNET_TOP = {
    "conv1": "pyramidnet.embedder.conv",
    "bn1": "pyramidnet.embedder.norm",
    "bn_final": "pyramidnet.norm",
    "fc": "classifier",
}


def pyramidnet_key(reference_key: str) -> str | None:
    """Maps a key of the paper's PyramidNet state dict to hf_aace's, or returns None for a key it does not know."""
    unit = _PYRAMIDNET_UNIT.fullmatch(reference_key)
    if unit:
        stage, index, module, tensor = unit.groups()
        # bn1..bn4 -> norm1..norm4; conv1..conv3 keep their names.
        module = module.replace("bn", "norm")
        return f"pyramidnet.encoder.stages.{int(stage) - 1}.layers.{index}.{module}.{tensor}"
    module, _, tensor = reference_key.rpartition(".")
    return f"{_PYRAMIDNET_TOP[module]}.{tensor}" if module in _PYRAMIDNET_TOP else None


def _tensor(state_dict: Mapping[str, torch.Tensor], key: str, architecture: str, ndim: int) -> torch.Tensor:
    if key not in state_dict or state_dict[key].ndim != ndim:
        found = tuple(state_dict[key].shape) if key in state_dict else "missing"
        raise ValueError(
            f"Cannot infer the {architecture} size: {key!r} should be a {ndim}-d tensor, found {found}. Is this a "
            "checkpoint of the paper's reproduction code?"
        )
    return state_dict[key]


def _units_per_stage(state_dict: Mapping[str, torch.Tensor], prefix: str) -> int:
    indices = {int(match.group(1)) for key in state_dict if (match := re.match(rf"{re.escape(prefix)}(\d+)\.", key))}
    return max(indices) + 1 if indices else 0


def _label_kwargs(
    state_dict: Mapping[str, torch.Tensor], key: str, architecture: str, dataset: ReferenceDataset
) -> dict[str, dict]:
    num_labels = _tensor(state_dict, key, architecture, 2).shape[0]
    if num_labels != len(dataset.labels):
        raise ValueError(
            f"The checkpoint's classifier ({key!r}) has {num_labels} outputs but {dataset.name} has "
            f"{len(dataset.labels)} classes; pass the dataset the checkpoint was trained on."
        )
    return {
        "id2label": dict(enumerate(dataset.labels)),
        "label2id": {label: index for index, label in enumerate(dataset.labels)},
    }


def _check_channels(stem: torch.Tensor, dataset: ReferenceDataset) -> None:
    if stem.shape[1] != dataset.num_channels:
        raise ValueError(
            f"The checkpoint's stem convolution takes {stem.shape[1]} input channels but {dataset.name} images have "
            f"{dataset.num_channels}; pass the dataset the checkpoint was trained on."
        )


def wide_resnet_config_from_state_dict(
    state_dict: Mapping[str, torch.Tensor], dataset: ReferenceDataset
) -> WideResNetConfig:
    """Builds the [`WideResNetConfig`] of a reference WideResNet state dict trained on `dataset`."""
    stem = _tensor(state_dict, "f.0_convolution.weight", "wide_resnet", 4)
    _check_channels(stem, dataset)
    units = _units_per_stage(state_dict, "f.1_block.block.")
    width = _tensor(state_dict, "f.1_block.block.0.block.0_convolution.weight", "wide_resnet", 4).shape[0]
    if width % 16:
        raise ValueError(f"The first stage is {width} channels wide, expected a multiple of 16 (16 x widen factor).")
    return WideResNetConfig(
        depth=6 * (units - 1) + 4,
        widen_factor=width // 16,
        num_channels=dataset.num_channels,
        pooling_size=dataset.pooling_size["wide_resnet"],
        **_label_kwargs(state_dict, "f.8_classification.weight", "wide_resnet", dataset),
    )


def pyramidnet_config_from_state_dict(
    state_dict: Mapping[str, torch.Tensor], dataset: ReferenceDataset
) -> PyramidNetConfig:
    """Builds the [`PyramidNetConfig`] of a reference PyramidNet state dict trained on `dataset`."""
    stem = _tensor(state_dict, "conv1.weight", "pyramidnet", 4)
    _check_channels(stem, dataset)
    units = _units_per_stage(state_dict, "layer1.")
    bottleneck = "layer1.0.conv3.weight" in state_dict
    # Widths ramp from 16 by alpha / (3n) per unit, so the last unit's 3x3 convolution is 16 + alpha wide.
    last_width = _tensor(state_dict, f"layer3.{units - 1}.conv2.weight", "pyramidnet", 4).shape[0]
    return PyramidNetConfig(
        depth=(9 if bottleneck else 6) * units + 2,
        alpha=last_width - 16,
        bottleneck=bottleneck,
        num_channels=dataset.num_channels,
        pooling_size=dataset.pooling_size["pyramidnet"],
        **_label_kwargs(state_dict, "fc.weight", "pyramidnet", dataset),
    )


_CONVERTERS = {
    "wide_resnet": (wide_resnet_config_from_state_dict, WideResNetForImageClassification, wide_resnet_key),
    "pyramidnet": (pyramidnet_config_from_state_dict, PyramidNetForImageClassification, pyramidnet_key),
}


def _listing(keys: list[str], limit: int = 5) -> str:
    return ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def convert_reference_checkpoint(
    checkpoint: str | os.PathLike | Mapping, dataset: str, architecture: str | None = None
) -> PreTrainedModel:
    """Converts a checkpoint of the AACE paper's reproduction code into an hf_aace model.

    Args:
        checkpoint: path of a `.pth`/`.pt` file written by `torch.save(model.state_dict(), ...)`, or the state dict
            (also nested under `state_dict`/`model`, with or without a `module.` prefix).
        dataset: the dataset the checkpoint was trained on: `cifar10`, `cifar100`, `fashionmnist` (or
            `fashion_mnist`) or `food101`. It fixes the input channels, the pooling (the paper's code uses a fixed
            `AvgPool2d` window on CIFAR and on Fashion-MNIST with WideResNet, global pooling otherwise) and the labels.
        architecture: `wide_resnet` or `pyramidnet`; None infers it from the keys.

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
    reference = get_reference_dataset(dataset)
    state_dict = load_reference_state_dict(checkpoint)
    if architecture is not None and architecture not in _CONVERTERS:
        raise ValueError(
            f"Unknown architecture {architecture!r}; pass one of {list(ARCHITECTURES)} or None to infer it."
        )
    inferred = infer_architecture(state_dict)
    if architecture not in (None, inferred):
        raise ValueError(
            f"architecture={architecture!r} but the keys are those of the paper's {inferred}; "
            "pass architecture=None to infer it."
        )
    architecture = inferred
    config_from_state_dict, model_class, map_key = _CONVERTERS[architecture]
    config = config_from_state_dict(state_dict, reference)
    model = model_class(config)

    # hf_aace key -> (reference key, tensor); errors name the reference keys, which the user can find in the file.
    converted: dict[str, tuple[str, torch.Tensor]] = {}
    unexpected = []
    for key, tensor in state_dict.items():
        target = map_key(key)
        if target is None or target in converted:
            unexpected.append(key)
        else:
            converted[target] = (key, tensor)
    expected = model.state_dict()
    unexpected += [key for target, (key, _) in converted.items() if target not in expected]
    missing = [key for key in expected if key not in converted]
    summary = f"{architecture} (depth {config.depth}) that the checkpoint's first tensors describe"
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
    """The [`AACEImageProcessor`] reproducing the paper's test-time preprocessing for `dataset`."""
    reference = get_reference_dataset(dataset)
    return AACEImageProcessor(
        num_channels=reference.num_channels,
        do_pad_to_square=reference.pad_to_square,
        size={"height": reference.image_size, "width": reference.image_size},
        image_mean=list(reference.image_mean),
        image_std=list(reference.image_std),
    )


def conversion_model_card(model: PreTrainedModel, dataset: str, source: str, repo_id: str | None = None) -> str:
    """Writes the README.md of a converted reference checkpoint.

    Args:
        model: the model returned by [`convert_reference_checkpoint`].
        dataset: the dataset it was converted for.
        source: where the original checkpoint came from (its file name or URL), as given by the user.
        repo_id: the Hub id the model is pushed to, used in the usage snippet; None uses a local path.

    Returns:
        The model card as Markdown with a YAML header.
    """
    reference = get_reference_dataset(dataset)
    config = model.config
    pooling = f"AvgPool2d({config.pooling_size})" if config.pooling_size else "global average pooling"
    size = reference.image_size
    location = repo_id or "path/to/this/folder"
    return f"""---
library_name: transformers
pipeline_tag: image-classification
tags:
- hf_aace
- aace
- sharpness-aware-minimization
- converted
datasets:
- {reference.hub_id}
---

# {architecture_name(model.config)} on {reference.name}, converted from the AACE paper's code

Converted, not retrained: these are the weights of the checkpoint `{source}`, written by the reproduction code of
Ratchatorn & Tanaka, "Adaptive Adversarial Cross-Entropy Loss for Sharpness-Aware Minimization" (ICIP 2024,
[arXiv 2406.14329](https://arxiv.org/abs/2406.14329), code: https://github.com/T-Ratchatorn/AACE). Each tensor was
renamed into hf_aace's `{type(model).__name__}` and loaded strictly;
no value was changed. The conversion does not tell how the checkpoint was trained (SGD, SAM or AACE) nor how
accurate it is: evaluate it before relying on it.

## Architecture

- {architecture_name(model.config)}, {config.num_labels} classes, {config.num_channels} input channel(s), {pooling}
  before the classifier, as the paper's code builds it for {reference.name}.
- Input: {size}x{size} images.

## Preprocessing

The saved `AACEImageProcessor` converts images to {config.num_channels} channel(s),
{"zero-pads them to a centred square, " if reference.pad_to_square else ""}resizes them to {size}x{size}, scales
them to [0, 1] and normalises them with mean {list(reference.image_mean)} and std {list(reference.image_std)}:
{reference.normalization_source}.

## Usage

```python
from transformers import AutoImageProcessor, AutoModelForImageClassification

processor = AutoImageProcessor.from_pretrained("{location}", trust_remote_code=True)
model = AutoModelForImageClassification.from_pretrained("{location}", trust_remote_code=True)
logits = model(**processor(image, return_tensors="pt")).logits
```

## Citation

```bibtex
{CITATION}
```
"""


__all__ = [
    "REFERENCE_DATASETS",
    "ReferenceDataset",
    "conversion_model_card",
    "convert_reference_checkpoint",
    "get_reference_dataset",
    "infer_architecture",
    "load_reference_state_dict",
    "pyramidnet_config_from_state_dict",
    "pyramidnet_key",
    "reference_image_processor",
    "wide_resnet_config_from_state_dict",
    "wide_resnet_key",
]
