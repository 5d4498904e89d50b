"""Trains a tiny WideResNet with AACETrainer on two gloo processes; run by test_trainer.py under accelerate launch.

Each rank writes its first pass-1 gradient norm, a hash of its final parameters and its logged losses to
`<output_dir>/rank<i>.json`.
"""

import hashlib
import json
import sys
from pathlib import Path

import torch

from hf_aace import AACETrainer, AACETrainingArguments, WideResNetConfig, WideResNetForImageClassification


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


def main(output_dir: Path) -> None:
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
        seed=0,
    )
    trainer = RecordingTrainer(model=model, args=args, train_dataset=Memorise())
    trainer.train()
    digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()
    record = {
        "world_size": args.world_size,
        "first_grad_norm": trainer.first_grad_norm,
        "weights": digest,
        "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
    }
    (output_dir / f"rank{args.process_index}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
