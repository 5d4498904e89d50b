"""Trains a tiny ViT classifier with the two-pass step under FSDP2 on two gloo processes; run by test_sharding.py.

accelerate shards only on GPU-type backends; on CPU processes its FSDP2 path (`fsdp2_prepare_model`, the Trainer's
FSDP branches) is switched on by hand here, which is what a GPU launch with `fsdp_version: 2` gets by itself.

    python -m accelerate.commands.launch --multi_gpu --num_processes 2 tests/fsdp_train.py OUTPUT_DIR RUN [RUN ...]

A run is `METHOD:ACCUMULATION`, `METHOD:ACCUMULATION:ddp` (the same under DDP), `METHOD:ACCUMULATION:resume`
(2 steps with a checkpoint after step 1, then a new trainer resumes from it to step 3), or `save` (AACETrainer on a
WideResNet, saved whole into `<OUTPUT_DIR>/save/saved` with its model card). For each, rank 0 writes the full trained
weights to `<OUTPUT_DIR>/<run>/weights.safetensors` and `record.json` (logged history, resolved
settings, parameter types).
`train(..., processes=1)` in the test's own process is the single-process global-batch reference.

    python -m accelerate.commands.launch --multi_gpu --num_processes 2 --use_fsdp --fsdp_version 2 \
        tests/fsdp_train.py script [scripts/train.py flags]

runs `scripts/train.py` with its trainer sharded, as that launch would on GPUs.
"""

import json
import runpy
import sys
from pathlib import Path

import torch
from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor
from transformers import Trainer, ViTConfig, ViTForImageClassification

from hf_aace import (
    AACETrainer,
    WideResNetConfig,
    WideResNetForImageClassification,
    sharpness_aware,
)
from hf_aace.sharding import end_process_group

from test_trainer import make_args

TRAIN_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train.py"
STEPS = 3
GLOBAL_BATCH = 8
ROWS = GLOBAL_BATCH * STEPS


