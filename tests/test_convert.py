"""Tests of hf_aace.convert and scripts/convert_reference_checkpoint.py against re-implemented reference networks."""

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, ModelCard
from transformers import AutoModelForImageClassification, PreTrainedModel

from hf_aace.convert import convert_reference_checkpoint, infer_architecture, reference_image_processor
from hf_aace.data.presets import PRESETS, get_preset, preset_names
from hf_aace.hub import build_conversion_card
from hf_aace.models import ARCHITECTURES

from local_hub import dead_endpoint
from reference_networks import REFERENCE_POOLING, build_reference_network, randomize_

REPO_ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = REPO_ROOT.parent / "shared" / "reference" / "checkpoint_layouts.txt"

# id, architecture, dataset, network kwargs, labels, input side, section of checkpoint_layouts.txt (None: not listed).
CASES = [
    (
        "wrn16-2-cifar10",
        "wide_resnet",
        "cifar10",
        {"depth": 16, "widen_factor": 2},
        10,
        32,
        "wide_resnet depth=16 width=2 dataset=cifar10 (3 channels, 10 labels)",
    ),
    (
        "wrn16-2-fashionmnist",
        "wide_resnet",
        "fashionmnist",
        {"depth": 16, "widen_factor": 2},
        10,
        28,
        "wide_resnet depth=16 width=2 dataset=fashionmnist (1 channel, 10 labels)",
    ),
    (
        "pyramidnet20-48-basic-cifar100",
        "pyramidnet",
        "cifar100",
        {"depth": 20, "alpha": 48},
        100,
        32,
        "pyramidnet depth=20 alpha=48 basic dataset=cifar100 (3 channels, 100 labels)",
    ),
    (
        "pyramidnet29-48-bottleneck-cifar10",
        "pyramidnet",
        "cifar10",
        {"depth": 29, "alpha": 48, "bottleneck": True},
        10,
        32,
        "pyramidnet depth=29 alpha=48 bottleneck dataset=cifar10 (3 channels, 10 labels)",
    ),
    (
        "pyramidnet20-48-basic-fashionmnist",
        "pyramidnet",
        "fashionmnist",
        {"depth": 20, "alpha": 48},
        10,
        28,
        "pyramidnet depth=20 alpha=48 basic dataset=fashionmnist (1 channel, 10 labels)",
    ),
    ("wrn10-1-food101", "wide_resnet", "food101", {"depth": 10, "widen_factor": 1}, 101, 32, None),
    (
        "pyramidnet11-12-bottleneck-food101",
        "pyramidnet",
        "food101",
        {"depth": 11, "alpha": 12, "bottleneck": True},
        101,
        32,
        None,
    ),
]
LISTED = [case for case in CASES if case[-1] is not None]


def _reference(architecture: str, dataset: str, kwargs: dict, num_labels: int, seed: int = 0) -> torch.nn.Module:
    return randomize_(build_reference_network(architecture, dataset, num_labels, **kwargs), seed).eval()


def _inputs(dataset: str, side: int, seed: int = 1) -> torch.Tensor:
    channels = get_preset(dataset).num_channels
    return torch.randn(3, channels, side, side, generator=torch.Generator().manual_seed(seed))


def _parse_layouts(text: str) -> dict[str, list[tuple[str, tuple[int, ...]]]]:
    sections, current = {}, None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), [])
        else:
            key, shape = re.fullmatch(r"(\S+) (\(.*\))", line).groups()
            current.append((key, tuple(ast.literal_eval(shape))))
    return sections


@pytest.fixture(scope="module")
def small_reference() -> torch.nn.Module:
    return _reference("wide_resnet", "cifar10", {"depth": 10, "widen_factor": 1}, 10)


@pytest.fixture
def small_checkpoint(small_reference: torch.nn.Module, tmp_path: Path) -> Path:
    path = tmp_path / "wrn10_1_cifar10.pth"
    torch.save(small_reference.state_dict(), path)
    return path


@pytest.mark.skipif(not LAYOUTS.is_file(), reason=f"{LAYOUTS} is absent (the CI checks out ../shared beside the repo)")
def test_layouts_file_lists_the_tested_instances():
    assert set(_parse_layouts(LAYOUTS.read_text())) == {case[-1] for case in LISTED}


