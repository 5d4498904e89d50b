import functools
import inspect

import pytest
import torch
import torch.nn.functional as F

from hf_aace import AACELoss, aace_loss
from hf_aace.losses import aace_loss_unchecked


def paper_aace(logits: torch.Tensor, labels: torch.Tensor, threshold: float, mode: str = "adaptive", a=None):
    """The paper's formula computed directly in float64: softmax, then divide by the wrong-class mass."""
    logits = logits.double()
    p = logits.softmax(-1)
    true = F.one_hot(labels, logits.shape[-1]).bool()
    with torch.no_grad():
        pd = p.detach()
        if mode == "adaptive":
            weights = pd.masked_fill(true, 0.0)
        elif mode == "uniform":
            weights = torch.ones_like(pd).masked_fill(true, 0.0)
        else:
            weights = a.double().masked_fill(true, 0.0)
        q = weights / weights.sum(-1, keepdim=True)
        q_true = pd - torch.relu(pd - threshold)
        q = torch.where(true, q_true, q)
    q_log_q = torch.where(q > 0, q * q.clamp_min(1e-300).log(), torch.zeros_like(q))
    return (q_log_q - q * p.log()).sum(-1)


@pytest.mark.parametrize("num_classes", [2, 10, 100])
@pytest.mark.parametrize("threshold", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("mode", ["adaptive", "uniform"])
def test_matches_paper_formula_values_and_gradients(num_classes, threshold, mode):
    generator = torch.Generator().manual_seed(num_classes)
    logits = (3 * torch.randn(16, num_classes, generator=generator)).requires_grad_()
    labels = torch.randint(0, num_classes, (16,), generator=generator)
    expected_logits = logits.detach().double().requires_grad_()

    loss = aace_loss(logits, labels, threshold=threshold, reduction="none", mode=mode)
    expected = paper_aace(expected_logits, labels, threshold, mode)
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=1e-5, atol=1e-6)

    loss.sum().backward()
    expected.sum().backward()
    torch.testing.assert_close(logits.grad.double(), expected_logits.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_random_mode_uses_uniform_weights_from_the_generator(dtype):
    logits = torch.randn(8, 5, generator=torch.Generator().manual_seed(0), dtype=dtype)
    labels = torch.arange(8) % 5
    loss = aace_loss(logits, labels, reduction="none", mode="random", generator=torch.Generator().manual_seed(7))
    # Drawn in the computation's dtype: float64 draws differ from float32 ones.
    weights = 1 - torch.rand(8, 5, generator=torch.Generator().manual_seed(7), dtype=dtype)
    torch.testing.assert_close(loss.double(), paper_aace(logits, labels, 0.0, "random", weights), rtol=1e-5, atol=1e-6)
    other = aace_loss(logits, labels, reduction="none", mode="random", generator=torch.Generator().manual_seed(8))
    assert not torch.allclose(loss, other)


def test_threshold_zero_is_minus_log_one_minus_p_true():
    logits = torch.randn(32, 7, generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, 7, (32,), generator=torch.Generator().manual_seed(2))
    p_true = logits.softmax(-1).gather(1, labels[:, None]).squeeze(1)
    torch.testing.assert_close(aace_loss(logits, labels, reduction="none"), -torch.log1p(-p_true))


def test_gradcheck_float64():
    logits = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 3, 5, 1])
    # At threshold 0 the gradient with q held constant is the true derivative of -log(1 - p_y).
    assert torch.autograd.gradcheck(lambda z: aace_loss(z, labels, threshold=0.0), (logits,))
    loss = aace_loss(logits, labels)
    (grad,) = torch.autograd.grad(loss, logits)
    p = logits.detach().softmax(-1)
    true = F.one_hot(labels, 6).bool()
    p_true = p.gather(1, labels[:, None])
    expected = torch.where(true, p, -p_true * p / (1 - p_true)) / 4
    torch.testing.assert_close(grad, expected)


def test_grows_as_model_converges_while_cross_entropy_vanishes():
    labels = torch.tensor([0])
    losses, aace_norms, ce_norms = [], [], []
    for margin in [0.0, 2.0, 4.0, 8.0, 16.0]:
        logits = torch.tensor([[margin, 0.0, 0.0, 0.0]], requires_grad=True)
        loss = aace_loss(logits, labels)
        (grad,) = torch.autograd.grad(loss, logits)
        (ce_grad,) = torch.autograd.grad(F.cross_entropy(logits, labels), logits)
        losses.append(loss.item())
        aace_norms.append(grad.norm().item())
        ce_norms.append(ce_grad.norm().item())
    assert all(b > a for a, b in zip(losses, losses[1:]))
    assert all(b > a for a, b in zip(aace_norms, aace_norms[1:]))
    assert all(b < a for a, b in zip(ce_norms, ce_norms[1:]))
    assert ce_norms[-1] < 1e-6 and aace_norms[-1] > 1.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("margin", [100.0, 1e4])
