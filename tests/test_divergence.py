"""Tests of hf_aace.divergence: a diverged run stops before logging or saving non-finite weights."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import Trainer, TrainingArguments

from hf_aace import WideResNetConfig, WideResNetForImageClassification
from hf_aace.divergence import DivergenceCallback, TrainingDivergedError, first_non_finite_tensor

from test_trainer import make_dataset


def trainer(output_dir, learning_rate: float) -> Trainer:
    torch.manual_seed(0)
    model = WideResNetForImageClassification(WideResNetConfig(depth=10, widen_factor=1, num_labels=3))
    args = TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=8,
        learning_rate=learning_rate,
        lr_scheduler_type="constant",
        max_steps=12,
        save_strategy="steps",
        save_steps=1,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    return Trainer(model=model, args=args, train_dataset=make_dataset(48), callbacks=[DivergenceCallback()])


def test_divergence_stops_training_before_anything_non_finite_is_logged_or_saved(tmp_path):
    with pytest.raises(TrainingDivergedError) as raised:
        # Clipped gradients keep the weights finite for a few steps, then they overflow.
        trainer(tmp_path, learning_rate=1e37).train()
    error = raised.value
    message = str(error)
    assert f"after step {error.step} the weights are no longer finite" in message
    assert repr(error.tensor_name) in message and "--learning_rate, now 1e+37" in message
    assert "new --output_dir" in message

    saved = sorted(int(path.name.split("-")[1]) for path in tmp_path.glob("checkpoint-*"))
    assert error.step > 1 and saved == list(range(1, error.step))  # every step before the divergence, none after
    for step in saved:
        weights = load_file(tmp_path / f"checkpoint-{step}" / "model.safetensors")
        assert all(torch.isfinite(tensor).all() for tensor in weights.values()), step
    history = json.loads((tmp_path / f"checkpoint-{saved[-1]}" / "trainer_state.json").read_text())["log_history"]
    assert [entry["step"] for entry in history] == saved and all(math.isfinite(entry["loss"]) for entry in history)


def test_first_non_finite_tensor_names_parameters_and_buffers():
    model = WideResNetForImageClassification(WideResNetConfig(depth=10, widen_factor=1, num_labels=3))
    assert first_non_finite_tensor(model) is None
    with torch.no_grad():
        model.wide_resnet.norm.running_var[2] = float("inf")
    assert first_non_finite_tensor(model) == "wide_resnet.norm.running_var"
    with torch.no_grad():
        model.classifier.weight[0, 0] = float("nan")
    assert first_non_finite_tensor(model) == "classifier.weight"
