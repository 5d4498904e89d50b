"""How the two-pass step meets data-parallel and sharded training: the launches it serves and the ones it refuses.

- One process, or DDP: every process holds the full weights and perturbs them with the gradient of its own
  micro-batch (pass 1 runs without DDP's all-reduce): SAM's m-sharpness, m = the per-process batch.
- FSDP2 (`fully_shard`, accelerate's `fsdp_version: 2`): the weights are sharded and hold one perturbation, so pass 1's
  gradient is reduce-scattered like any other, the perturbation is taken from the gradient of the global batch (its
  norm over all shards) and applied to each process's shard: global-batch SAM. The two differ (a run's records and
  model card say which it was, `perturbation_scope`); compare runs of the same scope only.
- Refused, with the reason: FSDP1 and DeepSpeed (their flat parameters or partitioned gradients give pass 1 no
  gradient per parameter to perturb with), fp16 under FSDP2 (its overflow check would differ per shard), and an FSDP
  request that accelerate would silently run as DDP (it shards only on GPU-type backends).
"""

import gc
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from transformers import Trainer

GLOBAL_BATCH = "global batch"
PER_PROCESS = "per-process batch"


def fsdp_requested(trainer: Trainer) -> bool:
    """Whether the arguments or the launcher ask for FSDP (`--fsdp`, `fsdp_config`, `accelerate launch --use_fsdp`)."""
    return (
        bool(getattr(trainer.args, "fsdp", None))
        or getattr(trainer.args, "fsdp_plugin_args", None) is not None
        or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")
    )


def is_fsdp2(trainer: Trainer) -> bool:
    """Whether the trainer's model is sharded with FSDP2 (by accelerate, or by transformers at load time)."""
    if trainer.is_fsdp_enabled:
        return getattr(trainer.accelerator.state.fsdp_plugin, "fsdp_version", 1) == 2
    return _fsdp2_module(trainer.model) is not None


def check_sharding(trainer: Trainer) -> None:
    """ValueError, naming the way out, for a launch the two-pass step cannot serve exactly."""
    name = type(trainer).__name__
    if trainer.is_deepspeed_enabled:
        raise ValueError(
            f"{name} does not support DeepSpeed: ZeRO partitions the gradients (stages 2 and 3) and the weights "
            "(stage 3), and the first pass's gradient is not available per parameter to perturb with. Launch with "
            "FSDP2 (accelerate launch --use_fsdp --fsdp_version 2 ...) to shard the model, or with DDP "
            "(accelerate launch --multi_gpu ...)."
        )
    if trainer.is_fsdp_enabled and not is_fsdp2(trainer):
        raise ValueError(
            f"{name} does not support FSDP1: its flat parameters give the first pass no gradient per parameter to "
            "perturb with. Use FSDP2: --fsdp_version 2 with accelerate launch, or fsdp_config={'fsdp_version': 2}."
        )
    if not trainer.is_fsdp_enabled and fsdp_requested(trainer) and _fsdp2_module(trainer.model) is None:
        raise ValueError(
            f"FSDP was requested (--fsdp, fsdp_config or accelerate launch --use_fsdp), but accelerate runs this "
            f"launch as {trainer.accelerator.distributed_type.value} and does not shard it (it shards only "
            "multi-process launches on GPU-type backends, not on CPUs), so the run would silently hold the full "
            "weights on every process (DDP). Launch on GPUs, or drop the FSDP settings to train with DDP."
        )
    if is_fsdp2(trainer) and trainer.accelerator.scaler is not None:
        raise ValueError(
            f"{name} does not support fp16 under FSDP2: the first pass's overflow check would be taken per shard, "
            "and the processes could disagree on skipping the perturbation. Use --bf16 (no loss scaling) instead."
        )


def perturbation_scope(trainer: Trainer) -> str:
    """Which batch the perturbation's gradient comes from: the global batch (FSDP2 or one process) or each process's
    own (DDP)."""
    if trainer.args.world_size > 1 and not is_fsdp2(trainer):
        return PER_PROCESS
    return GLOBAL_BATCH