@pytest.mark.skipif(not LAYOUTS.is_file(), reason=f"{LAYOUTS} is absent (the CI checks out ../shared beside the repo)")
@pytest.mark.parametrize("case", LISTED, ids=[case[0] for case in LISTED])
def test_reference_networks_have_the_papers_state_dict_layout(case):
    _, architecture, dataset, kwargs, num_labels, _, layout = case
    network = build_reference_network(architecture, dataset, num_labels, **kwargs)
    actual = [(key, tuple(tensor.shape)) for key, tensor in network.state_dict().items()]
    assert actual == _parse_layouts(LAYOUTS.read_text())[layout]


@pytest.mark.parametrize("case", CASES, ids=[case[0] for case in CASES])
def test_converted_model_gives_the_reference_logits(case, tmp_path):
    _, architecture, dataset, kwargs, num_labels, side, _ = case
    reference = _reference(architecture, dataset, kwargs, num_labels)
    path = tmp_path / "checkpoint.pth"
    torch.save(reference.state_dict(), path)

    model = convert_reference_checkpoint(path, dataset)

    assert isinstance(model, PreTrainedModel) and not model.training
    config = model.config
    assert config.model_type == f"aace_{architecture}"
    assert (config.depth, config.num_labels) == (kwargs["depth"], num_labels)
    assert config.num_channels == get_preset(dataset).num_channels
    assert config.pooling_size == REFERENCE_POOLING[architecture][dataset]
    if architecture == "wide_resnet":
        assert config.widen_factor == kwargs["widen_factor"]
    else:
        assert (config.alpha, config.bottleneck) == (kwargs["alpha"], kwargs.get("bottleneck", False))
    assert config.id2label[0] == get_preset(dataset).label_names[0]
    assert config.label2id == {name: index for index, name in enumerate(get_preset(dataset).label_names)}
    pixels = _inputs(dataset, side)
    with torch.no_grad():
        expected = reference(pixels)
        logits = model(pixels).logits
    assert expected.std() > 1.0  # random BN statistics: the comparison is not between near-constant outputs
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


def test_wrapped_dataparallel_state_dict_and_aliases(small_reference):
    state_dict = {"state_dict": {f"module.{key}": tensor for key, tensor in small_reference.state_dict().items()}}
    model = convert_reference_checkpoint(state_dict, "CIFAR10", architecture="wide_resnet")
    pixels = _inputs("cifar10", 32)
    with torch.no_grad():
        torch.testing.assert_close(model(pixels).logits, small_reference(pixels), atol=1e-4, rtol=1e-4)

    reference = _reference("pyramidnet", "fashionmnist", {"depth": 8, "alpha": 6}, 10)
    model = convert_reference_checkpoint({"model": reference.state_dict()}, "fashion_mnist")
    assert model.config.num_channels == 1 and model.config.id2label[9] == "Ankle boot"


def test_label_names():
    counts = {name: len(PRESETS[name].label_names) for name in preset_names(convertible=True)}
    assert counts == {"cifar10": 10, "cifar100": 100, "fashion_mnist": 10, "food101": 101}
    for name in counts:
        assert len(set(PRESETS[name].label_names)) == len(PRESETS[name].label_names)
    # torchvision's Food101 (used by the paper's code) numbers classes in sorted() order, as CIFAR-100 is.
    food = PRESETS["food101"].label_names
    assert food[16:18] == ("cheese_plate", "cheesecake") and food[-1] == "waffles"
    assert list(PRESETS["cifar100"].label_names) == sorted(PRESETS["cifar100"].label_names)


def test_converters_pool_as_the_paper_for_every_convertible_dataset():
    # REFERENCE_POOLING is the reference networks' own table, keyed by the paper's dataset names.
    for name, architecture in ARCHITECTURES.items():
        paper = {get_preset(dataset).name: size for dataset, size in REFERENCE_POOLING[name].items()}
        assert architecture.converter.POOLING_SIZES == paper, name
        assert list(architecture.converter.POOLING_SIZES) == preset_names(convertible=True), name