def test_extreme_margins_stay_finite_and_exact(dtype, margin):
    num_classes = 10
    base = torch.randn(3, num_classes, generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([0, 4, 9])
    logits64 = base.double().clone()
    logits64[torch.arange(3), labels] += margin
    logits = logits64.to(dtype).requires_grad_()
    # Closed form at the logits actually represented in this dtype.
    exact = logits.detach().double().requires_grad_()
    true = F.one_hot(labels, num_classes).bool()
    exact_loss = torch.logsumexp(exact, -1) - torch.logsumexp(exact.masked_fill(true, float("-inf")), -1)
    exact_p = exact.detach().softmax(-1)
    exact_q = exact.detach().masked_fill(true, float("-inf")).softmax(-1)
    exact_grad = exact_p - exact_q  # (sum q) p - q with sum q = 1

    loss = aace_loss(logits, labels, reduction="none")
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(logits.grad).all()
    tolerance = 1e-4 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(loss.double(), exact_loss.detach(), rtol=tolerance, atol=0)
    torch.testing.assert_close(logits.grad.double(), exact_grad, rtol=tolerance, atol=tolerance)


def test_paper_formula_is_nan_where_this_one_is_not():
    logits = torch.tensor([[200.0, 0.0, 0.0]])
    labels = torch.tensor([0])
    p = logits.softmax(-1)
    wrong = p[:, 1:]
    assert torch.isnan(wrong / wrong.sum(-1, keepdim=True)).all()
    assert torch.isfinite(aace_loss(logits, labels))


def test_reductions_and_module():
    logits = torch.randn(5, 3)
    labels = torch.tensor([0, 1, 2, 0, 1])
    per_sample = aace_loss(logits, labels, reduction="none")
    assert per_sample.shape == (5,)
    torch.testing.assert_close(aace_loss(logits, labels, reduction="sum"), per_sample.sum())
    # The module and the unchecked variant have the function's defaults and options; gradients too (in adaptive
    # mode, threshold 1 has the value of threshold 0 but not its gradient).
    for options in ({}, {"threshold": 0.2, "reduction": "none", "mode": "uniform"}):
        function_logits = logits.clone().requires_grad_()
        function_loss = aace_loss(function_logits, labels, **options)
        function_loss.sum().backward()
        for variant in (AACELoss(**options), functools.partial(aace_loss_unchecked, **options)):
            variant_logits = logits.clone().requires_grad_()
            variant_loss = variant(variant_logits, labels)
            torch.testing.assert_close(variant_loss, function_loss)
            variant_loss.sum().backward()
            torch.testing.assert_close(variant_logits.grad, function_logits.grad)
    for bad in ({"threshold": 1.5}, {"mode": "const"}, {"reduction": "avg"}):
        with pytest.raises(ValueError, match=f"{next(iter(bad))} must"):
            AACELoss(**bad)


def test_options_are_keyword_only_in_one_order():
    logits = torch.randn(2, 3)
    labels = torch.tensor([0, 1])
    for function in (aace_loss, aace_loss_unchecked):
        with pytest.raises(TypeError, match="positional"):
            function(logits, labels, 0.0)
        parameters = inspect.signature(function).parameters.values()
        options = [p.name for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY]
        assert options == ["threshold", "mode", "reduction", "generator"], function.__name__
    with pytest.raises(TypeError, match="positional"):
        AACELoss(0.0)


@pytest.mark.parametrize(
    ("logits", "labels", "kwargs", "message"),
    [
        (torch.randn(4, 3), torch.tensor([0, 1, 2, 3]), {}, r"labels must lie in \[0, 2\]"),
        (torch.randn(4, 3), torch.tensor([0, 1, -1, 2]), {}, r"labels must lie in"),
        (torch.randn(4, 3, 2), torch.tensor([0, 1, 2, 0]), {}, r"logits must have shape \(batch_size, num_classes\)"),
        (torch.randn(4, 3), torch.tensor([0, 1, 2]), {}, r"labels must have shape \(4,\)"),
        (torch.randn(4, 3), torch.tensor([0.0, 1.0, 2.0, 0.0]), {}, "integer tensor"),
        (torch.randn(4, 1), torch.tensor([0, 0, 0, 0]), {}, "at least 2 classes"),
        (torch.randn(4, 3), torch.tensor([0, 1, 2, 0]), {"threshold": 1.5}, r"threshold must lie in \[0, 1\]"),
        (torch.randn(4, 3), torch.tensor([0, 1, 2, 0]), {"mode": "const"}, "mode must be one of"),
        (torch.randn(4, 3), torch.tensor([0, 1, 2, 0]), {"reduction": "avg"}, "reduction must be one of"),
    ],
)
def test_bad_input_raises_clear_value_error(logits, labels, kwargs, message):
    with pytest.raises(ValueError, match=message):
        aace_loss(logits, labels, **kwargs)


def minus_log_one_minus_p_true(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """-log(1 - p_y) = -log(sum of the wrong-class probabilities), from float64 log-probabilities."""
    log_p = logits.double().log_softmax(-1)
    return -log_p.masked_fill(F.one_hot(labels, logits.shape[-1]).bool(), float("-inf")).logsumexp(-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_masked_wrong_classes_give_the_exact_loss_and_gradient(dtype):
    # A -inf logit (a masked class) has probability 0: cross-entropy is finite there, and so is AACE.
    rows = [
        ([0.0, 0.0, -torch.inf, -torch.inf], 0),
        ([2.0, -torch.inf, 1.0, -torch.inf], 2),
        ([-1.0, 3.0, -torch.inf, 0.5], 1),
        ([5.0, -torch.inf, -3.0, 0.0], 0),
    ]
    logits = torch.tensor([row for row, _ in rows], dtype=dtype, requires_grad=True)
    labels = torch.tensor([label for _, label in rows])
    assert torch.isfinite(F.cross_entropy(logits.float(), labels))

    loss = aace_loss(logits, labels, reduction="none")
    expected_logits = logits.detach().double().requires_grad_()
    expected = minus_log_one_minus_p_true(expected_logits, labels)
    assert torch.isfinite(expected).all()
    # Half-precision logits are computed in float32; only their gradient is rounded back to their dtype.
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss[0].item(), torch.log(torch.tensor(2.0)).item())  # p_y = 1/2: log 2, as CE

    loss.sum().backward()
    expected.sum().backward()
    assert torch.isfinite(logits.grad).all()
    torch.testing.assert_close(logits.grad, expected_logits.grad.to(dtype))
    assert (logits.grad[torch.isinf(logits.detach())] == 0).all()


def test_every_wrong_class_masked_gives_plus_infinity_not_nan():
    # p_y = 1 exactly: -log(1 - p_y) is +inf in every mode; never NaN, never a made-up finite value.
    logits = torch.tensor([[0.0, -torch.inf, -torch.inf]])
    for mode in ("adaptive", "uniform", "random"):
        assert aace_loss(logits, torch.tensor([0]), mode=mode).item() == torch.inf, mode


@pytest.mark.parametrize(
    ("row", "label"),
    [([2e38, 0.0, -2e38], 0), ([2e38, 2e38, -2e38], 0), ([-2e38, 2e38, 3.0], 1), ([1e38, -1e38, -2e38], 1)],
)
def test_logits_near_the_float32_limit_give_the_exact_loss(row, label):
    # x - max overflows to -inf for some classes; the loss itself fits in float32 and is computed exactly.
    logits = torch.tensor([row], requires_grad=True)
    labels = torch.tensor([label])
    assert torch.isfinite(F.cross_entropy(logits, labels))
    loss = aace_loss(logits, labels)
    expected = minus_log_one_minus_p_true(logits.detach(), labels)
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss.double(), expected[0], rtol=1e-6, atol=1e-6)
    loss.backward()
    assert torch.isfinite(logits.grad).all()


def test_loss_beyond_the_float32_range_is_plus_infinity_not_nan():
    # -log(1 - p_y) = 4e38 does not fit in float32: it rounds to +inf, as any float32 overflow does; uniform mode puts
    # target mass on a class whose log-probability overflows, which is +inf too.
    logits = torch.tensor([[2e38, -2e38]])
    for mode in ("adaptive", "uniform"):
        assert aace_loss(logits, torch.tensor([0]), mode=mode).item() == torch.inf
    assert aace_loss(torch.tensor([[0.0, 0.0, -torch.inf]]), torch.tensor([0]), mode="uniform").item() == torch.inf
