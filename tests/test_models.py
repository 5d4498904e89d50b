import ast
import inspect
import re
import subprocess
import sys
import textwrap
from dataclasses import fields
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForImageClassification, ResNetConfig, pipeline

from hf_aace import (
    AACEImageProcessor,
    AACETrainingArguments,
    PyramidNetConfig,
    PyramidNetForImageClassification,
    WideResNetConfig,
    WideResNetForImageClassification,
)
from hf_aace.hub import OWN_MODEL_TYPES as HUB_OWN_MODEL_TYPES
from hf_aace.hub import architecture_name
from hf_aace.models import ARCHITECTURES, OWN_MODEL_TYPES, architecture_for, resolve_model
from hf_aace.models.architectures import PAPER_TRAINING

REPO_ROOT = Path(__file__).resolve().parents[1]

# The smallest sizes of each architecture (by short name), built by the tests below.
TINY_SIZES = {
    "wide_resnet": ("wrn-10-1",),
    "pyramidnet": ("pyramidnet-8-12", "pyramidnet-11-12-bottleneck"),
}
TINY_MODELS = [name for names in TINY_SIZES.values() for name in names]

# Each named variant's short name: its depth and width (alpha) and unit kind, as stated independently of the table.
VARIANT_SIZES = {
    "wrn-28-10": "wrn-28-10",
    "wrn-16-8": "wrn-16-8",
    "wrn-16-4": "wrn-16-4",
    "wrn-28-2": "wrn-28-2",
    "wrn-40-2": "wrn-40-2",
    "wrn-10-1": "wrn-10-1",
    "pyramidnet-272": "pyramidnet-272-200",
    "pyramidnet-110": "pyramidnet-110-48",
    "pyramidnet-272-bottleneck": "pyramidnet-272-200-bottleneck",
}
VARIANTS = [(architecture, variant) for architecture in ARCHITECTURES.values() for variant in architecture.variants]


def build(name: str, **kwargs):
    architecture, size = resolve_model(name)
    return architecture.model_class(architecture.config_class(**size, num_labels=3, **kwargs))


def randomise_batchnorm(model: torch.nn.Module) -> None:
    """Gives BatchNorm non-trivial statistics so eval-mode round trips test the buffers too."""
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
    for parameter in model.parameters():
        if parameter.dim() == 2:
            parameter.data.normal_()


def test_full_size_parameter_counts_match_the_paper():
    with torch.device("meta"):
        wrn = WideResNetForImageClassification(WideResNetConfig(depth=28, widen_factor=10, num_labels=100))
        pyramidnet = PyramidNetForImageClassification(PyramidNetConfig(depth=272, alpha=200, num_labels=100))
    assert sum(p.numel() for p in wrn.parameters()) == 46_218_164
    assert sum(p.numel() for p in pyramidnet.parameters()) == 41_131_331


@pytest.mark.parametrize(("name", "parameters"), [("wide_resnet", 46_218_164), ("pyramidnet", 41_131_331)])
def test_paper_variants_are_the_papers_networks(name, parameters):
    architecture = ARCHITECTURES[name]
    resolved, size = resolve_model(architecture.paper_variant)
    assert resolved is architecture
    with torch.device("meta"):
        model = architecture.model_class(architecture.config_class(**size, num_labels=100))
    assert sum(p.numel() for p in model.parameters()) == parameters
    assert architecture.paper_batch_size == {"wide_resnet": 256, "pyramidnet": 64}[name]


def test_pyramidnet_widths_follow_the_paper_ramp():
    # Unit widths of PyramidNet-20, alpha 48 in the paper's checkpoints: 21, 27, 32, 37, 43, 48, 53, 59, 64.
    assert PyramidNetConfig(depth=20, alpha=48).unit_widths == [21, 27, 32, 37, 43, 48, 53, 59, 64]
    model = PyramidNetForImageClassification(PyramidNetConfig(depth=29, alpha=48, bottleneck=True, num_labels=10))
    assert model.classifier.in_features == 256


