"""The captured step (`step_capture="cuda_graph"`): `StepCapture` captures each kind and signature of step once and
replays it, and training with it is training without it. On the CPU the graphs are `capture_emulation.EmulatedGraphs`,
which keeps a CUDA graph's contract (a replay runs exactly the captured operations, into the same memory);
tests/test_gpu.py runs the real CUDA graphs."""

import sys
import types
import warnings

import pytest
import torch
from capture_emulation import EmulatedGraphs
from torch import nn
from transformers import TrainerCallback

from hf_aace import (
    AACETrainer,
    SharpnessAwareArguments,
    WideResNetConfig,
    WideResNetForImageClassification,
    sharpness_aware,
)
from hf_aace.capture import CUDAGraphs, StepCapture, check_step_capture
from hf_aace.training_args import parse_method_variant

from test_tasks import ListDataset, build, make_args

METRICS = ("loss", "perturbation_loss", "perturbation_grad_norm", "perturbation_norm", "clean_loss", "clean_accuracy")


def wide_resnet(n: int = 16):
    """WRN-10-1 (BatchNorm: running statistics that pass 1 updates and pass 2 must not) on 8x8 images."""
    torch.manual_seed(0)
    model = WideResNetForImageClassification(WideResNetConfig(depth=10, widen_factor=1, num_labels=3, image_size=8))
    generator = torch.Generator().manual_seed(2)
    pixels = torch.randn(n, 3, 8, 8, generator=generator)
    return model, ListDataset([{"pixel_values": pixels[i], "labels": torch.tensor(i % 3)} for i in range(n)])


def train(tmp_path, model_name: str, variant: str, captured: bool, max_graphs: int = 8, callbacks=(), **overrides):
    model, dataset = wide_resnet() if model_name == "wrn" else build(model_name, n=16)
    method, settings = parse_method_variant(variant)
    options = dict(max_steps=8, per_device_train_batch_size=2, logging_steps=2, sam_method=method, **settings)
    args = make_args(tmp_path, **{**options, **overrides})
    trainer = AACETrainer(model=model, args=args, train_dataset=dataset, callbacks=list(callbacks))
    graphs = None
    if captured:
        graphs = EmulatedGraphs(model)
        trainer._step_capture = StepCapture(graphs, max_graphs=max_graphs)
    trainer.train()
    return model, trainer, graphs


