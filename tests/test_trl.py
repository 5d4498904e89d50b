"""sharpness_aware() with TRL: SFTTrainer trains with sam, asam and aace in two forwards per micro-batch and logs its
own metrics as plain SFTTrainer does; the trainers the step cannot serve are refused by name. Offline: a random-init
Llama and a character-level tokenizer built here."""

import datasets
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from trl import DPOTrainer, GRPOTrainer, RewardTrainer, SFTConfig, SFTTrainer

from hf_aace import SharpnessAwareArguments, aace_loss, sharpness_aware
from hf_aace.trainer_internals import TRAINERS

datasets.disable_progress_bars()
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]
TEXTS = ["hello world", "abc", "the quick brown fox", "sam sam", "jumps over", "lazy dog", "zz", "tiny trl test"]
TRL_METRICS = ("num_tokens", "mean_token_accuracy", "entropy")


def tokenizer():
    vocab = {t: i for i, t in enumerate(SPECIALS + list("abcdefghijklmnopqrstuvwxyz "))}
    characters = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    characters.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=characters, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>"
    )


def llama():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, pad_token_id=0, eos_token_id=1,
                         bos_token_id=2)  # fmt: skip
    return LlamaForCausalLM(config)


def sft_args(tmp_path, **overrides):
    settings = dict(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, gradient_accumulation_steps=2,
        learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to=[], seed=0, use_cpu=True,
        disable_tqdm=True, max_length=32, optim="sgd", max_grad_norm=0.0, lr_scheduler_type="constant",
        train_sampling_strategy="sequential",
    )  # fmt: skip
    settings.update(overrides)
    return SFTConfig(**settings)


def run(tmp_path, trainer_class, **kwargs):
    """Trains a tiny Llama; returns the trainer, the per-step logs and the forwards per micro-batch."""
    model = llama()
    calls = [0]
    model.register_forward_pre_hook(lambda module, args: calls.__setitem__(0, calls[0] + 1))
    trainer = trainer_class(
        model=model, args=sft_args(tmp_path), train_dataset=datasets.Dataset.from_dict({"text": TEXTS}),
        processing_class=tokenizer(), **kwargs,
    )  # fmt: skip
    trainer.train()
    steps = [entry for entry in trainer.state.log_history if "loss" in entry]
    return trainer, steps, calls[0] / (2 * 2)


def test_sft_with_sam_runs_two_forwards_and_logs_trl_metrics_as_plain_sft(tmp_path):
    _, plain, plain_forwards = run(tmp_path / "plain", SFTTrainer)
    # A radius so small that w + e rounds to w: the second pass is then the plain step, and so are its metrics.
    settings = SharpnessAwareArguments(sam_method="sam", rho=1e-30)
    trainer, steps, forwards = run(tmp_path / "sam", sharpness_aware(SFTTrainer), sharpness_aware_args=settings)
    assert (plain_forwards, forwards) == (1, 2)
    assert len(steps) == len(plain) == 2
    for entry, reference in zip(steps, plain):
        for name in (*TRL_METRICS, "loss"):
            assert entry[name] == reference[name], name
        assert entry["perturbation_grad_norm"] > 0  # the first pass ran
    assert trainer._total_train_tokens == sum(len(t) + 1 for t in TEXTS)  # every token and EOS counted once


@pytest.mark.parametrize("method", ["asam", "aace"])
def test_sft_trains_with_asam_and_aace(tmp_path, method):
    settings = SharpnessAwareArguments(sam_method=method)
    trainer, steps, forwards = run(tmp_path, sharpness_aware(SFTTrainer), sharpness_aware_args=settings)
    assert forwards == 2
    assert all(set(TRL_METRICS) <= set(entry) for entry in steps)
    first = steps[0]
    if method == "aace":
        # AACE at w on the next-token pairs of the first micro-batch and the second, averaged.
        reference = llama().train()
        collator = trainer.data_collator
        rows = [trainer.train_dataset[i] for i in range(4)]
        values = []
        for batch in (collator(rows[:2]), collator(rows[2:])):
            logits = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            labels = batch["labels"][:, 1:].reshape(-1)
            keep = labels != -100
            values.append(aace_loss(logits[:, :-1].reshape(-1, logits.shape[-1])[keep], labels[keep]).item())
        assert first["perturbation_loss"] == pytest.approx(sum(values) / 2, rel=1e-4)


@pytest.mark.parametrize("trainer_class", [DPOTrainer, GRPOTrainer, RewardTrainer])
def test_trl_trainers_the_step_cannot_serve_are_refused_by_name(trainer_class):
    with pytest.raises(ValueError, match=f"cannot serve {trainer_class.__name__}.*serves Trainer, Seq2SeqTrainer"):
        sharpness_aware(trainer_class)
    assert TRAINERS[trainer_class.__name__].refusal


def test_an_unknown_trl_trainer_is_refused():
    unknown = type("NewTrainer", (SFTTrainer,), {"__module__": "trl.trainer.new_trainer"})
    with pytest.raises(ValueError, match="cannot serve NewTrainer.*does not know how its training step works"):
        sharpness_aware(unknown)
    mine = type("MySFT", (SFTTrainer,), {"__module__": "my_project"})
    assert issubclass(sharpness_aware(mine), mine)
