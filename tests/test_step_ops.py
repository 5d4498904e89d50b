"""The two-pass step is host-light: no value read back to the host, and a perturbation whose operations do not grow
with the number of parameter tensors (foreach kernels). Counted on the CPU with `hf_aace.op_count.OpCounter`."""

import pytest
import torch
from torch import nn

from hf_aace import AACETrainer
from hf_aace.methods import METHODS
from hf_aace.op_count import OpCounter
from hf_aace.perturbation import WeightPerturbation
from hf_aace.step import two_pass_step

from test_tasks import build, make_args, micro_batches


def perturbation_ops(method: str, depth: int, scaler=None) -> tuple[int, int]:
    """Operations and syncs of a second two-pass step beyond its passes, for a stack of `depth` linear layers."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(depth)])
    x = torch.randn(3, 4)
    params = list(model.parameters())

    def first_pass():
        return model(x).square().mean()

    def second_pass():
        loss = model(x).square().mean()
        loss.backward()
        return loss

    def step():
        return two_pass_step(
            params, first_pass, second_pass, method=METHODS[method], rho=0.1, normalize=method != "aace",
            perturbation=perturbation, scaler=scaler,
        )  # fmt: skip

    perturbation = WeightPerturbation()
    step()  # the first step allocates the saved copy
    for p in params:
        p.grad = None
    with OpCounter() as plain:
        (scaler.scale(first_pass()) if scaler is not None else first_pass()).backward()
        for p in params:
            p.grad = None
        second_pass()
    for p in params:
        p.grad = None
    with OpCounter() as counted:
        step()
    return counted.kernels - plain.kernels, counted.syncs


@pytest.mark.parametrize("method", ["sam", "asam", "aace"])
def test_perturbation_takes_a_fixed_number_of_operations_and_no_sync(method):
    small, small_syncs = perturbation_ops(method, depth=2)
    large, large_syncs = perturbation_ops(method, depth=20)
    assert small == large and small <= 20
    assert small_syncs == large_syncs == 0


def test_fp16_overflow_check_stays_on_the_device():
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    small, syncs = perturbation_ops("aace", depth=2, scaler=scaler)
    large, _ = perturbation_ops("aace", depth=20, scaler=scaler)
    assert small == large and syncs == 0


def step_syncs(tmp_path, name: str, method: str) -> int:
    """Host syncs of a second AACETrainer.training_step (the first checks the AACE pairs once)."""
    model, dataset = build(name)
    trainer = AACETrainer(model=model, args=make_args(tmp_path, sam_method=method), train_dataset=dataset)
    trainer.current_gradient_accumulation_steps = 1  # set by train() in normal use
    trainer.create_optimizer()
    batches = micro_batches(dataset, 4, 2)
    trainer.training_step(trainer.model_wrapped, dict(batches[0]))
    with OpCounter() as counter:
        trainer.training_step(trainer.model_wrapped, dict(batches[1]))
    return counter.syncs


@pytest.mark.parametrize("name", ["bert_single_label", "gpt2", "vit"])
def test_training_step_reads_back_only_what_the_models_forward_does(tmp_path, name):
    # BERT's forward itself reads its attention mask back (transformers' masking utilities): once per forward.
    per_forward = step_syncs(tmp_path, name, "sgd")
    assert {method: step_syncs(tmp_path, name, method) for method in ("sam", "asam", "aace")} == dict.fromkeys(
        ("sam", "asam", "aace"), 2 * per_forward
    )


@pytest.mark.parametrize("name", ["bert_single_label", "vit"])
def test_a_reused_perturbation_costs_three_foreach_kernels_and_no_sync(tmp_path, name):
    model, dataset = build(name)
    args = make_args(tmp_path, perturbation_interval=2, perturbation_reuse=True)
    trainer = AACETrainer(model=model, args=args, train_dataset=dataset)
    trainer.current_gradient_accumulation_steps = 1  # set by train() in normal use
    trainer.create_optimizer()
    batches = micro_batches(dataset, 4, 2)
    trainer.training_step(trainer.model_wrapped, dict(batches[0]))  # global step 0: two passes, e kept
    trainer.state.global_step = 1
    with OpCounter() as reused:
        trainer.training_step(trainer.model_wrapped, dict(batches[1]))
    args.perturbation_reuse = False
    with OpCounter() as plain:
        trainer.training_step(trainer.model_wrapped, dict(batches[1]))
    # Save the weights, add e, restore: one foreach kernel each, whatever the number of parameter tensors.
    assert reused.kernels - plain.kernels == 3 and reused.syncs == plain.syncs