def test_a_dataset_without_pooling_entry_names_the_convertible_ones(monkeypatch):
    reference = _reference("wide_resnet", "food101", {"depth": 10, "widen_factor": 1}, 101)
    monkeypatch.delitem(ARCHITECTURES["wide_resnet"].converter.POOLING_SIZES, "food101")
    with pytest.raises(ValueError, match=r"no wide_resnet for food101; pass one of \['cifar10', 'cifar100', 'fashion"):
        convert_reference_checkpoint(reference.state_dict(), "food101")


def test_unknown_or_unconvertible_dataset_lists_the_convertible_presets(small_reference):
    for dataset in ("imagenet", "digits"):  # digits is a preset, but the paper's code never trains on it
        with pytest.raises(ValueError, match=rf"Unknown dataset '{dataset}'; pass one of") as error:
            convert_reference_checkpoint(small_reference.state_dict(), dataset)
        assert "'fashion_mnist'" in str(error.value) and "'fashionmnist'" in str(error.value)
        # Only the datasets whose checkpoints convert are suggested.
        assert "pass one of ['cifar10', 'cifar100', 'fashion_mnist', 'food101'] (or an alias" in str(error.value)
    with pytest.raises(ValueError, match="Unknown dataset"):
        reference_image_processor("digits")


SMALL_SIZES = {"wide_resnet": {"depth": 10, "widen_factor": 1}, "pyramidnet": {"depth": 8, "alpha": 6}}


@pytest.mark.parametrize(
    ("architecture", "key", "ndim"),
    [
        ("wide_resnet", "f.8_classification.weight", 2),
        ("wide_resnet", "f.0_convolution.weight", 4),
        ("wide_resnet", "f.1_block.block.0.block.0_convolution.weight", 4),
        ("pyramidnet", "fc.weight", 2),
        ("pyramidnet", "conv1.weight", 4),
        ("pyramidnet", "layer3.0.conv2.weight", 4),
    ],
)
def test_a_missing_or_misshapen_size_tensor_is_named(architecture, key, ndim):
    reference = dict(_reference(architecture, "cifar10", SMALL_SIZES[architecture], 10).state_dict())
    named = rf"^Cannot infer the {architecture} size: {re.escape(repr(key))} should be a {ndim}-d tensor, found "
    if key not in ("f.0_convolution.weight", "conv1.weight"):  # without these the layout itself is unknown
        state_dict = {k: v for k, v in reference.items() if k != key}
        with pytest.raises(ValueError, match=named + "missing"):
            convert_reference_checkpoint(state_dict, "cifar10")
    state_dict = dict(reference, **{key: torch.zeros(16, 3, 1)})
    with pytest.raises(ValueError, match=named + r"\(16, 3, 1\)"):
        convert_reference_checkpoint(state_dict, "cifar10")


def test_infer_architecture_recognises_each_reference_layout():
    for name in ARCHITECTURES:
        kwargs = {"depth": 10, "widen_factor": 1} if name == "wide_resnet" else {"depth": 8, "alpha": 6}
        assert infer_architecture(build_reference_network(name, "cifar10", 10, **kwargs).state_dict()) == name