def tiny_vit() -> ViTForImageClassification:
    torch.manual_seed(0)
    config = ViTConfig(
        image_size=8,
        patch_size=4,
        num_channels=3,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=16,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return ViTForImageClassification(config)


class Images(torch.utils.data.Dataset):
    def __init__(self):
        generator = torch.Generator().manual_seed(1)
        self.pixel_values = torch.randn(ROWS, 3, 8, 8, generator=generator)
        self.labels = torch.randint(0, 3, (ROWS,), generator=generator)

    def __len__(self):
        return ROWS

    def __getitem__(self, index):
        return {"pixel_values": self.pixel_values[index], "labels": self.labels[index]}


def switch_on_fsdp(trainer: Trainer) -> None:
    """Gives the trainer's accelerator the FSDP state a GPU-type launch with the same settings would have."""
    state = trainer.accelerator.state
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    # From the arguments' fsdp_config, or else from `accelerate launch --use_fsdp`'s environment.
    state.fsdp_plugin = FullyShardedDataParallelPlugin(**(trainer.args.fsdp_plugin_args or {}))
    trainer.is_fsdp_enabled = True


class CPUSharding:
    """Put before a Trainer class in the bases: the FSDP settings of its arguments shard, on CPU processes too."""

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        switch_on_fsdp(self)


def run_train_script(argv: list[str]) -> None:
    """`scripts/train.py argv`, every trainer of it sharded as `accelerate launch --use_fsdp` shards on GPUs."""
    create = Trainer.create_accelerator_and_postprocess

    def create_sharded(self):
        create(self)
        switch_on_fsdp(self)

    Trainer.create_accelerator_and_postprocess = create_sharded
    sys.argv = [str(TRAIN_SCRIPT), *argv]
    runpy.run_path(str(TRAIN_SCRIPT), run_name="__main__")


class CPUShardedTrainer(CPUSharding, sharpness_aware(Trainer)):
    pass


class CPUShardedAACETrainer(CPUSharding, AACETrainer):
    pass


def train(
    output_dir: Path, method: str, accumulation: int, processes: int, resume: bool = False, sharded: bool = True
):
    """Trains `STEPS` steps of `GLOBAL_BATCH` rows; two processes shard with FSDP2 (DDP unless `sharded`), one
    process is the reference."""
    per_device = GLOBAL_BATCH // processes // accumulation
    options = {}
    trainer_class = sharpness_aware(Trainer)
    if processes > 1 and sharded:
        trainer_class = CPUShardedTrainer
        # ViTEmbeddings is among ViT's `_no_split_modules`; accelerate 1.16 would then shard its patch embedding twice.
        config = {"fsdp_version": 2, "transformer_layer_cls_to_wrap": ["ViTLayer"]}
        options = dict(fsdp=True, fsdp_config={**config, "state_dict_type": "SHARDED_STATE_DICT"})

    def trainer(**overrides):
        settings = dict(gradient_accumulation_steps=accumulation, max_steps=STEPS, sam_method=method, **options)
        args = make_args(output_dir, per_device_train_batch_size=per_device, **{**settings, **overrides})
        return trainer_class(model=tiny_vit(), args=args, train_dataset=Images())

    if resume:
        # Killed after step 1's checkpoint: a new trainer resumes from it.
        trainer(max_steps=STEPS - 1, save_strategy="steps", save_steps=1).train()
        resumed = trainer()
        resumed.train(resume_from_checkpoint=str(output_dir / "checkpoint-1"))
        return resumed
    first = trainer()
    first.train()
    return first


def train_and_save_own_model(output_dir: Path) -> AACETrainer:
    """AACETrainer on hf_aace's WideResNet with sharded checkpoints, saved whole at the end with its model card."""
    torch.manual_seed(0)
    model = WideResNetForImageClassification(WideResNetConfig(depth=10, widen_factor=1, num_labels=3))
    # Sharded checkpoints (accelerate's default for FSDP2); the final model is saved whole all the same.
    fsdp_config = {"fsdp_version": 2, "state_dict_type": "SHARDED_STATE_DICT"}
    checkpoints = dict(save_strategy="steps", save_steps=1)
    args = make_args(
        output_dir, per_device_train_batch_size=4, max_steps=2, fsdp=True, fsdp_config=fsdp_config, **checkpoints
    )
    trainer = CPUShardedAACETrainer(model=model, args=args, train_dataset=Images())
    trainer.train()
    trainer.save_model(str(output_dir / "saved"))
    trainer.create_model_card(model_name="wrn")
    return trainer


def full_weights(trainer) -> dict[str, torch.Tensor]:
    return {
        name: (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().clone()
        for name, tensor in trainer.model.state_dict().items()
    }


def main(output_dir: Path, runs: list[str]) -> None:
    """Each run, `METHOD:ACCUMULATION[:resume|:ddp]` or `save`, trains into its own folder `<output_dir>/<run>`."""
    for run in runs:
        folder = output_dir / run.replace(":", "-")
        if run == "save":
            trainer = train_and_save_own_model(folder)
        else:
            method, accumulation, *option = run.split(":")
            ddp = option == ["ddp"]
            trainer = train(folder, method, int(accumulation), 2, resume=option == ["resume"], sharded=not ddp)
        weights = full_weights(trainer)
        if trainer.args.process_index == 0:
            save_file({name: t.contiguous() for name, t in weights.items()}, str(folder / "weights.safetensors"))
            record = {
                "history": trainer.state.log_history,
                "resolved": trainer.resolved_sharpness_aware(),
                "parameter_types": sorted({type(p).__name__ for p in trainer.model.parameters()}),
                "sharded_units": sorted({type(m).__name__ for m in trainer.model.modules() if hasattr(m, "unshard")}),
                "world_size": trainer.args.world_size,
            }
            (folder / "record.json").write_text(json.dumps(record))


if __name__ == "__main__":
    if sys.argv[1] == "script":
        run_train_script(sys.argv[2:])  # scripts/train.py ends its process group itself
    else:
        main(Path(sys.argv[1]), sys.argv[2:])
        end_process_group()