@pytest.mark.parametrize("name", TINY_MODELS)
@pytest.mark.parametrize(("channels", "size"), [(3, 32), (1, 28), (3, 17)])
def test_shapes_and_loss_only_with_labels(name, channels, size):
    model = build(name, num_channels=channels)
    pixel_values = torch.randn(2, channels, size, size)
    output = model(pixel_values, output_hidden_states=True)
    assert output.logits.shape == (2, 3)
    assert output.loss is None
    assert len(output.hidden_states) == 4
    labelled = model(pixel_values, labels=torch.tensor([0, 2]))
    assert labelled.loss is not None and labelled.loss.dim() == 0
    loss, logits = model(pixel_values, labels=torch.tensor([0, 2]), return_dict=False)[:2]
    torch.testing.assert_close(loss, labelled.loss)


@pytest.mark.parametrize("name", TINY_MODELS)
def test_label_smoothing_is_honoured(name):
    torch.manual_seed(0)
    model = build(name, label_smoothing=0.1).eval()
    randomise_batchnorm(model)
    pixel_values, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    logits = model(pixel_values).logits
    expected = torch.nn.functional.cross_entropy(logits, labels, label_smoothing=0.1)
    torch.testing.assert_close(model(pixel_values, labels=labels).loss, expected)


def test_wide_resnet_initialisation_follows_the_paper():
    model = build("wrn-10-1")
    assert torch.count_nonzero(model.classifier.weight) == 0 and torch.count_nonzero(model.classifier.bias) == 0
    convs = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}
    # Channel-changing convolutions (3 -> 16, 16 -> 32, 32 -> 64, 1x1 shortcuts) tell fan-in from fan-out: He-normal
    # with fan-in has std sqrt(2 / (c_in k^2)), at least sqrt(2) times the fan-out value for all of them.
    assert sum(m.in_channels != m.out_channels for m in convs.values()) >= 5
    for name, conv in convs.items():
        fan_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
        assert conv.weight.std().item() == pytest.approx((2 / fan_in) ** 0.5, rel=0.15), name


def test_pyramidnet_initialisation_follows_the_paper():
    torch.manual_seed(0)
    model = PyramidNetForImageClassification(PyramidNetConfig(depth=11, alpha=48, bottleneck=True, num_labels=100))
    # Convolutions: N(0, 2 / (k * k * out_channels)), the reference code's fan-out rule; 1x1 and 3x3 kernels and
    # channel-changing convolutions tell it from fan-in and from other kernel factors. The root mean square checks
    # the mean as well as the spread.
    convs = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}
    assert {m.kernel_size for m in convs.values()} == {(1, 1), (3, 3)}
    for name, conv in convs.items():
        fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
        rms = conv.weight.pow(2).mean().sqrt().item()
        assert rms == pytest.approx((2 / fan_out) ** 0.5, rel=0.15), name
    # The classifier: PyTorch's default, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and bias alike.
    bound = 1 / model.classifier.in_features**0.5
    for tensor in (model.classifier.weight, model.classifier.bias):
        assert tensor.abs().max().item() <= bound
        assert tensor.max().item() > 0.9 * bound and tensor.min().item() < -0.9 * bound
    assert model.classifier.weight.abs().max().item() > 0.97 * bound  # 100 x 256 draws reach the bound


