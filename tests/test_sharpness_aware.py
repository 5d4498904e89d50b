"""The seam between the two-pass step and the Trainer: the framework-free step, `sharpness_aware(trainer_class)`,
`SharpnessAwareArguments`, the pairs AACE is taken on, and what pass 1 gets from `training_step`'s preparation."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    HfArgumentParser,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
    T5Config,
    T5ForConditionalGeneration,
    Trainer,
    TrainingArguments,
    Wav2Vec2Config,
    Wav2Vec2ForCTC,
    default_data_collator,
)

from hf_aace import AACETrainer, SharpnessAwareArguments, aace_loss, sharpness_aware
from hf_aace.divergence import DivergenceCallback, TrainingDivergedError
from hf_aace.image_batches import ImageBatchMixin
from hf_aace.methods import METHODS
from hf_aace.perturbation import WeightPerturbation
from hf_aace.step import autograd_gradients, backward_gradients, two_pass_step
from hf_aace.tasks import AACETaskError

from test_tasks import BATCH, VOCAB, ListDataset, build, micro_batches, perturbation_by_hand
from test_tasks import make_args as aace_args


def plain_args(tmp_path, cls=TrainingArguments, **overrides):
    """test_trainer's settings (one SGD step, no clipping, sequential batches of 4) on another arguments class."""
    settings = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=BATCH, learning_rate=0.1, optim="sgd", weight_decay=0.0,
        max_grad_norm=0.0, lr_scheduler_type="constant", max_steps=1, train_sampling_strategy="sequential",
        report_to="none", use_cpu=True, save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0,
    )  # fmt: skip
    settings.update(overrides)
    return cls(**settings)


def count_forwards(model: nn.Module) -> list[int]:
    calls = [0]
    model.register_forward_pre_hook(lambda module, args: calls.__setitem__(0, calls[0] + 1))
    return calls


# The framework-free step.


@pytest.mark.parametrize("method", ["sam", "asam", "aace"])
@pytest.mark.parametrize("gradient", [backward_gradients, autograd_gradients])
def test_two_pass_step_alone_equals_the_step_by_hand(method, gradient):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x, y = torch.randn(5, 3), torch.tensor([0, 1, 1, 0, 1])
    params = list(model.parameters())
    w = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.ones_like(p)  # an earlier micro-batch's gradient: kept, and added to
    entry, rho = METHODS[method], 0.3

    def first_pass():
        logits = model(x)
        return aace_loss(logits, y) if method == "aace" else F.cross_entropy(logits, y)

    def second_pass():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss.detach()

    loss, stats = two_pass_step(
        params, first_pass, second_pass, method=entry, rho=rho, normalize=method != "aace",
        perturbation=WeightPerturbation(), gradient=gradient,
    )  # fmt: skip

    # By hand, on a copy.
    reference = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    reference.load_state_dict(model.state_dict())
    objective = aace_loss(reference(x), y) if method == "aace" else F.cross_entropy(reference(x), y)
    g = torch.autograd.grad(objective, list(reference.parameters()))
    e = perturbation_by_hand(method, w, g, rho, normalize=method != "aace")
    with torch.no_grad():
        for p, e_p in zip(reference.parameters(), e):
            p.add_(e_p)
    expected_loss = F.cross_entropy(reference(x), y)
    expected_grads = torch.autograd.grad(expected_loss, list(reference.parameters()))

    assert all(torch.equal(p, saved) for p, saved in zip(params, w)), "weights not restored bit for bit"
    for p, expected in zip(params, expected_grads):
        torch.testing.assert_close(p.grad, expected + 1, rtol=1e-5, atol=1e-6)
    assert loss.item() == pytest.approx(expected_loss.item(), rel=1e-5)
    assert stats.objective.item() == pytest.approx(objective.item(), rel=1e-6)
    assert stats.perturbation_norm.item() == pytest.approx(torch.sqrt(sum((t**2).sum() for t in e)).item(), rel=1e-5)


def test_two_pass_step_restores_the_weights_when_the_second_pass_fails():
    model = nn.Linear(3, 2)
    params = list(model.parameters())
    saved = [p.detach().clone() for p in params]

    def failing():
        assert not torch.equal(params[0], saved[0])  # the second pass runs at w + e
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        two_pass_step(
            params, lambda: model(torch.ones(1, 3)).sum(), failing, method=METHODS["sam"], rho=0.1, normalize=True,
            perturbation=WeightPerturbation(),
        )  # fmt: skip
    assert all(torch.equal(p, s) for p, s in zip(params, saved))


