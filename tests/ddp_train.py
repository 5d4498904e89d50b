"""Trains a tiny WideResNet with AACETrainer on two gloo processes; run by test_trainer.py under accelerate launch.

Each rank writes its first pass-1 gradient norm, the one logged at step 1, a hash of its final parameters, its logged
losses and a hash of the first augmentation its trainer drew to `<output_dir>/rank<i>.json`, and the threads still
running once its process group is ended to `<output_dir>/rank<i>-threads.json`. `--static_graph`
trains with `ddp_static_graph`.
"""

import hashlib
import json
import os
import sys
from pathlib import Path

import torch

from hf_aace import (
    AACETrainer,
    AACETrainingArguments,
    BatchAugmentation,
    WideResNetConfig,
    WideResNetForImageClassification,
)
from hf_aace.sharding import end_process_group

# A fixed uint8 batch: the same images on every rank, so different draws give different augmented batches.
PROBE_IMAGES = (torch.arange(4 * 3 * 8 * 8) % 251).to(torch.uint8).reshape(4, 3, 8, 8)


def digest(tensors) -> str:
    return hashlib.sha256(b"".join(t.detach().contiguous().numpy().tobytes() for t in tensors)).hexdigest()


def probe_augmentation(seed: int, cls: type = BatchAugmentation) -> BatchAugmentation:
    return cls((0.5,) * 3, (0.25,) * 3, crop_padding=2, flip=True, cutout_size=4, seed=seed)


class ProbeAugmentation(BatchAugmentation):
    """The real augmentation stream, recorded on the probe batch at the first training step; batches pass unchanged."""

    first_draw = None

    def __call__(self, images):
        if self.first_draw is None:
            self.first_draw = digest([super().__call__(PROBE_IMAGES)])
        return images


class RecordingTrainer(AACETrainer):
    first_grad_norm = None

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.first_grad_norm is None:
            self.first_grad_norm = self._metric_sums["perturbation_grad_norm"].item()
        return loss


class Memorise(torch.utils.data.Dataset):
    def __init__(self):
        generator = torch.Generator().manual_seed(0)
        self.pixel_values = torch.randn(64, 3, 8, 8, generator=generator)
        self.labels = torch.randint(0, 3, (64,), generator=generator)

    def __len__(self):
        return 64

    def __getitem__(self, index):
        return {"pixel_values": self.pixel_values[index], "labels": self.labels[index]}


def main(output_dir: Path, static_graph: bool) -> None:
    torch.manual_seed(0)
    model = WideResNetForImageClassification(WideResNetConfig(depth=10, widen_factor=1, num_labels=3))
    args = AACETrainingArguments(
        output_dir=str(output_dir),
        use_cpu=True,
        per_device_train_batch_size=8,
        learning_rate=0.1,
        lr_scheduler_type="constant",
        optim="sgd",
        max_steps=24,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        ddp_find_unused_parameters=False,
        ddp_static_graph=static_graph,
        seed=0,
    )
    augmentation = probe_augmentation(999, ProbeAugmentation)  # another seed: the trainer reseeds it per process
    trainer = RecordingTrainer(model=model, args=args, train_dataset=Memorise(), augmentation=augmentation)
    trainer.train()
    # The documented stream of each process: args.seed + process index.
    expected_augmentation = probe_augmentation(args.seed + args.process_index)(PROBE_IMAGES)
    record = {
        "world_size": args.world_size,
        "first_grad_norm": trainer.first_grad_norm,
        "weights": digest(model.parameters()),
        "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
        "logged_first_grad_norm": trainer.state.log_history[0]["perturbation_grad_norm"],
        "first_augmentation": augmentation.first_draw,
        "expected_augmentation": digest([expected_augmentation]),
    }
    (output_dir / f"rank{args.process_index}.json").write_text(json.dumps(record))


def thread_names() -> list[str]:
    """The names of this process's live threads (Linux): gloo's are pt_gloo_runloop and gloo_tcp_loop."""
    tasks = Path("/proc/self/task")
    names = []
    for task in tasks.iterdir() if tasks.is_dir() else ():
        try:
            names.append((task / "comm").read_text().strip())
        except FileNotFoundError:  # a thread that ended while they were listed
            pass
    return sorted(names)


if __name__ == "__main__":
    output_dir = Path(sys.argv[1])
    main(output_dir, static_graph="--static_graph" in sys.argv[2:])
    end_process_group()
    # What is still running once the group is ended: gloo's threads left here would end only at the interpreter's exit.
    (output_dir / f"rank{os.environ['RANK']}-threads.json").write_text(json.dumps(thread_names()))