@pytest.mark.parametrize("name", TINY_MODELS)
def test_tuple_outputs_hold_what_the_model_outputs_hold(name):
    model = build(name).eval()
    assert model.num_labels == 3  # the attribute transformers' heads carry
    pixel_values, labels = torch.randn(2, 3, 16, 16), torch.tensor([0, 2])
    base = model.base_model(pixel_values, output_hidden_states=True)
    assert base.last_hidden_state is not None and model.base_model(pixel_values).hidden_states is None
    as_tuple = model.base_model(pixel_values, output_hidden_states=True, return_dict=False)
    assert len(as_tuple) == 3 and torch.equal(as_tuple[0], base.last_hidden_state)
    assert torch.equal(as_tuple[1], base.pooler_output) and len(as_tuple[2]) == len(base.hidden_states)
    assert len(model.base_model(pixel_values, return_dict=False)) == 2

    output = model(pixel_values, output_hidden_states=True)
    (logits,) = model(pixel_values, return_dict=False)
    assert torch.equal(logits, output.logits)
    logits, hidden_states = model(pixel_values, output_hidden_states=True, return_dict=False)
    assert len(hidden_states) == len(output.hidden_states)
    loss, logits = model(pixel_values, labels=labels, return_dict=False)
    assert loss.dim() == 0 and torch.equal(logits, output.logits)

    model.config.output_hidden_states = True  # the config's settings apply where the call gives none
    assert len(model.base_model(pixel_values).hidden_states) == len(base.hidden_states)
    assert len(model(pixel_values).hidden_states) == len(base.hidden_states)
    model.config.return_dict = False
    assert isinstance(model.base_model(pixel_values), tuple)
    logits, hidden_states = model(pixel_values)
    assert torch.equal(logits, output.logits) and len(hidden_states) == len(base.hidden_states)


@pytest.mark.parametrize("name", ["wrn-10-1", "pyramidnet-8-12"])
def test_fixed_pooling_window_reproduces_the_paper_and_rejects_mismatched_sizes(name):
    model = build(name, num_channels=1, pooling_size=4).eval()
    randomise_batchnorm(model)
    pixel_values = torch.randn(2, 1, 28, 28)
    features = model.base_model(pixel_values).last_hidden_state  # 7 x 7 map
    expected = model.classifier(features[:, :, :4, :4].mean((2, 3)))
    torch.testing.assert_close(model(pixel_values).logits, expected)
    # The window must fit once and only once: maps of 4 to 7 pixels a side; 3 or 8 are refused.
    for side in (4, 7):
        assert model(torch.randn(1, 1, 4 * side, 4 * side)).logits.shape == (1, 3)
    for side in (3, 8, 16):
        with pytest.raises(ValueError, match="pooling_size=None"):
            model(torch.randn(1, 1, 4 * side, 4 * side))


@pytest.mark.parametrize("name", TINY_MODELS)
def test_save_load_and_auto_round_trip(name, tmp_path):
    model = build(name).eval()
    randomise_batchnorm(model)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(model)
    assert type(AutoConfig.from_pretrained(tmp_path)) is type(model.config)
    pixel_values = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(pixel_values).logits, model(pixel_values).logits, rtol=0, atol=0)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