def test_two_pass_step_refuses_an_objective_without_gradient_to_the_weights():
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="does not depend on any trainable parameter"):
        two_pass_step(
            list(model.parameters()), lambda: (model.weight.detach() * 0).sum() + torch.zeros((), requires_grad=True),
            lambda: None, method=METHODS["sam"], rho=0.1, normalize=True, perturbation=WeightPerturbation(),
        )  # fmt: skip


# sharpness_aware(trainer_class) and its settings.


def test_sharpness_aware_returns_one_subclass_per_trainer_and_refuses_what_it_cannot_serve():
    cls = sharpness_aware(Seq2SeqTrainer)
    assert issubclass(cls, Seq2SeqTrainer) and cls is sharpness_aware(Seq2SeqTrainer)
    assert cls.__name__ == "SharpnessAwareSeq2SeqTrainer" and sharpness_aware(cls) is cls
    assert issubclass(AACETrainer, sharpness_aware(Trainer))
    dpo = type("DPOTrainer", (Trainer,), {})
    with pytest.raises(ValueError, match="cannot serve DPOTrainer.*chosen and rejected"):
        sharpness_aware(dpo)
    with pytest.raises(ValueError, match="cannot serve MyGRPO \\(GRPOTrainer\\): it generates completions"):
        sharpness_aware(type("MyGRPO", (type("GRPOTrainer", (Trainer,), {}),), {}))
    with pytest.raises(ValueError, match="takes a transformers.Trainer subclass"):
        sharpness_aware(nn.Module)


def test_settings_parse_beside_any_arguments_class_and_reach_the_step(tmp_path):
    parser = HfArgumentParser((Seq2SeqTrainingArguments, SharpnessAwareArguments))
    training, settings = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--sam_method", "asam", "--rho", "0.3", "--stop_on_divergence", "false"]
    )
    assert (settings.sam_method, *settings.perturbation_for()) == ("asam", 0.3, True)
    with pytest.raises(ValueError, match="--rho must be a finite number > 0"):
        SharpnessAwareArguments(rho=-1.0)
    model, dataset = build("dict_module")
    trainer = sharpness_aware(Trainer)(
        model=model, args=plain_args(tmp_path), train_dataset=dataset, sharpness_aware_args=settings
    )
    assert trainer.sharpness_aware_args is settings
    # Off: plain Trainer behaviour, no divergence stop.
    assert not any(isinstance(c, DivergenceCallback) for c in trainer.callback_handler.callbacks)
    trainer.train()
    entry = next(e for e in trainer.state.log_history if "perturbation_norm" in e)
    assert entry["perturbation_norm"] > 0
    # Without settings: the defaults (aace), and the divergence stop.
    default = sharpness_aware(Trainer)(model=model, args=plain_args(tmp_path), train_dataset=dataset)
    assert default.sharpness_aware_args.sam_method == "aace"
    assert any(isinstance(c, DivergenceCallback) for c in default.callback_handler.callbacks)
    with pytest.raises(ValueError, match="give them once"):
        AACETrainer(model=model, args=aace_args(tmp_path), train_dataset=dataset, sharpness_aware_args=settings)


def test_stop_on_divergence_off_lets_a_diverged_run_finish_as_plain_trainer(tmp_path):
    model, dataset = build("dict_module")
    dataset.rows[0]["features"] = torch.full((5,), float("nan"))  # a broken row: the weights become NaN
    args = aace_args(tmp_path, sam_method="sam", max_steps=2)
    with pytest.raises(TrainingDivergedError):
        AACETrainer(model=model, args=args, train_dataset=dataset).train()
    model, _ = build("dict_module")
    args = aace_args(tmp_path, sam_method="sam", max_steps=2, stop_on_divergence=False)
    trainer = AACETrainer(model=model, args=args, train_dataset=dataset)
    trainer.train()  # as plain Trainer: no error, the run goes on
    assert trainer.state.global_step == 2
    assert not all(torch.isfinite(p).all() for p in model.parameters())


# Exactly two forwards per micro-batch, and pass 1 prepared as training_step prepares pass 2.


def test_two_forwards_per_micro_batch_with_accumulation(tmp_path):
    model, dataset = build("bert_single_label")
    calls = count_forwards(model)
    args = aace_args(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=2)
    AACETrainer(model=model, args=args, train_dataset=dataset, data_collator=default_data_collator).train()
    assert calls[0] == 2 * 2 * 2  # steps x micro-batches x passes