def _imported_modules(path: Path) -> set[str]:
    """The absolute names of the modules a source file imports (relative imports resolved against its package)."""
    package = ".".join(path.relative_to(REPO_ROOT).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(part for part in (base, node.module) if part)
            names.update([module, *(f"{module}.{alias.name}" for alias in node.names)])
    return names


@pytest.mark.parametrize(
    "path",
    [
        "hf_aace/convert.py",
        "hf_aace/models/conversion_utils.py",
        "hf_aace/models/wide_resnet/convert_wide_resnet.py",
        "hf_aace/models/pyramidnet/convert_pyramidnet.py",
    ],
)
def test_conversion_reads_the_presets_not_the_data_pipeline(path):
    imported = _imported_modules(REPO_ROOT / path)
    assert "hf_aace.data.loading" not in imported
    assert not {"datasets", "PIL"} & {name.split(".")[0] for name in imported}
    # Not the package itself either: hf_aace.data's __init__ imports the pipeline.
    assert "hf_aace.data" not in imported
    assert all(name.startswith("hf_aace.data.presets") for name in imported if name.startswith("hf_aace.data."))


def test_conversion_card_metadata_and_text(small_reference):
    model = convert_reference_checkpoint(small_reference.state_dict(), "cifar10")
    card = build_conversion_card(model, "cifar10", "wrn10_1_cifar10.pth", repo_id="someone/wrn-10-1-cifar10")
    assert isinstance(card, ModelCard)
    assert card.data.tags == ["hf_aace", "aace", "sharpness-aware-minimization", "converted"]
    assert card.data.datasets == ["uoft-cs/cifar10"]
    assert (card.data.pipeline_tag, card.data.library_name) == ("image-classification", "transformers")
    assert "# WRN-10-1 on cifar10, converted from the AACE paper's code" in card.text
    assert "`wrn10_1_cifar10.pth`" in card.text and "AvgPool2d(8)" in card.text
    assert 'from_pretrained("someone/wrn-10-1-cifar10", trust_remote_code=True)' in card.text
    assert "mean [0.4914, 0.4822, 0.4465]" in card.text


def test_not_a_checkpoint_file(tmp_path):
    path = tmp_path / "random.pth"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(ValueError, match="Cannot read .* as a PyTorch checkpoint"):
        convert_reference_checkpoint(path, "cifar10")

    torch.save([torch.zeros(1)], path)
    with pytest.raises(ValueError, match="holds a list, expected a state dict"):
        convert_reference_checkpoint(path, "cifar10")

    torch.save({"weight": torch.zeros(1), "epoch": 3}, path)
    with pytest.raises(ValueError, match=r"non-tensor ones \['epoch'\]"):
        convert_reference_checkpoint(path, "cifar10")

    torch.save({"encoder.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="Unknown key layout .*encoder.weight"):
        convert_reference_checkpoint(path, "cifar10")

    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert_reference_checkpoint(tmp_path / "absent.pth", "cifar10")


def test_missing_and_unexpected_keys(small_reference):
    state_dict = dict(small_reference.state_dict())
    del state_dict["f.2_block.block.1.block.3_normalization.running_var"]
    with pytest.raises(ValueError, match=r"missing tensors .*stages\.1\.layers\.1\.norm2\.running_var"):
        convert_reference_checkpoint(state_dict, "cifar10")

    for architecture, extra in (("wide_resnet", "f.9_extra.weight"), ("pyramidnet", "head.weight")):
        reference = _reference(architecture, "cifar10", SMALL_SIZES[architecture], 10).state_dict()
        state_dict = dict(reference, **{extra: torch.zeros(2)})
        with pytest.raises(ValueError, match=rf"unexpected keys {re.escape(extra)}"):
            convert_reference_checkpoint(state_dict, "cifar10")


def test_a_stem_alone_is_no_reference_layout():
    # A torchvision-style "conv1.weight" without the paper's PyramidNet units is neither of the paper's layouts.
    with pytest.raises(ValueError, match="Unknown key layout"):
        infer_architecture({"conv1.weight": torch.zeros(16, 3, 3, 3), "fc.weight": torch.zeros(10, 16)})


def test_tensor_of_wrong_shape(small_reference):
    state_dict = dict(small_reference.state_dict())
    state_dict["f.2_block.block.1.block.2_convolution.weight"] = torch.zeros(32, 32, 1, 1)
    with pytest.raises(ValueError, match=r"f\.2_block\.block\.1\.block\.2_convolution\.weight \(32, 32, 1, 1\) "):
        convert_reference_checkpoint(state_dict, "cifar10")


def test_dataset_and_architecture_errors(small_reference):
    state_dict = small_reference.state_dict()
    with pytest.raises(ValueError, match="Unknown dataset 'imagenet'; pass one of"):
        convert_reference_checkpoint(state_dict, "imagenet")
    with pytest.raises(ValueError, match="takes 3 input channels but fashion_mnist images have 1"):
        convert_reference_checkpoint(state_dict, "fashionmnist")
    with pytest.raises(ValueError, match="has 10 outputs but cifar100 has 100 classes"):
        convert_reference_checkpoint(state_dict, "cifar100")
    with pytest.raises(ValueError, match="keys are those of the paper's wide_resnet"):
        convert_reference_checkpoint(state_dict, "cifar10", architecture="pyramidnet")
    with pytest.raises(ValueError, match="Unknown architecture 'resnet'"):
        convert_reference_checkpoint(state_dict, "cifar10", architecture="resnet")


def test_save_pretrained_round_trip(small_checkpoint, tmp_path):
    model = convert_reference_checkpoint(small_checkpoint, "cifar10")
    model.save_pretrained(tmp_path / "converted")
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path / "converted").eval()
    pixels = _inputs("cifar10", 32)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixels).logits, model(pixels).logits, rtol=0, atol=0)
    assert reloaded.config.id2label == model.config.id2label