@pytest.mark.parametrize("name", ["wrn-10-1", "pyramidnet-11-12-bottleneck"])
def test_remote_code_loads_without_hf_aace(name, tmp_path):
    model = build(name, id2label={0: "cat", 1: "dog", 2: "fox"}).eval()
    randomise_batchnorm(model)
    model.save_pretrained(tmp_path)
    AACEImageProcessor().save_pretrained(tmp_path)
    pixel_values = torch.randn(2, 3, 32, 32)
    torch.save(pixel_values, tmp_path / "input.pt")
    torch.save(model(pixel_values).logits.detach(), tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["hf_aace"] = None  # hf_aace is installed here: make it unimportable
        import torch
        from transformers import AutoImageProcessor, AutoModelForImageClassification
        model = AutoModelForImageClassification.from_pretrained({str(tmp_path)!r}, trust_remote_code=True).eval()
        assert not type(model).__module__.startswith("hf_aace"), type(model).__module__
        processor = AutoImageProcessor.from_pretrained({str(tmp_path)!r}, trust_remote_code=True)
        assert type(processor).__name__ == "AACEImageProcessor"
        logits = model(torch.load({str(tmp_path / "input.pt")!r})).logits
        torch.testing.assert_close(logits, torch.load({str(tmp_path / "expected.pt")!r}), rtol=0, atol=0)
        print("remote-ok", type(model).__module__)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "remote-ok transformers_modules" in result.stdout


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA"])
def test_pipeline_on_pil_images_matches_the_processor(mode, tmp_path):
    num_channels = 1 if mode == "L" else 3
    model = build("wrn-10-1", num_channels=num_channels, id2label={0: "cat", 1: "dog", 2: "fox"}).eval()
    randomise_batchnorm(model)
    model.save_pretrained(tmp_path)
    mean, std = [0.4] * num_channels, [0.2] * num_channels
    AACEImageProcessor(num_channels=num_channels, image_mean=mean, image_std=std).save_pretrained(tmp_path)
    array = np.random.default_rng(0).integers(0, 256, (32, 32, len(mode)), dtype=np.uint8).squeeze()
    image = PIL.Image.fromarray(array, mode=mode)
    classifier = pipeline("image-classification", model=str(tmp_path), trust_remote_code=True)
    predictions = classifier(image, top_k=3)
    # What the training pipeline feeds the model for the same image: uint8 -> [0, 1] -> normalised.
    converted = np.asarray(image.convert("L" if num_channels == 1 else "RGB"), dtype=np.float32) / 255
    pixel_values = torch.from_numpy(converted).reshape(32, 32, num_channels).permute(2, 0, 1)[None]
    probabilities = model((pixel_values - 0.4) / 0.2).logits.softmax(-1)[0]
    assert [p["label"] for p in predictions] == [
        model.config.id2label[i] for i in probabilities.argsort(descending=True).tolist()
    ]
    scores = torch.tensor([p["score"] for p in predictions])
    torch.testing.assert_close(scores, probabilities.sort(descending=True).values, rtol=1e-5, atol=1e-6)


def test_processor_pads_to_square_and_resizes_for_food101():
    processor = AACEImageProcessor(
        do_pad_to_square=True, size={"height": 4, "width": 4}, image_mean=[0, 0, 0], image_std=[1, 1, 1]
    )
    image = PIL.Image.new("RGB", (8, 4), (255, 255, 255))  # wide: padded above and below
    pixel_values = processor(image, return_tensors="pt")["pixel_values"][0]
    assert pixel_values.shape == (3, 4, 4)
    assert pixel_values[:, 0].max() < 0.5 and pixel_values[:, 1:3].min() > 0.5 and pixel_values[:, 3].max() < 0.5


@pytest.mark.parametrize(
    ("factory", "kwargs", "message"),
    [
        (WideResNetConfig, {"depth": 27}, r"depth must be 6n \+ 4"),
        (WideResNetConfig, {"widen_factor": 0}, "widen_factor must be a positive integer"),
        (WideResNetConfig, {"dropout_rate": 1.0}, r"dropout_rate must lie in \[0, 1\)"),
        (WideResNetConfig, {"num_channels": 2}, "num_channels must be 1"),
        (WideResNetConfig, {"depth": 4}, r"depth must be 6n \+ 4"),
        (WideResNetConfig, {"dropout_rate": -0.1}, r"dropout_rate must lie in \[0, 1\)"),
        (WideResNetConfig, {"pooling_size": 0}, "pooling_size must be None"),
        (WideResNetConfig, {"pooling_size": 1.5}, "pooling_size must be None"),
        (WideResNetConfig, {"label_smoothing": 1.0}, "label_smoothing must lie in"),
        (
            PyramidNetConfig,
            {"depth": 21},
            r"depth must be 6n \+ 2 with n >= 1 for basic units: 8, 14, 20, \.\.\., 272",
        ),
        (PyramidNetConfig, {"depth": 2}, r"depth must be 6n \+ 2 with n >= 1"),
        (
            PyramidNetConfig,
            {"depth": 14, "bottleneck": True},
            r"depth must be 9n \+ 2 with n >= 1 for bottleneck units: 11, 20, 29, \.\.\., 272",
        ),
        (PyramidNetConfig, {"alpha": 0}, "alpha must be a positive integer"),
        (PyramidNetConfig, {"num_channels": 4}, "num_channels must be 1"),
        (PyramidNetConfig, {"pooling_size": 0}, "pooling_size must be None"),
        (PyramidNetConfig, {"pooling_size": 1.5}, "pooling_size must be None"),
        (PyramidNetConfig, {"label_smoothing": -0.1}, "label_smoothing must lie in"),
        (PyramidNetConfig, {"label_smoothing": 1.0}, "label_smoothing must lie in"),
    ],
)
def test_invalid_configs_raise_value_error(factory, kwargs, message):
    with pytest.raises(ValueError, match=message):
        factory(**kwargs)


@pytest.mark.parametrize("architecture", ARCHITECTURES.values(), ids=list(ARCHITECTURES))
def test_defaults_are_the_papers_size_and_the_boundaries_are_accepted(architecture):
    _, size = resolve_model(architecture.paper_variant)
    defaults = architecture.config_class()
    assert {key: getattr(defaults, key) for key in size} == size
    config = architecture.config_class(pooling_size=1, label_smoothing=0.0)
    assert (config.pooling_size, config.label_smoothing) == (1, 0.0)
    narrowest = {"wide_resnet": {"widen_factor": 1}, "pyramidnet": {"alpha": 1}}[architecture.name]
    assert architecture.config_class(**narrowest).to_dict().items() >= narrowest.items()


def test_every_architecture_has_a_tiny_size():
    assert set(TINY_SIZES) == set(ARCHITECTURES)
    for name, sizes in TINY_SIZES.items():
        assert sizes, name
        for size in sizes:
            assert resolve_model(size)[0] is ARCHITECTURES[name], size


@pytest.mark.parametrize("architecture", ARCHITECTURES.values(), ids=list(ARCHITECTURES))
def test_the_table_registers_each_architecture_with_the_auto_classes(architecture):
    config = AutoConfig.for_model(architecture.model_type, num_labels=3)
    assert type(config) is architecture.config_class
    with torch.device("meta"):
        assert type(AutoModel.from_config(config)) is architecture.base_model_class
        assert type(AutoModelForImageClassification.from_config(config)) is architecture.model_class
    assert architecture_for(config) is architecture and architecture_for(architecture.model_type) is architecture
    # The training script turns cli_fields into flags: each must be a keyword of the config.
    assert set(architecture.cli_fields) <= set(inspect.signature(architecture.config_class).parameters)
    assert architecture.paper_variant in architecture.variants


def test_own_model_types_come_from_the_table():
    assert OWN_MODEL_TYPES == ("aace_wide_resnet", "aace_pyramidnet")
    assert HUB_OWN_MODEL_TYPES == OWN_MODEL_TYPES
    assert architecture_for(ResNetConfig()) is None and architecture_for("resnet") is None
    assert architecture_for(object()) is None  # anything without a model_type is not one of ours


def test_paper_training_defaults_are_training_arguments():
    assert dict(PAPER_TRAINING) == {
        "learning_rate": 0.1,
        "optim": "sgd",
        "optim_args": "momentum=0.9",
        "weight_decay": 5e-4,
        "weight_decay_all_parameters": True,
        "lr_milestones": [0.3, 0.6, 0.8],
        "lr_gamma": 0.2,
        "warmup_steps": 0,
        "max_grad_norm": 0.0,
    }
    assert set(PAPER_TRAINING) <= {field.name for field in fields(AACETrainingArguments)}
    assert all(architecture.training_defaults is PAPER_TRAINING for architecture in ARCHITECTURES.values())


def test_named_variants_are_listed_with_their_sizes():
    assert sorted(variant for _, variant in VARIANTS) == sorted(VARIANT_SIZES)


@pytest.mark.parametrize(("architecture", "variant"), VARIANTS, ids=[variant for _, variant in VARIANTS])
def test_named_variants_build_configs_of_their_stated_size(architecture, variant):
    resolved, size = resolve_model(variant)
    assert resolved is architecture
    config = architecture.config_class(**size)
    assert architecture.short_name(config) == VARIANT_SIZES[variant]
    # The returned keywords are a copy: changing them leaves the table intact.
    size["depth"] = 0
    assert resolve_model(variant)[1]["depth"] == config.depth


@pytest.mark.parametrize(
    ("name", "architecture", "size"),
    [
        ("wide_resnet", "wide_resnet", {}),
        ("PyramidNet", "pyramidnet", {}),
        ("wrn-22-3", "wide_resnet", {"depth": 22, "widen_factor": 3}),
        (" WRN-28-10 ", "wide_resnet", {"depth": 28, "widen_factor": 10}),
        ("pyramidnet-20-48", "pyramidnet", {"depth": 20, "alpha": 48, "bottleneck": False}),
        ("pyramidnet-29-48-bottleneck", "pyramidnet", {"depth": 29, "alpha": 48, "bottleneck": True}),
        ("pyramidnet-272", "pyramidnet", {"depth": 272, "alpha": 200, "bottleneck": False}),
    ],
)
def test_resolve_model_reads_names_variants_and_patterns(name, architecture, size):
    assert resolve_model(name) == (ARCHITECTURES[architecture], size)


def test_resolve_model_leaves_paths_and_hub_ids_alone(tmp_path, monkeypatch):
    for name in ("microsoft/resnet-18", "someone/wrn-28-10-cifar100", "./outputs/run", "bert-base-uncased"):
        assert resolve_model(name) is None, name
    # A saved model in a folder named like a short name is a path, not a size.
    (tmp_path / "wrn-16-8-cifar10-aace").mkdir()
    monkeypatch.chdir(tmp_path)
    assert resolve_model("wrn-16-8-cifar10-aace") is None


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("wrn-27-10", r"'wrn-27-10' is not a valid wide_resnet size: depth must be 6n \+ 4"),
        ("pyramidnet-21-48", r"not a valid pyramidnet size: depth must be 6n \+ 2"),
        ("pyramidnet-14-48-bottleneck", r"depth must be 9n \+ 2"),
        ("wrn-28", "Unknown model 'wrn-28': not a known size nor an existing path"),
        ("pyramidnet-272-basic", "Unknown model"),
    ],
)
def test_resolve_model_rejects_invalid_short_names(name, message):
    with pytest.raises(ValueError, match=message) as error:
        resolve_model(name)
    # The message names the valid forms and the named variants.
    for form in ("wrn-DEPTH-WIDEN", "pyramidnet-DEPTH-ALPHA[-bottleneck]", "'wrn-28-10'", "'pyramidnet-272'"):
        assert form in str(error.value)