def reduce_gradients_in_step(trainer: Trainer, model: nn.Module) -> None:
    """FSDP2: the gradients of both passes reduce-scattered, also under the Trainer's `no_sync` of accumulation.

    Pass 1 needs its gradient reduced to perturb the shards with the global batch's gradient; left unreduced (the
    Trainer's `no_sync`), the unsharded gradients of pass 1 and of the earlier micro-batches would be summed into the
    next reduction. So every two-pass micro-batch reduces its gradients, and pass 2's accumulate in the sharded
    `.grad`, which is exact. The Trainer's `no_sync` (and transformers' own, for models sharded at load time) turns
    the sync back on at its exit anyway.
    """
    module = _fsdp2_module(trainer.accelerator.unwrap_model(model))
    if module is not None:
        module.set_requires_gradient_sync(True)


@contextmanager
def whole_model_saved(trainer: Trainer) -> Iterator[None]:
    """FSDP with sharded checkpoints (accelerate's default for FSDP2): the state dict type is full inside the block,
    so that a final `save_model` writes the whole model, which `from_pretrained` and the Hub load, where the Trainer
    would write no weights at all; checkpoints stay sharded."""
    plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
    if not trainer.is_fsdp_enabled or plugin is None or "FULL_STATE_DICT" in str(plugin.state_dict_type):
        yield
        return
    names = ("state_dict_type", "state_dict_config", "optim_state_dict_config")
    saved = {name: getattr(plugin, name) for name in names}
    plugin.state_dict_config = plugin.optim_state_dict_config = None
    plugin.set_state_dict_type("FULL_STATE_DICT")
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(plugin, name, value)


def unsharded_class(model: nn.Module) -> type:
    """The model's own class: FSDP2 changes a sharded module's class to a subclass `FSDP<Name>` defined in torch."""
    fsdp_module = _fsdp_module_class()
    if fsdp_module is None or not isinstance(model, fsdp_module):
        return type(model)
    return next(cls for cls in type(model).__mro__ if not issubclass(cls, fsdp_module))


@contextmanager
def own_class(model: nn.Module) -> Iterator[None]:
    """Inside the block an FSDP2-sharded model shows its own class, so that `save_pretrained` saves the model's own
    remote code and `auto_map` (not torch's FSDP files under the class name `FSDP<Name>`)."""
    sharded_class = type(model)
    model.__class__ = unsharded_class(model)
    try:
        yield
    finally:
        model.__class__ = sharded_class


def _fsdp_module_class() -> type | None:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without FSDP2
        return None
    return FSDPModule


def _fsdp2_module(model: nn.Module) -> nn.Module | None:
    fsdp_module = _fsdp_module_class()
    return model if fsdp_module is not None and isinstance(model, fsdp_module) else None


def end_process_group() -> None:
    """Destroys the default process group of a multi-process launch, if there is one, while the interpreter is still
    whole, after every process has reached this point. Left to the interpreter's exit, gloo's worker threads can abort
    a process whose run succeeded (SIGABRT, "terminate called without an active exception"), and NCCL warns that the
    group was not destroyed; destroyed while another process still uses it, the same abort comes more often. Call it
    after a run that ended on every process: the barrier would wait for a process stuck in another collective.

    The garbage is collected first: a finished Trainer sits in reference cycles that keep its wrapped model alive, and
    DDP's reducer holds the group, so without the collection the group's threads would outlive its destruction and
    end only at the interpreter's exit, where they can still abort the process. (Under FSDP2 torch's DTensor caches
    keep the device mesh, and with it the group, until the exit all the same.)"""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        gc.collect()  # frees the models and reducers that hold the group, so destroying it joins its threads now
        torch.distributed.barrier()  # no process tears its connections down while another still uses them
        torch.distributed.destroy_process_group()
