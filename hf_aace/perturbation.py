"""The SAM maths: a weight perturbation from the first pass's gradient, applied and undone in place.

For the gradient g of the perturbation loss at weights w (Foret et al. 2021; Kwon et al. 2021; Ratchatorn & Tanaka
2024):

    sam   e = +rho * g / ||g||                  climb the cross-entropy to the worst nearby weights
    asam  e = +rho * w^2 * g / ||w g||          the same in weight-scaled coordinates
    aace  e = -rho * g    (or / ||g||)          descend the AACE loss: move probability away from the labels

with ||.|| the global L2 norm over all parameters plus 1e-12. Everything runs as `torch._foreach_*` kernels on the
gradient tensors themselves (they become e) and on one preallocated copy of the weights.

Sharded parameters (FSDP2's DTensors) take the same maths: the norms are global (DTensor reduces them over the mesh),
and the perturbation is applied to and restored from each process's local shard.
"""

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from .methods import SharpnessAwareMethod

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch before 2.5 (the class was private) or without torch.distributed: nothing is sharded
    DTensor = ()

EPSILON = 1e-12


def global_norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """L2 norm of all tensors taken together, as a 0-dim tensor on their device (no host sync).

    Taken in float32 for tensors of lower precision, in their own dtype above (float64). For sharded DTensors the
    norm is over the whole tensors, reduced across their mesh, and returned as a plain tensor.
    """
    dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32  # not promote_types: an aten op
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tensors, dtype=dtype)))
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def local_shards(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Each DTensor's local shard (sharing its storage), other tensors as they are: in-place foreach kernels and
    copies run on these (`torch._foreach_copy_` does not take DTensors)."""
    return [t.to_local() if isinstance(t, DTensor) else t for t in tensors]


@torch.no_grad()
def perturbation_from_gradients_(
    grads: list[torch.Tensor],
    params: Sequence[torch.Tensor],
    method: SharpnessAwareMethod,
    rho: float,
    normalize: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Turns the gradients, in place, into the perturbation e of `method`.

    Args:
        grads: gradient of the perturbation loss for each parameter; overwritten with e.
        params: the parameters at which the gradient was taken (weight-scaled methods scale by them).
        method: an entry of `hf_aace.methods.METHODS`.
        rho: perturbation radius.
        normalize: divide by the (ASAM: weight-scaled) gradient norm.

    Returns:
        `(grad_norm, perturbation_norm)`: ||g|| (ASAM: ||w g||) and ||e||, as 0-dim tensors.
    """
    if method.weight_scaled:
        # ASAM works in coordinates scaled by |w|: the norm is taken of w * g and e = rho * w^2 * g / ||w g||.
        torch._foreach_mul_(grads, params)
        grad_norm = global_norm(grads)
        torch._foreach_mul_(grads, params)
    else:
        grad_norm = global_norm(grads)
    scale = method.sign * rho
    if normalize:
        torch._foreach_mul_(grads, (scale / (grad_norm + EPSILON)).to(grads[0].dtype))
    else:
        torch._foreach_mul_(grads, scale)
    return grad_norm, global_norm(grads)


class WeightPerturbation:
    """Applies a perturbation to parameters and restores them bit for bit from a saved copy.

    Subtracting e again would not give back the same bits, and processes would drift apart under DDP, which never
    re-broadcasts parameters. The copy is allocated once and reused every step.
    """

    def __init__(self) -> None:
        self._saved: list[torch.Tensor] | None = None
        self.kept: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None

    @torch.no_grad()
    def apply_(self, params: list[torch.Tensor], perturbation: list[torch.Tensor], keep: bool = False) -> None:
        """Saves the parameters, then adds the perturbation to them in place.

        Args:
            params: the parameters to perturb.
            perturbation: e, one tensor per parameter.
            keep: hold `(params, perturbation)` in `kept` (the tensors themselves) for later steps to apply again.
        """
        if keep:
            self.kept = (list(params), list(perturbation))
        params, perturbation = local_shards(params), local_shards(perturbation)
        if self._saved is None or len(self._saved) != len(params):
            self._saved = [torch.empty_like(p) for p in params]
        torch._foreach_copy_(self._saved, params)
        torch._foreach_add_(params, perturbation)

    @torch.no_grad()
    def restore_(self, params: list[torch.Tensor]) -> None:
        """Copies the saved parameters back."""
        if self._saved is None:
            raise RuntimeError("restore_() called before apply_(): there is nothing to restore.")
        torch._foreach_copy_(local_shards(params), self._saved)


@contextmanager
def frozen_batchnorm_statistics(model: nn.Module) -> Iterator[None]:
    """Keeps BatchNorm running statistics (and `num_batches_tracked`) unchanged inside the block.

    In train mode with `track_running_stats=False`, BatchNorm normalises with the batch statistics, as usual, but
    updates nothing; the flag is restored on exit.
    """
    modules = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    for module in modules:
        module.track_running_stats = False
    try:
        yield
    finally:
        for module in modules:
            module.track_running_stats = True


@torch.no_grad()
def zeroed_if(grads: list[torch.Tensor], flag: torch.Tensor) -> list[torch.Tensor]:
    """The gradients, all zero where the 1-element `flag` is non-zero, without reading the flag back to the host.

    They become views of one flat buffer (one concatenation and one `where`, whatever the number of tensors), so that
    infinities and NaNs are replaced, not multiplied by zero.
    """
    flat = torch.cat([g.reshape(-1) for g in grads])
    flat = torch.where(flag.bool(), torch.zeros((), dtype=flat.dtype, device=flat.device), flat)
    return [piece.view_as(g) for piece, g in zip(flat.split([g.numel() for g in grads]), grads)]


@torch.no_grad()
def unscale_gradients_(grads: list[torch.Tensor], scaler: torch.amp.GradScaler) -> torch.Tensor:
    """Unscales fp16-scaled gradients in place without touching the scaler's per-optimizer state.

    `scaler.unscale_(optimizer)` may run only once per optimizer step, and the Trainer calls it for the second
    pass; this variant leaves the scaler untouched.

    Returns:
        A 1-element float tensor, non-zero when any gradient is inf or NaN.
    """
    found_inf = torch.zeros(1, device=grads[0].device)
    inv_scale = scaler._scale.double().reciprocal().float().to(grads[0].device)
    torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, inv_scale)
    return found_inf