@pytest.mark.parametrize("name", TINY_MODELS + [variant for _, variant in VARIANTS])
def test_short_name_round_trips_through_resolve_model(name):
    architecture, size = resolve_model(name)
    config = architecture.config_class(**size)
    short = architecture.short_name(config)
    resolved, parsed = resolve_model(short)
    assert resolved is architecture
    assert parsed == {key: getattr(config, key) for key in parsed} and set(size) <= set(parsed)
    assert architecture.short_name(architecture.config_class(**parsed)) == short


@pytest.mark.parametrize(
    ("config", "display"),
    [
        (WideResNetConfig(depth=28, widen_factor=10), "WRN-28-10"),
        (PyramidNetConfig(depth=272, alpha=200), "PyramidNet-272 (alpha 200, basic)"),
        (PyramidNetConfig(depth=29, alpha=48, bottleneck=True), "PyramidNet-29 (alpha 48, bottleneck)"),
    ],
)
def test_display_name(config, display):
    assert architecture_for(config).display_name(config) == display
    assert architecture_name(config) == display


def test_display_name_of_other_models_is_the_class_name():
    assert architecture_name(ResNetConfig()) == "ResNet"


MODELS = REPO_ROOT / "hf_aace" / "models"
# The files that ship with every saved model, so that it loads with trust_remote_code=True without hf_aace.
SHIPPED_FILES = sorted([*MODELS.glob("*/modeling_*.py"), *MODELS.glob("*/configuration_*.py")])


@pytest.mark.parametrize("path", SHIPPED_FILES, ids=[path.name for path in SHIPPED_FILES])
def test_shipped_model_files_stand_alone(path):
    # Saved beside the weights, a modeling file can import only its configuration file; neither may cite other files.
    source = path.read_text()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level:
            assert node.level == 1 and node.module.startswith("configuration_"), f"{path.name}: {node.module}"
    assert not re.search(r"\b[A-Z]+\.md\b", source)