class ModalSGD(torch.optim.SGD):
    """An optimizer with train()/eval() modes, as schedule-free optimizers have."""

    def __init__(self, params, **kwargs):
        super().__init__(params, **kwargs)
        self.mode = "train"

    def train(self):
        self.mode = "train"

    def eval(self):
        self.mode = "eval"


def test_first_pass_gets_the_optimizer_and_model_in_train_mode_after_an_evaluation(tmp_path):
    model, dataset = build("dict_module")
    optimizer = ModalSGD(model.parameters(), lr=0.1)
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append((optimizer.mode, module.training)))
    args = aace_args(tmp_path, max_steps=2, eval_strategy="steps", eval_steps=1)
    trainer = AACETrainer(
        model=model, args=args, train_dataset=dataset, eval_dataset=dataset, optimizers=(optimizer, None)
    )
    optimizer.eval()  # as the Trainer leaves it after an evaluation
    trainer.train()
    training_forwards = [mode for mode, training in seen if training]
    assert len(training_forwards) == 4 and set(training_forwards) == {"train"}


# Seq2SeqTrainer: the step, and generation-based evaluation untouched.


def t5_rows(n=8):
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (n, 6), generator=generator)
    labels = ids.flip(-1).clone()
    return ListDataset([{"input_ids": ids[i], "attention_mask": torch.ones(6, dtype=torch.long), "labels": labels[i]}
                        for i in range(n)])  # fmt: skip


def tiny_t5():
    torch.manual_seed(0)
    config = T5Config(vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=16, num_layers=1, num_heads=2, dropout_rate=0.0,
                      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)  # fmt: skip
    return T5ForConditionalGeneration(config)


@pytest.mark.parametrize("method", ["sam", "aace"])
def test_seq2seq_trainer_steps_as_aacetrainer_and_evaluates_by_generation(tmp_path, method):
    model, reference = tiny_t5(), tiny_t5()
    dataset = t5_rows()
    args = plain_args(tmp_path, Seq2SeqTrainingArguments, predict_with_generate=True, generation_max_length=4)
    # Image batches with Seq2SeqTrainer too: the mixin passes generation keyword arguments on.
    trainer_class = type("Mixed", (ImageBatchMixin, sharpness_aware(Seq2SeqTrainer)), {})
    trainer = trainer_class(
        model=model, args=args, train_dataset=dataset, eval_dataset=dataset, data_collator=default_data_collator,
        sharpness_aware_args=SharpnessAwareArguments(sam_method=method), compute_metrics=lambda prediction: {},
    )  # fmt: skip
    trainer.train()
    same = AACETrainer(
        model=reference, args=aace_args(tmp_path / "aace", sam_method=method), train_dataset=dataset,
        data_collator=default_data_collator,
    )  # fmt: skip
    same.train()
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    generate, calls = model.generate, []
    model.generate = lambda *args, **kwargs: calls.append(kwargs) or generate(*args, **kwargs)
    assert "eval_loss" in trainer.evaluate(num_beams=2)
    assert calls and all(call["num_beams"] == 2 for call in calls)
    trainer.evaluate()
    assert calls[-1].get("num_beams") is None and calls[-1]["max_length"] == 4


# The pairs AACE is taken on.


def unshifted_gpt2():
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
    model = GPT2LMHeadModel(config)
    # A loss that does not shift, behind a class that declares the causal-LM loss.
    model.loss_function = lambda logits, labels, vocab_size, **kwargs: F.cross_entropy(
        logits.float().reshape(-1, vocab_size), labels.reshape(-1)
    )
    return model


def test_a_model_loss_that_disagrees_with_the_declared_pairs_is_refused_with_the_ways_out(tmp_path):
    model = unshifted_gpt2()
    _, dataset = build("gpt2")
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = AACETrainer(model=model, args=aace_args(tmp_path), train_dataset=dataset)
    with pytest.raises(AACETaskError, match="'causal' pairs of GPT2LMHeadModel.*not a cross-entropy.*aace_pairs_func"):
        trainer.train()
    assert all(torch.equal(v, initial[k]) for k, v in model.state_dict().items())


