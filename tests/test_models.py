import subprocess
import sys
import textwrap

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import AutoConfig, AutoModelForImageClassification, pipeline

from hf_aace import (
    AACEImageProcessor,
    PyramidNetConfig,
    PyramidNetForImageClassification,
    WideResNetConfig,
    WideResNetForImageClassification,
)

TINY_CONFIGS = {
    "wrn": lambda **kw: WideResNetConfig(depth=10, widen_factor=1, num_labels=3, **kw),
    "pyramidnet-basic": lambda **kw: PyramidNetConfig(depth=8, alpha=12, num_labels=3, **kw),
    "pyramidnet-bottleneck": lambda **kw: PyramidNetConfig(depth=11, alpha=12, bottleneck=True, num_labels=3, **kw),
}
MODEL_CLASSES = {
    WideResNetConfig: WideResNetForImageClassification,
    PyramidNetConfig: PyramidNetForImageClassification,
}


def build(name: str, **kwargs):
    config = TINY_CONFIGS[name](**kwargs)
    return MODEL_CLASSES[type(config)](config)


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


def test_pyramidnet_widths_follow_the_paper_ramp():
    # Unit widths of PyramidNet-20, alpha 48 in the paper's checkpoints: 21, 27, 32, 37, 43, 48, 53, 59, 64.
    assert PyramidNetConfig(depth=20, alpha=48).unit_widths == [21, 27, 32, 37, 43, 48, 53, 59, 64]
    model = PyramidNetForImageClassification(PyramidNetConfig(depth=29, alpha=48, bottleneck=True, num_labels=10))
    assert model.classifier.in_features == 256


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
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


def test_label_smoothing_is_honoured():
    torch.manual_seed(0)
    model = build("wrn", label_smoothing=0.1).eval()
    randomise_batchnorm(model)
    pixel_values, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    logits = model(pixel_values).logits
    expected = torch.nn.functional.cross_entropy(logits, labels, label_smoothing=0.1)
    torch.testing.assert_close(model(pixel_values, labels=labels).loss, expected)


def test_wide_resnet_initialisation_follows_the_paper():
    model = build("wrn")
    assert torch.count_nonzero(model.classifier.weight) == 0 and torch.count_nonzero(model.classifier.bias) == 0
    convs = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}
    # Channel-changing convolutions (3 -> 16, 16 -> 32, 32 -> 64, 1x1 shortcuts) tell fan-in from fan-out: He-normal
    # with fan-in has std sqrt(2 / (c_in k^2)), at least sqrt(2) times the fan-out value for all of them.
    assert sum(m.in_channels != m.out_channels for m in convs.values()) >= 5
    for name, conv in convs.items():
        fan_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
        assert conv.weight.std().item() == pytest.approx((2 / fan_in) ** 0.5, rel=0.15), name


def test_fixed_pooling_window_reproduces_the_paper_and_rejects_mismatched_sizes():
    model = build("wrn", num_channels=1, pooling_size=4).eval()
    randomise_batchnorm(model)
    pixel_values = torch.randn(2, 1, 28, 28)
    features = model.wide_resnet(pixel_values).last_hidden_state  # 7 x 7 map
    expected = model.classifier(features[:, :, :4, :4].mean((2, 3)))
    torch.testing.assert_close(model(pixel_values).logits, expected)
    with pytest.raises(ValueError, match="pooling_size=None"):
        model(torch.randn(1, 1, 64, 64))


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
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


@pytest.mark.parametrize("name", ["wrn", "pyramidnet-bottleneck"])
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
    model = build("wrn", num_channels=num_channels, id2label={0: "cat", 1: "dog", 2: "fox"}).eval()
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
        (WideResNetConfig, {"pooling_size": 0}, "pooling_size must be None"),
        (PyramidNetConfig, {"depth": 21}, r"depth must be 6n \+ 2"),
        (PyramidNetConfig, {"depth": 14, "bottleneck": True}, r"depth must be 9n \+ 2"),
        (PyramidNetConfig, {"alpha": 0}, "alpha must be a positive integer"),
        (PyramidNetConfig, {"num_channels": 4}, "num_channels must be 1"),
        (PyramidNetConfig, {"label_smoothing": -0.1}, "label_smoothing must lie in"),
    ],
)
def test_invalid_configs_raise_value_error(factory, kwargs, message):
    with pytest.raises(ValueError, match=message):
        factory(**kwargs)
