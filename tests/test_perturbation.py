import pytest
import torch
from torch import nn

from hf_aace.methods import METHODS
from hf_aace.perturbation import (
    WeightPerturbation,
    frozen_batchnorm_statistics,
    global_norm,
    perturbation_from_gradients_,
    unscale_gradients_,
)


def tensors(seed: int, shapes=((3, 4), (5,), (2, 2, 3))):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=generator) for shape in shapes]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_global_norm_is_the_norm_of_everything_concatenated(dtype):
    # Half-precision gradients are summed in float32: this norm (about 1e5) overflows float16 and needs more digits
    # than bfloat16 has.
    values = [(1000 * v).to(dtype) for v in tensors(0, shapes=((100, 100), (5,), (2, 2, 3)))]
    expected = torch.cat([v.double().flatten() for v in values]).norm()
    norm = global_norm(values)
    assert norm.dtype == torch.float32
    torch.testing.assert_close(norm.double(), expected, rtol=1e-5, atol=0)


@pytest.mark.parametrize(
    ("method", "normalize", "formula"),
    [
        ("aace", False, lambda w, g, rho: [-rho * gi for gi in g]),
        ("aace", True, lambda w, g, rho: [-rho * gi / (global_norm(g) + 1e-12) for gi in g]),
        ("sam", True, lambda w, g, rho: [rho * gi / (global_norm(g) + 1e-12) for gi in g]),
        ("sam", False, lambda w, g, rho: [rho * gi for gi in g]),
        (
            "asam",
            True,
            lambda w, g, rho: [
                rho * wi * wi * gi / (global_norm([wj * gj for wj, gj in zip(w, g)]) + 1e-12) for wi, gi in zip(w, g)
            ],
        ),
    ],
)
def test_perturbation_formulas(method, normalize, formula):
    params, grads = tensors(1), tensors(2)
    expected = formula(params, grads, 0.3)
    work = [g.clone() for g in grads]
    grad_norm, perturbation_norm = perturbation_from_gradients_(work, params, METHODS[method], 0.3, normalize)
    for e, x in zip(work, expected):
        torch.testing.assert_close(e, x)
    scaled = [p * g for p, g in zip(params, grads)] if method == "asam" else grads
    torch.testing.assert_close(grad_norm, global_norm(scaled))
    torch.testing.assert_close(perturbation_norm, global_norm(expected))


def test_apply_then_restore_is_bit_exact_and_reuses_its_buffers():
    params = [nn.Parameter(t) for t in tensors(3)]
    original = [p.detach().clone() for p in params]
    perturbation = WeightPerturbation()
    for step in range(2):
        e = [torch.full_like(p, 0.1 * (step + 1)) for p in params]
        perturbation.apply_(params, e)
        for p, o, ei in zip(params, original, e):
            assert torch.equal(p.detach(), o + ei)
        saved = [s.data_ptr() for s in perturbation._saved]
        perturbation.restore_(params)
        for p, o in zip(params, original):
            assert torch.equal(p.detach(), o)
    assert [s.data_ptr() for s in perturbation._saved] == saved


def test_restore_before_apply_is_an_error():
    with pytest.raises(RuntimeError, match="before apply_"):
        WeightPerturbation().restore_([torch.zeros(1)])


def test_frozen_batchnorm_keeps_statistics_and_counts_but_normalises_with_the_batch():
    norm = nn.BatchNorm2d(3).train()
    inputs = torch.randn(8, 3, 4, 4) * 3 + 1
    norm(inputs)
    state = {k: v.clone() for k, v in norm.state_dict().items()}
    with frozen_batchnorm_statistics(nn.Sequential(norm)):
        output = norm(inputs)
    for key, value in norm.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert norm.track_running_stats
    # Batch statistics, not running ones, were used inside the block.
    torch.testing.assert_close(output.mean((0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    norm(inputs)
    assert norm.num_batches_tracked.item() == 2


def test_unscale_gradients_without_consuming_the_scaler():
    model = nn.Linear(4, 2)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    loss = model(torch.randn(3, 4)).square().mean()
    expected = torch.autograd.grad(loss, list(model.parameters()), retain_graph=True)
    grads = list(torch.autograd.grad(scaler.scale(loss), list(model.parameters())))
    found_inf = unscale_gradients_(grads, scaler)
    assert found_inf.item() == 0
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e)
    assert not scaler._per_optimizer_states  # the Trainer's unscale_ per optimizer step stays available
    grads[0][0, 0] = float("inf")
    assert unscale_gradients_(grads, scaler).item() == 1