def test_aace_pairs_func_gives_the_pairs(tmp_path):
    model, reference = unshifted_gpt2(), unshifted_gpt2()
    _, dataset = build("gpt2")
    args = aace_args(tmp_path)
    trainer = AACETrainer(
        model=model, args=args, train_dataset=dataset, data_collator=default_data_collator,
        aace_pairs_func=lambda outputs, labels, inputs: (outputs.logits, labels),
    )  # fmt: skip
    trainer.train()
    batch = micro_batches(dataset, BATCH, 1)[0]
    logits = reference(**batch).logits.reshape(-1, VOCAB)
    labels = batch["labels"].reshape(-1)
    keep = labels != -100
    expected = aace_loss(logits[keep], labels[keep])
    entry = next(e for e in trainer.state.log_history if "perturbation_loss" in e)
    assert entry["perturbation_loss"] == pytest.approx(expected.item(), rel=1e-5)


def tiny_ctc():
    torch.manual_seed(0)
    config = Wav2Vec2Config(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
        conv_dim=(8, 8), conv_stride=(5, 4), conv_kernel=(10, 8), num_conv_pos_embeddings=4,
        num_conv_pos_embedding_groups=2, pad_token_id=0, ctc_loss_reduction="mean", hidden_dropout=0.0,
        activation_dropout=0.0, attention_dropout=0.0, feat_proj_dropout=0.0, layerdrop=0.0, mask_time_prob=0.0,
    )  # fmt: skip
    model = Wav2Vec2ForCTC(config)
    generator = torch.Generator().manual_seed(1)
    audio = torch.randn(8, 400, generator=generator)
    frames = model(audio[:1]).logits.shape[1]
    labels = torch.full((8, frames), -100)  # padded with -100 to the frame count, as some collators do
    labels[:, :3] = torch.randint(1, VOCAB, (8, 3), generator=generator)
    return model, ListDataset([{"input_values": audio[i], "labels": labels[i]} for i in range(8)])


def test_ctc_is_refused_by_aace_and_trained_by_sam(tmp_path):
    model, dataset = tiny_ctc()
    trainer = AACETrainer(model=model, args=aace_args(tmp_path), train_dataset=dataset)
    with pytest.raises(AACETaskError, match="cannot train Wav2Vec2ForCTC: its loss is CTC.*--sam_method sam or asam"):
        trainer.train()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    AACETrainer(model=model, args=aace_args(tmp_path, sam_method="sam"), train_dataset=dataset).train()
    assert any(not torch.equal(v, initial[k]) for k, v in model.state_dict().items())


class LogitlessClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(5, 3)

    def forward(self, features, labels=None):
        scores = self.net(features)
        return {"loss": F.cross_entropy(scores, labels), "scores": scores}


def test_a_dict_without_logits_is_refused_by_aace(tmp_path):
    _, dataset = build("dict_module")
    trainer = AACETrainer(model=LogitlessClassifier(), args=aace_args(tmp_path), train_dataset=dataset)
    with pytest.raises(AACETaskError, match="no class scores in the outputs of LogitlessClassifier.*'scores'"):
        trainer.train()


# Cheaper steps: the two-pass step on every k-th optimizer step, and pass 1 on a fraction of each micro-batch.


def forward_rows(model: nn.Module) -> list[int]:
    """The rows of every forward the model runs (its first positional or `features` input)."""
    rows = []
    model.register_forward_pre_hook(
        lambda module, args, kwargs: rows.append(len(args[0] if args else kwargs["features"])), with_kwargs=True
    )
    return rows


def test_perturbation_interval_perturbs_every_kth_optimizer_step(tmp_path):
    model, dataset = build("dict_module", n=16)
    rows = forward_rows(model)
    args = aace_args(tmp_path, max_steps=5, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                     perturbation_interval=2)  # fmt: skip
    trainer = AACETrainer(model=model, args=args, train_dataset=dataset)
    trainer.train()
    # Steps 0, 2, 4 take two passes on both micro-batches, steps 1 and 3 one pass: 3 x 2 x 2 + 2 x 2 forwards.
    assert len(rows) == 16
    logged = [e for e in trainer.state.log_history if "loss" in e]
    assert ["perturbation_norm" in e for e in logged] == [True, False, True, False, True]


