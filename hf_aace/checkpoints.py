"""Checkpoints a run can trust: which one to resume from, and a training loss that survives resuming.

A run stopped while it wrote a checkpoint (killed, out of disk space) leaves a folder without `trainer_state.json`
(the Trainer writes it last) or with a truncated file. [`find_resumable_checkpoint`] picks the newest checkpoint whose
files are all present and readable and reports the ones it passed over; [`check_checkpoint`] raises an error naming
the missing or unreadable file. Neither deletes anything.

The Trainer's `train_loss` averages only the steps of the current `train()` call, and a checkpoint's log history
lacks the steps since the last log. [`LogAtCheckpointsCallback`] logs at every checkpoint and at the end, so that
[`mean_training_loss`] can average the whole run from the log history, resumed or not.
"""

import json
import os
import re
from pathlib import Path

import torch
from accelerate.utils.constants import FSDP_MODEL_NAME
from accelerate.utils.constants import OPTIMIZER_NAME as FSDP_OPTIMIZER_NAME
from safetensors import safe_open
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME, TRAINER_STATE_NAME, TRAINING_ARGS_NAME
from transformers.trainer_pt_utils import safe_globals
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, logging

logger = logging.get_logger(__name__)

_CHECKPOINT_FOLDER = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


def checkpoint_problem(checkpoint: str | os.PathLike) -> str | None:
    """Says what keeps `checkpoint` from being resumed from, or returns None when it is complete.

    Complete means: `trainer_state.json` parses; the weights are present and intact: safetensors weights (or every
    shard of their index) with an intact header and the size it announces, or, under FSDP, accelerate's model and
    optimizer states (sharded: distributed-checkpoint folders whose `.metadata` is written last; whole: `.bin` files);
    the optimizer state, `scheduler.pt` and an RNG state are present; and every `.pt`/`.pth`/`.bin` file loads with
    `torch.load(weights_only=True)` (memory-mapped, so large files cost little).
    """
    folder = Path(checkpoint)
    if not folder.is_dir():
        return f"{folder} is not a folder"
    state = folder / TRAINER_STATE_NAME
    if not state.is_file():
        return f"{TRAINER_STATE_NAME} is missing (the Trainer writes it last: the checkpoint was cut short)"
    try:
        json.loads(state.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        return f"{TRAINER_STATE_NAME} is unreadable ({_describe(error)})"
    fsdp = _fsdp_states(folder)
    problem = _fsdp_problem(folder, fsdp) if fsdp else _weights_problem(folder)
    if problem is not None:
        return problem
    for name in ((fsdp or {}).get("optimizer", OPTIMIZER_NAME), SCHEDULER_NAME):
        if not (folder / name).exists():
            return f"{name} is missing: resuming would restart the optimizer or the learning-rate schedule"
    if not any(folder.glob("rng_state*.pth")):
        return "no RNG state (rng_state.pth) is present"
    for path in sorted([*folder.glob("*.pt"), *folder.glob("*.pth"), *folder.glob("*.bin")]):
        if path.name == TRAINING_ARGS_NAME:
            continue  # pickled arguments, not read when resuming
        try:
            with safe_globals():
                torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as error:  # noqa: BLE001 - torch.load raises zip, pickle and runtime errors alike
            return f"{path.name} is unreadable, truncated or corrupt ({_describe(error)})"
    return None


def _weights_problem(folder: Path) -> str | None:
    weights = [SAFE_WEIGHTS_NAME]
    if not (folder / SAFE_WEIGHTS_NAME).is_file() and (folder / SAFE_WEIGHTS_INDEX_NAME).is_file():
        try:
            index = json.loads((folder / SAFE_WEIGHTS_INDEX_NAME).read_text())
            weights = sorted(set(index["weight_map"].values()))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
            return f"{SAFE_WEIGHTS_INDEX_NAME} is unreadable ({_describe(error)})"
    for name in weights:
        if not (folder / name).is_file():
            return f"{name} is missing"
        try:
            # Opening reads the header and checks that the file is as long as the header says.
            with safe_open(folder / name, framework="pt"):
                pass
        except Exception as error:  # noqa: BLE001 - safetensors raises its own error types and OSError alike
            return f"{name} is unreadable, truncated or corrupt ({_describe(error)})"
    return None


def _fsdp_states(folder: Path) -> dict[str, str] | None:
    """The names of accelerate's FSDP model and optimizer states in `folder` (as the Trainer saves them under FSDP,
    sharded or whole), or None for a checkpoint saved without FSDP."""
    if (folder / f"{FSDP_MODEL_NAME}_0").is_dir():
        return {"model": f"{FSDP_MODEL_NAME}_0", "optimizer": f"{FSDP_OPTIMIZER_NAME}_0"}
    if (folder / f"{FSDP_MODEL_NAME}.bin").is_file():
        return {"model": f"{FSDP_MODEL_NAME}.bin", "optimizer": f"{FSDP_OPTIMIZER_NAME}.bin"}
    return None


def _fsdp_problem(folder: Path, states: dict[str, str]) -> str | None:
    for name in states.values():
        if (folder / name).is_dir() and not (folder / name / ".metadata").is_file():
            return (
                f"{name}/.metadata is missing (a distributed checkpoint writes it last: the checkpoint was cut short)"
            )
    return None


def _describe(error: Exception) -> str:
    # The first sentence only: torch's zip errors go on with generic advice.
    return f"{type(error).__name__}: {str(error).split('. ')[0].strip()}"


def check_checkpoint(checkpoint: str | os.PathLike) -> None:
    """Raises ValueError naming the missing or unreadable file when `checkpoint` cannot be resumed from.

    See [`checkpoint_problem`] for what is checked.
    """
    problem = checkpoint_problem(checkpoint)
    if problem is not None:
        raise ValueError(
            f"Cannot resume from {checkpoint}: {problem}. Pass an earlier, complete checkpoint to "
            "--resume_from_checkpoint, or leave it out to resume from the newest complete checkpoint of --output_dir."
        )


def find_resumable_checkpoint(output_dir: str | os.PathLike) -> tuple[str | None, list[tuple[str, str]]]:
    """Finds the newest complete `checkpoint-<step>` folder of `output_dir`.

    Args:
        output_dir: the run's output folder.

    Returns:
        The checkpoint's path (None when there is none), and `(path, problem)` for every newer checkpoint passed over
        because it is incomplete. Nothing is deleted.
    """
    folder = Path(output_dir)
    steps = {}
    if folder.is_dir():
        for child in folder.iterdir():
            match = _CHECKPOINT_FOLDER.match(child.name)
            if match and child.is_dir():
                steps[child] = int(match.group(1))
    skipped = []
    for checkpoint in sorted(steps, key=steps.get, reverse=True):
        problem = checkpoint_problem(checkpoint)
        if problem is None:
            return str(checkpoint), skipped
        skipped.append((str(checkpoint), problem))
    return None, skipped


class LogAtCheckpointsCallback(TrainerCallback):
    """Logs the running training loss whenever the Trainer saves a checkpoint or stops.

    The Trainer keeps the loss of the steps since its last log in memory only: a checkpoint's log history misses
    them, and so does a run resumed from it. Logging at each checkpoint and at the end makes the log history cover
    every step, which [`mean_training_loss`] needs.
    """

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if control.should_save or control.should_training_stop:
            control.should_log = True
        return control

    def on_epoch_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        return self.on_step_end(args, state, control, **kwargs)


def mean_training_loss(log_history: list[dict]) -> float | None:
    """The mean training loss per optimizer step over the whole run, from a Trainer's log history.

    Each logged `loss` is the mean over the steps since the previous log, so it is weighted by their number. Returns
    None when nothing was logged.
    """
    total, last_step = 0.0, 0
    for entry in log_history:
        if "loss" in entry and entry.get("step", 0) > last_step:
            total += entry["loss"] * (entry["step"] - last_step)
            last_step = entry["step"]
    return total / last_step if last_step else None
