"""The Trainer behaviours hf_aace copies or relies on still hold on the installed transformers: a release that changes
one fails here, not silently in a training run."""

import inspect
from types import SimpleNamespace

import pytest
from transformers import Trainer

from hf_aace.trainer_internals import (
    PRIVATE_TRAINER_ATTRIBUTES,
    activation_checkpointing_kwargs,
    compute_loss_pops_labels,
    loss_is_scaled_for_ga,
    loss_scale_across_processes,
    model_loss_kwargs,
)


@pytest.mark.parametrize("name", PRIVATE_TRAINER_ATTRIBUTES)
def test_private_trainer_attributes_exist(name):
    assert callable(getattr(Trainer, name, None)), f"Trainer.{name} is gone: update hf_aace.trainer_internals"


def test_training_step_still_prepares_and_scales_as_copied():
    # training_step_preparation and loss_is_scaled_for_ga copy these lines of Trainer.training_step.
    source = inspect.getsource(Trainer.training_step)
    for line in (
        "model.train()",
        "self.optimizer.train()",
        "self._prepare_inputs(inputs)",
        "self.compute_loss_context_manager()",
        "self.model_accepts_loss_kwargs",
        "num_items_in_batch is",
        "self.compute_loss_func is",
        "loss / self.current_gradient_accumulation_steps",
        "loss.mean()",
    ):
        assert line in source, f"Trainer.training_step no longer has {line!r}: update hf_aace.trainer_internals"
    # The subclass override of the rule (after transformers 5.17); before it, the rule alone applies.
    assert "self.loss_is_scaled_for_ga" in source or not hasattr(Trainer, "loss_is_scaled_for_ga")
    compute_loss = inspect.getsource(Trainer.compute_loss)
    for line in ("self.label_smoother is not None or self.compute_loss_func is not None", "num_items_in_batch"):
        assert line in compute_loss, f"Trainer.compute_loss no longer has {line!r}"


def fake_trainer(**fields):
    values = dict(
        loss_is_scaled_for_ga=None, model_accepts_loss_kwargs=False, compute_loss_func=None, label_smoother=None
    )
    values.update(fields)
    return SimpleNamespace(**values)


def test_copied_rules_give_the_trainers_answers():
    assert loss_is_scaled_for_ga(fake_trainer(model_accepts_loss_kwargs=True), 12)
    assert not loss_is_scaled_for_ga(fake_trainer(model_accepts_loss_kwargs=True), None)
    assert loss_is_scaled_for_ga(fake_trainer(compute_loss_func=len), None)
    assert not loss_is_scaled_for_ga(fake_trainer(loss_is_scaled_for_ga=False, compute_loss_func=len), 12)
    assert model_loss_kwargs(fake_trainer(model_accepts_loss_kwargs=True), 7) == {"num_items_in_batch": 7}
    assert model_loss_kwargs(fake_trainer(), 7) == {}
    assert compute_loss_pops_labels(fake_trainer(label_smoother=object()))
    assert not compute_loss_pops_labels(fake_trainer())


def test_losses_normalised_across_processes_are_scaled_in_place_as_copied():
    # loss_scale_across_processes copies this rule of Trainer.compute_loss; check_pairs relies on the scaling being
    # in place (the model's own output changes with it).
    compute_loss = inspect.getsource(Trainer.compute_loss)
    for line in ("self.args.average_tokens_across_devices", "loss *= "):
        assert line in compute_loss, f"Trainer.compute_loss no longer has {line!r}: update hf_aace.trainer_internals"
    accelerator = SimpleNamespace(num_processes=4)
    args = SimpleNamespace(average_tokens_across_devices=True, n_gpu=1)
    trainer = fake_trainer(model_accepts_loss_kwargs=True, args=args, accelerator=accelerator)
    assert loss_scale_across_processes(trainer, 12) == 4
    assert loss_scale_across_processes(trainer, None) == 1
    assert loss_scale_across_processes(fake_trainer(args=args, accelerator=accelerator), 12) == 1
    args.average_tokens_across_devices = False
    assert loss_scale_across_processes(trainer, 12) == 1


def test_activation_checkpointing_settings_under_both_names():
    new = SimpleNamespace(activation_checkpointing=True, activation_checkpointing_kwargs={"use_reentrant": True})
    old = SimpleNamespace(gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False})
    assert activation_checkpointing_kwargs(new) == (True, {"use_reentrant": True})
    assert activation_checkpointing_kwargs(old) == (True, {"use_reentrant": False})
    assert activation_checkpointing_kwargs(SimpleNamespace()) == (False, {})
