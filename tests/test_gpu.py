"""Checks that need a CUDA device (marker `gpu`, skipped elsewhere): the real fp16 path, augmentation on the device,
the step captured as a CUDA graph."""

import warnings

import pytest
import torch

from hf_aace import (
    AACETrainer,
    AACETrainingArguments,
    BatchAugmentation,
    WideResNetConfig,
    WideResNetForImageClassification,
    aace_loss,
)
from hf_aace.training_args import parse_method_variant

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


class Batches(torch.utils.data.Dataset):
    def __init__(self):
        generator = torch.Generator().manual_seed(0)
        self.images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=generator)
        self.labels = torch.randint(0, 10, (64,), generator=generator)

    def __len__(self):
        return 64

    def __getitem__(self, index):
        return {"pixel_values": self.images[index], "labels": self.labels[index]}


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_training_on_cuda(tmp_path, precision):
    model = WideResNetForImageClassification(WideResNetConfig(depth=10, widen_factor=2, num_labels=10))
    args = AACETrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=16, logging_steps=2, report_to="none",
        save_strategy="no", optim="sgd", learning_rate=0.05, **{precision: True},
    )  # fmt: skip
    augmentation = BatchAugmentation((0.5,) * 3, (0.25,) * 3, crop_padding=4, flip=True, cutout_size=16)
    trainer = AACETrainer(model=model, args=args, train_dataset=Batches(), augmentation=augmentation)
    inputs = next(iter(trainer.get_train_dataloader()))
    trainer.current_gradient_accumulation_steps = 1
    before = [p.detach().clone() for p in model.parameters()]
    trainer.training_step(trainer.model_wrapped, inputs)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    trainer.train()
    logged = [e for e in trainer.state.log_history if "loss" in e]
    assert logged and all(torch.isfinite(torch.tensor(e["loss"])) for e in logged)
    assert all(e["perturbation_norm"] > 0 or e.get("skipped_perturbations") for e in logged)


def test_augmentation_on_cuda_matches_cpu_normalisation_and_resumes():
    augmentation = BatchAugmentation((0.5,) * 3, (0.25,) * 3, crop_padding=4, flip=True, cutout_size=16, seed=3)
    images = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8)
    torch.testing.assert_close(augmentation.normalize(images.cuda()).cpu(), augmentation.normalize(images))
    augmentation(images.cuda())  # move the CUDA stream on before saving it
    state = augmentation.state_dict()
    expected = augmentation(images.cuda())
    resumed = BatchAugmentation((0.5,) * 3, (0.25,) * 3, crop_padding=4, flip=True, cutout_size=16, seed=3)
    resumed.load_state_dict(state)
    assert torch.equal(resumed(images.cuda()), expected)


def test_random_aace_weights_are_drawn_on_the_logits_device():
    logits = torch.randn(8, 5, device="cuda")
    labels = torch.arange(8, device="cuda") % 5
    generator = torch.Generator("cuda").manual_seed(7)
    loss = aace_loss(logits, labels, reduction="none", mode="random", generator=generator)
    weights = 1 - torch.rand(8, 5, device="cuda", generator=torch.Generator("cuda").manual_seed(7))
    target = weights.masked_fill(torch.nn.functional.one_hot(labels, 5).bool(), 0.0)
    target = target / target.sum(-1, keepdim=True)  # threshold 0: no mass on the true class
    expected = (target * (target.clamp_min(1e-30).log() - logits.log_softmax(-1))).sum(-1)
    torch.testing.assert_close(loss, expected)
    assert aace_loss(logits, labels, mode="random").device == logits.device  # the trainer passes no generator


@pytest.mark.parametrize("variant", ["sgd", "aace", "aace:k=3:r=1"])
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_captured_cuda_steps_train_as_eager_steps(tmp_path, monkeypatch, variant, precision):
    method, settings = parse_method_variant(variant)

    def run(step_capture):
        torch.manual_seed(0)
        model = WideResNetForImageClassification(WideResNetConfig(depth=10, widen_factor=2, num_labels=10))
        args = AACETrainingArguments(
            output_dir=str(tmp_path / step_capture), max_steps=9, per_device_train_batch_size=16, logging_steps=3,
            report_to="none", save_strategy="no", optim="sgd", learning_rate=0.05, seed=0, sam_method=method,
            step_capture=step_capture, dataloader_drop_last=True, **settings,
            **({} if precision == "fp32" else {precision: True}),
        )  # fmt: skip
        augmentation = BatchAugmentation((0.5,) * 3, (0.25,) * 3, crop_padding=4, flip=True, cutout_size=16)
        trainer = AACETrainer(model=model, args=args, train_dataset=Batches(), augmentation=augmentation)
        trainer.train()
        return model, trainer

    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    eager, _ = run("none")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # every step captured: none falls back
        captured, trainer = run("cuda_graph")
    kinds = 2 if ":k=" in variant else 1
    assert trainer._step_capture.replays == 9 - 2 * kinds
    for a, b in zip(eager.state_dict().values(), captured.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
