"""Tests of hf_aace.checkpoints: which checkpoint a run resumes from, and a training loss that survives resuming."""

import json
import os
import shutil

import pytest
import torch
from transformers import Trainer, TrainingArguments

from hf_aace import WideResNetConfig, WideResNetForImageClassification
from hf_aace.checkpoints import (
    LogAtCheckpointsCallback,
    check_checkpoint,
    checkpoint_problem,
    find_resumable_checkpoint,
    mean_training_loss,
)

from test_trainer import make_dataset


def train(output_dir, resume_from_checkpoint=None, **overrides):
    """A plain Trainer run of a tiny WideResNet: 6 steps, checkpoints every 3 steps, logs every 4."""
    torch.manual_seed(0)
    model = WideResNetForImageClassification(WideResNetConfig(depth=10, widen_factor=1, num_labels=3))
    settings = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=8,
        learning_rate=0.05,
        max_steps=6,
        save_strategy="steps",
        save_steps=3,
        logging_steps=4,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    trainer = Trainer(
        model=model,
        args=TrainingArguments(**{**settings, **overrides}),
        train_dataset=make_dataset(48),
        callbacks=[LogAtCheckpointsCallback()],
    )
    result = trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    return trainer, result


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    output = tmp_path_factory.mktemp("run")
    trainer, result = train(output)
    return output, result.training_loss


def broken_copy(source, destination, checkpoint, damage, name):
    """Copies a run, then deletes or truncates (to half its size) one file of one checkpoint."""
    shutil.copytree(source, destination)
    path = destination / checkpoint / name
    if damage == "delete":
        path.unlink()
    else:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return destination


@pytest.mark.parametrize(
    ("damage", "name", "problem"),
    [
        ("delete", "trainer_state.json", "trainer_state.json is missing"),
        ("truncate", "trainer_state.json", "trainer_state.json is unreadable"),
        ("truncate", "model.safetensors", "model.safetensors is unreadable, truncated or corrupt"),
        ("delete", "model.safetensors", "model.safetensors is missing"),
        ("delete", "optimizer.pt", "optimizer.pt is missing"),
        ("truncate", "optimizer.pt", "optimizer.pt is unreadable, truncated or corrupt"),
        ("delete", "scheduler.pt", "scheduler.pt is missing"),
        ("truncate", "rng_state.pth", "rng_state.pth is unreadable, truncated or corrupt"),
        ("delete", "rng_state.pth", "no RNG state"),
    ],
)
def test_incomplete_checkpoints_are_skipped_named_and_kept(finished_run, tmp_path, damage, name, problem):
    output, _ = finished_run
    copy = broken_copy(output, tmp_path / "out", "checkpoint-6", damage, name)
    files_before = sorted(os.listdir(copy / "checkpoint-6"))

    checkpoint, skipped = find_resumable_checkpoint(copy)
    assert checkpoint == str(copy / "checkpoint-3")
    assert [path for path, _ in skipped] == [str(copy / "checkpoint-6")]
    assert skipped[0][1].startswith(problem)
    assert sorted(os.listdir(copy / "checkpoint-6")) == files_before  # nothing deleted

    # Named explicitly, the checkpoint is refused with the file's name.
    with pytest.raises(ValueError, match=f"Cannot resume from .*checkpoint-6: {problem}"):
        check_checkpoint(copy / "checkpoint-6")


def test_complete_checkpoints_pass_and_an_empty_folder_has_none(finished_run, tmp_path):
    output, _ = finished_run
    assert checkpoint_problem(output / "checkpoint-6") is None
    check_checkpoint(output / "checkpoint-3")
    assert find_resumable_checkpoint(output) == (str(output / "checkpoint-6"), [])
    assert find_resumable_checkpoint(tmp_path) == (None, [])
    assert find_resumable_checkpoint(tmp_path / "absent") == (None, [])
    with pytest.raises(ValueError, match="is not a folder"):
        check_checkpoint(tmp_path / "absent")


def test_every_checkpoint_incomplete_means_no_resume(finished_run, tmp_path):
    output, _ = finished_run
    copy = broken_copy(output, tmp_path / "out", "checkpoint-6", "delete", "trainer_state.json")
    (copy / "checkpoint-3" / "scheduler.pt").unlink()
    checkpoint, skipped = find_resumable_checkpoint(copy)
    assert checkpoint is None and len(skipped) == 2


def test_training_loss_survives_resuming(finished_run, tmp_path):
    output, uninterrupted = finished_run
    history = json.loads((output / "checkpoint-6" / "trainer_state.json").read_text())["log_history"]
    # The callback logged at both checkpoints (3 and 6) besides the regular log at step 4.
    assert [entry["step"] for entry in history if "loss" in entry] == [3, 4, 6]
    assert mean_training_loss(history) == pytest.approx(uninterrupted, rel=1e-6)

    # Resumed from checkpoint-3, the Trainer's own train_loss averages steps 4-6 only.
    copy = tmp_path / "resumed"
    shutil.copytree(output / "checkpoint-3", copy / "checkpoint-3")
    trainer, result = train(copy, resume_from_checkpoint=str(copy / "checkpoint-3"))
    assert result.training_loss != pytest.approx(uninterrupted, rel=1e-3)
    assert mean_training_loss(trainer.state.log_history) == pytest.approx(uninterrupted, rel=1e-5)

    # Resumed from the final checkpoint, the Trainer reports 0.0; the history still holds the run.
    trainer, result = train(output, resume_from_checkpoint=str(output / "checkpoint-6"))
    assert result.training_loss == 0.0
    assert mean_training_loss(trainer.state.log_history) == pytest.approx(uninterrupted, rel=1e-6)


def test_mean_training_loss_weights_each_log_by_its_steps():
    history = [{"loss": 2.0, "step": 3}, {"eval_loss": 9.0, "step": 3}, {"loss": 1.0, "step": 4}, {"train_loss": 0.0}]
    assert mean_training_loss(history) == pytest.approx((2.0 * 3 + 1.0) / 4)
    assert mean_training_loss([{"eval_loss": 1.0, "step": 2}]) is None