def test_perturbation_interval_resumes_in_the_middle_of_an_interval(tmp_path):
    def run(output_dir, max_steps, resume=None):
        model, dataset = build("dict_module", n=16)
        args = aace_args(output_dir, max_steps=max_steps, per_device_train_batch_size=2, perturbation_interval=3,
                         save_strategy="steps", save_steps=2)  # fmt: skip
        trainer = AACETrainer(model=model, args=args, train_dataset=dataset)
        trainer.train(resume_from_checkpoint=resume)
        return model, trainer

    straight, _ = run(tmp_path / "straight", 5)
    run(tmp_path / "cut", 2)  # stops after step 2, inside the interval that started at step 0
    resumed, trainer = run(tmp_path / "cut", 5, resume=str(tmp_path / "cut" / "checkpoint-2"))
    for a, b in zip(straight.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    logged = [e for e in trainer.state.log_history if "loss" in e and e["step"] > 2]
    # Logged steps 3, 4, 5 start at global steps 2, 3, 4: only 3 is a multiple of the interval.
    assert ["perturbation_norm" in e for e in logged] == [False, True, False]


def test_perturbation_batch_fraction_runs_pass_one_on_the_first_rows(tmp_path):
    model, dataset = build("dict_module")
    initial, _ = build("dict_module")
    rows = forward_rows(model)
    args = aace_args(tmp_path, per_device_train_batch_size=4, perturbation_batch_fraction=0.3)
    trainer = AACETrainer(model=model, args=args, train_dataset=dataset)
    trainer.train()
    assert rows == [2, 4]  # ceil(0.3 x 4) rows in pass 1, all of them in pass 2
    batch = micro_batches(dataset, 4, 1)[0]
    expected = aace_loss(initial(batch["features"][:2])["logits"], batch["labels"][:2])
    entry = next(e for e in trainer.state.log_history if "perturbation_loss" in e)
    assert entry["perturbation_loss"] == pytest.approx(expected.item(), rel=1e-5)


def test_perturbation_reuse_takes_the_steps_between_at_the_last_perturbation(tmp_path):
    def run(output_dir, max_steps, **options):
        model, dataset = build("dict_module", n=16)
        args = aace_args(output_dir, max_steps=max_steps, per_device_train_batch_size=4, perturbation_interval=2,
                         **options)  # fmt: skip
        trainer = AACETrainer(model=model, args=args, train_dataset=dataset)
        rows = forward_rows(model)
        trainer.train()
        return model, trainer, rows

    reused, trainer, rows = run(tmp_path / "reuse", 2, perturbation_reuse=True)
    assert len(rows) == 3  # step 0 two passes, step 1 one pass, as without reuse
    params, kept = trainer._perturbation.kept  # step 0's perturbation e
    # By hand: step 1 is the plain SGD step with the gradient taken at w1 + e.
    by_hand, dataset = build("dict_module", n=16)
    first, _, _ = run(tmp_path / "first", 1)
    by_hand.load_state_dict(first.state_dict())
    with torch.no_grad():
        for p, e in zip(by_hand.parameters(), kept):
            p.add_(e)
    batch = micro_batches(dataset, 4, 2)[1]
    by_hand(**batch)["loss"].backward()
    for p, w1, reused_p in zip(by_hand.parameters(), first.parameters(), reused.parameters()):
        torch.testing.assert_close(reused_p, w1 - 0.1 * p.grad, rtol=1e-6, atol=1e-7)
    plain, _, _ = run(tmp_path / "plain", 2)
    assert any(not torch.equal(a, b) for a, b in zip(plain.parameters(), reused.parameters()))


def test_perturbation_reuse_resumes_with_the_kept_perturbation(tmp_path):
    def run(output_dir, max_steps, resume=None):
        model, dataset = build("dict_module", n=16)
        args = aace_args(output_dir, max_steps=max_steps, per_device_train_batch_size=2, perturbation_interval=3,
                         perturbation_reuse=True, save_strategy="steps", save_steps=2)  # fmt: skip
        AACETrainer(model=model, args=args, train_dataset=dataset).train(resume_from_checkpoint=resume)
        return model

    straight = run(tmp_path / "straight", 5)
    run(tmp_path / "cut", 2)  # stops after step 2, which reuses step 0's perturbation, as step 3 will
    assert (tmp_path / "cut" / "checkpoint-2" / "kept_perturbation_0.pt").is_file()
    resumed = run(tmp_path / "cut", 5, resume=str(tmp_path / "cut" / "checkpoint-2"))
    for a, b in zip(straight.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("perturbation_reuse", True, "--perturbation_interval 1 leaves none between them"),
        ("perturbation_interval", 0, "whole number of optimizer steps >= 1"),
        ("perturbation_interval", 1.5, "whole number of optimizer steps >= 1"),
        ("perturbation_batch_fraction", 0.0, "must lie in \\(0, 1\\]"),
        ("perturbation_batch_fraction", 1.5, "must lie in \\(0, 1\\]"),
    ],
)
def test_cheaper_step_settings_are_validated(field, value, message):
    with pytest.raises(ValueError, match=message):
        SharpnessAwareArguments(**{field: value})