def assert_same_training(eager, captured) -> None:
    (eager_model, eager_trainer, _), (model, trainer, _) = eager, captured
    for a, b in zip(eager_model.state_dict().values(), model.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    logs = [[{k: e[k] for k in METRICS if k in e} for e in t.state.log_history] for t in (eager_trainer, trainer)]
    assert logs[0] == logs[1]


@pytest.mark.parametrize(
    ("model_name", "variant"),
    [
        ("dict_module", "sgd"),
        ("dict_module", "sam"),
        ("dict_module", "asam"),
        ("dict_module", "aace:k=2"),
        ("dict_module", "aace:f=0.5"),
        # Interval 3: the reused step's graph is captured before the two-pass step's, so it must read the kept
        # perturbation the two-pass graph writes, not the one of the eager warm-up steps.
        ("dict_module", "aace:k=3:r=1"),
        ("wrn", "aace"),
        ("wrn", "sam"),
        ("vit", "aace"),
    ],
)
def test_captured_steps_train_exactly_as_eager_steps(tmp_path, model_name, variant):
    eager = train(tmp_path / "eager", model_name, variant, captured=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no step falls back to eager
        captured = train(tmp_path / "captured", model_name, variant, captured=True)
    assert_same_training(eager, captured)
    capture, graphs = captured[1]._step_capture, captured[2]
    kinds = {"sgd": 1, "aace:k=2": 2, "aace:k=3:r=1": 2}.get(variant, 1)  # plain, two-pass, reused
    assert graphs.captures == len(capture.graphs) == kinds
    assert capture.replays == 8 - 2 * kinds  # all but the warm-up steps


def test_accumulation_and_a_short_last_cycle_get_their_own_graphs(tmp_path):
    # 10 rows in batches of 2, accumulation 2: cycles of 2, 2 and 1 micro-batches each epoch; the last one divides
    # the loss by 1, not 2, and has a graph of its own. A causal LM's loss takes the step's token count as a tensor.
    def run(directory, captured):
        model, dataset = build("gpt2", n=10)
        args = make_args(directory, num_train_epochs=4, max_steps=-1, per_device_train_batch_size=2,
                         gradient_accumulation_steps=2, logging_steps=3)  # fmt: skip
        trainer = AACETrainer(model=model, args=args, train_dataset=dataset)
        if captured:
            trainer._step_capture = StepCapture(EmulatedGraphs(model), warmup_steps=1)
        trainer.train()
        return model, trainer, None

    captured = run(tmp_path / "captured", True)
    assert_same_training(run(tmp_path / "eager", False), captured)
    keys = {signature[0][1] for signature in captured[1]._step_capture.graphs}
    assert keys == {1, 2} and captured[1]._step_capture.replays > 0


def test_signatures_beyond_the_limit_and_steps_that_cannot_be_captured_run_eagerly(tmp_path):
    # 15 rows in batches of 2: every epoch ends on a batch of 1, a second signature.
    def run(directory, captured, max_graphs):
        model, dataset = build("dict_module", n=15)
        args = make_args(directory, num_train_epochs=3, max_steps=-1, per_device_train_batch_size=2)
        trainer = AACETrainer(model=model, args=args, train_dataset=dataset)
        if captured:
            trainer._step_capture = StepCapture(EmulatedGraphs(model), max_graphs=max_graphs)
        trainer.train()
        return model, trainer, None

    with pytest.warns(UserWarning, match="more than 1 different step signatures"):
        limited = run(tmp_path / "limited", True, max_graphs=1)
    assert_same_training(run(tmp_path / "eager", False, 8), limited)
    assert len(limited[1]._step_capture.graphs) == 1

    class Synced(nn.Module):  # reads a value back to the host in every forward
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(5, 3)

        def forward(self, features, labels):
            logits = self.linear(features) * (1.0 if features.sum().item() > -1e9 else 0.0)
            return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}

    def synced(directory, captured):
        torch.manual_seed(0)
        model, (_, dataset) = Synced(), build("dict_module", n=16)
        trainer = AACETrainer(model=model, args=make_args(directory, max_steps=6, per_device_train_batch_size=2),
                              train_dataset=dataset)  # fmt: skip
        if captured:
            trainer._step_capture = StepCapture(EmulatedGraphs(model))
        trainer.train()
        return model, trainer, None

    with pytest.warns(UserWarning, match="could not be captured as a CUDA graph .*not permitted when stream is"):
        fallen_back = synced(tmp_path / "synced", True)
    assert_same_training(synced(tmp_path / "synced_eager", False), fallen_back)
    assert fallen_back[1]._step_capture.replays == 0


class NewStorage(TrainerCallback):
    """Gives every parameter new memory after step 4, as a cast or a move would."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == 4:
            for p in model.parameters():
                p.data = p.data.clone()


def test_parameters_in_new_memory_are_captured_again(tmp_path):
    eager = train(tmp_path / "eager", "dict_module", "aace", captured=False, callbacks=[NewStorage()])
    captured = train(tmp_path / "captured", "dict_module", "aace", captured=True, callbacks=[NewStorage()])
    assert_same_training(eager, captured)
    assert captured[2].captures == 2  # at step 3, and again 2 warm-up steps after the move


def test_step_capture_is_refused_where_it_cannot_run(tmp_path):
    model, dataset = build("dict_module")
    with pytest.raises(ValueError, match="needs a CUDA GPU; this run is on cpu"):
        AACETrainer(model=model, args=make_args(tmp_path, step_capture="cuda_graph"), train_dataset=dataset)
    with pytest.raises(ValueError, match="--step_capture must be one of none, cuda_graph"):
        SharpnessAwareArguments(step_capture="graphs")
    base = dict(device=torch.device("cuda"), world_size=1, torch_empty_cache_steps=None, torch_compile=False)
    for change, message in [
        ({"world_size": 2}, "runs on one process; this run has 2"),
        ({"torch_empty_cache_steps": 4}, "drop --torch_empty_cache_steps"),
        ({"torch_compile": True}, "use one"),
    ]:
        with pytest.raises(ValueError, match=message):
            check_step_capture(types.SimpleNamespace(args=types.SimpleNamespace(**{**base, **change})))
    trainer = AACETrainer(model=model, args=make_args(tmp_path), train_dataset=dataset)
    trainer.args = types.SimpleNamespace(**base)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_step_capture(trainer)  # the Trainer's own compute_loss: nothing to say

    class OwnLoss(AACETrainer):
        def compute_loss(self, model, inputs, **kwargs):
            return super().compute_loss(model, inputs, **kwargs)

    trainer.__class__ = OwnLoss
    with pytest.warns(UserWarning, match="OwnLoss has its own compute_loss; .* happens once, at capture"):
        check_step_capture(trainer)


def test_a_capturing_trainer_turns_off_the_autocast_cache(tmp_path, monkeypatch):
    # Autocast caches cast weights per forward and frees them after it: a replayed graph would read freed memory.
    monkeypatch.setattr(sys.modules["hf_aace.sharpness_aware"], "check_step_capture", lambda trainer: None)
    model, dataset = build("dict_module")
    trainer = AACETrainer(model=model, args=make_args(tmp_path, step_capture="cuda_graph"), train_dataset=dataset)
    assert isinstance(trainer._step_capture.backend, CUDAGraphs)
    assert trainer.accelerator.autocast_handler.cache_enabled is False


def capture_and_compare(tmp_path, make):
    """Trains `make(folder)`'s trainer eagerly and captured; asserts the same weights and logs; returns the captured
    trainer. No step may fall back to eager."""
    eager = make(tmp_path / "eager")
    eager.train()
    captured = make(tmp_path / "captured")
    captured._step_capture = StepCapture(EmulatedGraphs(captured.model))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="step_capture")
        captured.train()
    assert_same_training((eager.model, eager, None), (captured.model, captured, None))
    assert captured._step_capture.replays > 0
    return captured


def test_a_captured_run_evaluates_between_steps_and_resumes_from_its_checkpoints(tmp_path):
    def make(folder, max_steps=8):
        model, dataset = build("dict_module", n=16)
        args = make_args(folder, max_steps=max_steps, per_device_train_batch_size=2, sam_method="aace",
                         perturbation_interval=3, perturbation_reuse=True, save_strategy="steps", save_steps=4,
                         eval_strategy="steps", eval_steps=2)  # fmt: skip
        return AACETrainer(model=model, args=args, train_dataset=dataset, eval_dataset=dataset)

    straight = capture_and_compare(tmp_path, make)
    assert [e["eval_loss"] for e in straight.state.log_history if "eval_loss" in e]
    # Cut at step 4 (inside an interval, with a kept perturbation the graph wrote), resumed captured.
    cut = make(tmp_path / "cut", max_steps=4)
    cut._step_capture = StepCapture(EmulatedGraphs(cut.model))
    cut.train()
    resumed = make(tmp_path / "cut")
    resumed._step_capture = StepCapture(EmulatedGraphs(resumed.model))
    resumed.train(resume_from_checkpoint=str(tmp_path / "cut" / "checkpoint-4"))
    for a, b in zip(straight.model.state_dict().values(), resumed.model.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_seq2seq_trainer_steps_are_captured(tmp_path):
    from test_sharpness_aware import plain_args, t5_rows, tiny_t5
    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments, default_data_collator

    def make(folder):
        args = plain_args(folder, Seq2SeqTrainingArguments, max_steps=6, per_device_train_batch_size=2)
        return sharpness_aware(Seq2SeqTrainer)(
            model=tiny_t5(), args=args, train_dataset=t5_rows(), data_collator=default_data_collator,
            sharpness_aware_args=SharpnessAwareArguments(sam_method="aace"),
        )  # fmt: skip

    capture_and_compare(tmp_path, make)


def test_sft_trainer_steps_fall_back_to_eager_since_trl_reads_its_metrics_back(tmp_path):
    datasets = pytest.importorskip("datasets")
    pytest.importorskip("trl")
    from test_trl import TEXTS, llama, sft_args, tokenizer
    from trl import SFTTrainer

    def make(folder):
        return sharpness_aware(SFTTrainer)(
            model=llama(), args=sft_args(folder, max_steps=5, pad_to_multiple_of=32),
            train_dataset=datasets.Dataset.from_dict({"text": TEXTS}), processing_class=tokenizer(),
            sharpness_aware_args=SharpnessAwareArguments(sam_method="sam"),
        )  # fmt: skip

    eager = make(tmp_path / "eager")
    eager.train()
    captured = make(tmp_path / "captured")
    captured._step_capture = StepCapture(EmulatedGraphs(captured.model))
    with pytest.warns(UserWarning, match="could not be captured"):  # SFTTrainer's compute_loss calls .item()
        captured.train()
    assert_same_training((eager.model, eager, None), (captured.model, captured, None))
    assert captured._step_capture.replays == 0


@pytest.mark.parametrize("setting", ["lora", "activation_checkpointing"])
def test_adapters_and_activation_checkpointing_are_captured(tmp_path, setting):
    from transformers import default_data_collator

    from test_trainer import CHECKPOINTING

    def make(folder):
        model, dataset = build("bert_single_label", n=16)
        options = {}
        if setting == "lora":
            peft = pytest.importorskip("peft")
            config = peft.LoraConfig(r=2, target_modules=["query", "value"], task_type="SEQ_CLS")
            model = peft.get_peft_model(model, config)
        else:
            options = {CHECKPOINTING: True, f"{CHECKPOINTING}_kwargs": {"use_reentrant": False}}
        args = make_args(folder, max_steps=6, per_device_train_batch_size=2, sam_method="aace", **options)
        return AACETrainer(model=model, args=args, train_dataset=dataset, data_collator=default_data_collator)

    capture_and_compare(tmp_path, make)


def test_step_metrics_are_summed_in_one_tensor_whatever_the_steps_report(tmp_path):
    model, dataset = build("dict_module")
    trainer = AACETrainer(model=model, args=make_args(tmp_path), train_dataset=dataset)
    step = torch.tensor([1.0, 2.0, 1.0])
    trainer._accumulate_metrics((("clean_loss", "perturbation_norm", "count"), step))
    step.fill_(9.0)  # a captured step's output, overwritten by the next replay: the sum is not affected
    trainer._accumulate_metrics((("clean_loss", "perturbation_norm", "count"), torch.tensor([3.0, 4.0, 1.0])))
    trainer._accumulate_metrics((("clean_loss", "clean_accuracy", "count"), torch.tensor([5.0, 0.5, 1.0])))
    sums = {name: value.item() for name, value in trainer._metric_sums.items()}
    assert sums == {"clean_loss": 9.0, "perturbation_norm": 6.0, "clean_accuracy": 0.5, "count": 3.0}
    logs = {"loss": 1.0}
    trainer.log(logs)
    assert logs["clean_loss"] == 3.0 and logs["perturbation_norm"] == 2.0 and not trainer._metric_sums


def test_graphs_of_a_replaced_model_are_dropped(tmp_path):
    # A hyperparameter search builds a new model per trial (`model_init`): the last trial's graphs, and their memory,
    # must not stay behind.
    def run(folder, captured):
        args = make_args(folder, max_steps=6, per_device_train_batch_size=2, sam_method="aace")
        trainer = AACETrainer(model_init=lambda: build("dict_module", n=16)[0], args=args,
                              train_dataset=build("dict_module", n=16)[1])  # fmt: skip
        if captured:
            trainer._step_capture = StepCapture(EmulatedGraphs(lambda: trainer.model))
        trainer.train()
        first = trainer.model
        trainer.train()  # a new model from model_init
        assert trainer.model is not first
        return trainer.model, trainer, None

    captured = run(tmp_path / "captured", True)
    assert_same_training(run(tmp_path / "eager", False), captured)
    capture = captured[1]._step_capture
    assert len(capture.graphs) == 1 and capture.replays == 6 - 2  # the first model's graph is gone