_LOAD_IN_FRESH_PROCESS = """
import json, sys
import torch
from transformers import AutoImageProcessor, AutoModelForImageClassification
out = sys.argv[1]
model = AutoModelForImageClassification.from_pretrained(out, trust_remote_code=True).eval()
processor = AutoImageProcessor.from_pretrained(out, trust_remote_code=True)
pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
with torch.no_grad():
    logits = model(pixels).logits
print(json.dumps({"logits": logits.tolist(), "hf_aace_imported": "hf_aace" in sys.modules,
                  "processor": type(processor).__name__, "mean": processor.image_mean}))
"""


def test_script_writes_a_folder_that_loads_without_hf_aace(small_reference, small_checkpoint, tmp_path):
    out = tmp_path / "converted"
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1")
    script = REPO_ROOT / "scripts" / "convert_reference_checkpoint.py"
    args = ["--checkpoint", str(small_checkpoint), "--dataset", "cifar10", "--output_dir", str(out)]
    args += ["--source_url", "https://example.org/wrn10_1_cifar10.pth"]
    subprocess.run([sys.executable, str(script), *args], check=True, env=env, capture_output=True, timeout=120)

    card = (out / "README.md").read_text()
    assert "https://example.org/wrn10_1_cifar10.pth" in card and "Converted, not retrained" in card
    assert "10.1109/ICIP51287.2024.10647582" in card and "WRN-10-1" in card
    metadata = ModelCard.load(out / "README.md").data
    assert metadata.datasets == ["uoft-cs/cifar10"] and "converted" in metadata.tags
    assert json.loads((out / "preprocessor_config.json").read_text())["image_mean"] == [0.4914, 0.4822, 0.4465]

    # A fresh interpreter without the repository on its path: only the saved remote code can build the model.
    env.pop("PYTHONPATH")
    result = subprocess.run(
        [sys.executable, "-c", _LOAD_IN_FRESH_PROCESS, str(out)],
        check=True,
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert not loaded["hf_aace_imported"] and loaded["processor"] == "AACEImageProcessor"
    with torch.no_grad():
        expected = small_reference(_inputs("cifar10", 32))
    torch.testing.assert_close(torch.tensor(loaded["logits"]), expected, atol=1e-4, rtol=1e-4)


def _convert(checkpoint, output, *extra, env=None):
    command = [sys.executable, str(REPO_ROOT / "scripts/convert_reference_checkpoint.py"), "--checkpoint",
               str(checkpoint), "--dataset", "cifar10", "--output_dir", str(output), *extra]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, env={**os.environ, **(env or {})})


def test_script_pushes_to_the_hub(small_checkpoint, local_hub, tmp_path):
    result = _convert(small_checkpoint, tmp_path / "out", "--push_to_hub", "--hub_model_id", "hf-aace-tester/wrn-ref")
    assert result.returncode == 0, result.stderr[-3000:]
    files = set(HfApi().list_repo_files("hf-aace-tester/wrn-ref"))
    assert {
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "README.md",
        "modeling_wide_resnet.py",
    } <= files


def test_script_keeps_the_files_when_the_push_fails(small_checkpoint, tmp_path):
    out = tmp_path / "converted"
    result = _convert(
        small_checkpoint, out, "--push_to_hub", "--hub_model_id", "someone/wrn", env={"HF_ENDPOINT": dead_endpoint()}
    )
    assert result.returncode == 1
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md"} <= {
        path.name for path in out.iterdir()
    }
    assert "hf upload someone/wrn" in result.stderr


def test_reference_image_processor_matches_the_papers_preprocessing():
    food = reference_image_processor("food101")
    assert food.do_pad_to_square and list(food.image_mean) == [0.485, 0.456, 0.406]
    fashion = reference_image_processor("fashion_mnist")
    assert fashion.num_channels == 1 and fashion.size.height == 28 and list(fashion.image_std) == [0.3530]
