import copy
import json
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from launch import two_process_launch
from torch import nn
from transformers import ResNetConfig, ResNetForImageClassification, TrainerCallback
from transformers.modeling_outputs import ImageClassifierOutputWithNoAttention

from hf_aace import AACETrainer, AACETrainingArguments, WideResNetConfig, WideResNetForImageClassification, aace_loss

ROOT = Path(__file__).resolve().parents[1]
# transformers 5.17 and before name the activation_checkpointing arguments gradient_checkpointing.
CHECKPOINTING = next(
    name
    for name in ("activation_checkpointing", "gradient_checkpointing")
    if name in AACETrainingArguments.__dataclass_fields__
)


def reentrant_checkpointing() -> dict:
    """Training arguments for reentrant activation checkpointing, under this transformers' names."""
    return {CHECKPOINTING: True, f"{CHECKPOINTING}_kwargs": {"use_reentrant": True}}


class TensorDataset(torch.utils.data.Dataset):
    def __init__(self, pixel_values: torch.Tensor, labels: torch.Tensor):
        self.pixel_values, self.labels = pixel_values, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.pixel_values[index], "labels": self.labels[index]}


def make_dataset(n: int = 32, size: int = 8, num_labels: int = 3, seed: int = 0) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    return TensorDataset(
        torch.randn(n, 3, size, size, generator=generator), torch.randint(0, num_labels, (n,), generator=generator)
    )


def tiny_wrn(seed: int = 0) -> WideResNetForImageClassification:
    torch.manual_seed(seed)
    model = WideResNetForImageClassification(WideResNetConfig(depth=10, widen_factor=1, num_labels=3))
    # A zero classifier (the paper's init) gives a zero perturbation gradient for most weights; start from random.
    nn.init.normal_(model.classifier.weight, std=0.5)
    return model


def make_args(tmp_path, **overrides) -> AACETrainingArguments:
    settings = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        learning_rate=0.1,
        optim="sgd",
        weight_decay=0.0,
        max_grad_norm=0.0,
        lr_scheduler_type="constant",
        max_steps=1,
        train_sampling_strategy="sequential",
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
    )
    settings.update(overrides)
    return AACETrainingArguments(**settings)


def reference_step(
    model, batches, method: str, rho: float, normalize: bool, lr: float, accumulation: int = 1, aace_options=None
):
    """One optimizer step written out by hand: perturb, second pass, restore, SGD (`aace_options` go to aace_loss)."""
    params = [p for p in model.parameters()]
    batchnorms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for p in params:
        p.grad = None
    for pixel_values, labels in batches:
        model.train()
        logits = model(pixel_values).logits
        if method == "aace":
            loss1 = aace_loss(logits, labels, **(aace_options or {}))
        else:
            loss1 = F.cross_entropy(logits, labels)
        grads = torch.autograd.grad(loss1, params)
        with torch.no_grad():
            if method == "asam":
                norm = torch.sqrt(sum(((p * g) ** 2).sum() for p, g in zip(params, grads)))
                e = [rho * p * p * g / (norm + 1e-12) for p, g in zip(params, grads)]
            else:
                norm = torch.sqrt(sum((g**2).sum() for g in grads))
                sign = -1.0 if method == "aace" else 1.0
                e = [sign * rho * g / ((norm + 1e-12) if normalize else 1.0) for g in grads]
            saved = [p.clone() for p in params]
            for p, e_p in zip(params, e):
                p.add_(e_p)
        # Second pass with BatchNorm running statistics frozen: keep a copy of the buffers and put it back.
        buffers = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in batchnorms]
        loss2 = F.cross_entropy(model(pixel_values).logits, labels) / accumulation
        loss2.backward()
        with torch.no_grad():
            for m, (mean, var, count) in zip(batchnorms, buffers):
                m.running_mean.copy_(mean), m.running_var.copy_(var), m.num_batches_tracked.copy_(count)
            for p, s in zip(params, saved):
                p.copy_(s)
    with torch.no_grad():
        for p in params:
            p.sub_(lr * p.grad)


def assert_state_close(model_a, model_b, tolerance=1e-5):
    state_b = model_b.state_dict()
    for key, value in model_a.state_dict().items():
        torch.testing.assert_close(value, state_b[key], rtol=tolerance, atol=tolerance, msg=key)


@pytest.mark.parametrize(
    ("method", "rho", "normalize", "accumulation"),
    [
        ("aace", 0.2, False, 1),
        ("aace", 0.2, True, 1),
        ("sam", 0.05, True, 1),
        ("asam", 0.5, True, 1),
        ("aace", 0.2, False, 2),
    ],
)
def test_one_step_equals_hand_written_step(tmp_path, method, rho, normalize, accumulation):
    dataset = make_dataset()
    model = tiny_wrn()
    expected = copy.deepcopy(model)
    batch = 8 // accumulation
    args = make_args(
        tmp_path,
        sam_method=method,
        rho=rho,
        normalize_perturbation=normalize,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation,
    )
    AACETrainer(model=model, args=args, train_dataset=dataset).train()
    batches = [
        (dataset.pixel_values[i * batch : (i + 1) * batch], dataset.labels[i * batch : (i + 1) * batch])
        for i in range(accumulation)
    ]
    reference_step(expected, batches, method, rho, normalize, lr=0.1, accumulation=accumulation)
    assert_state_close(model, expected)
    changed = any(not torch.equal(a, b) for a, b in zip(model.parameters(), tiny_wrn().parameters()))
    assert changed


def test_first_pass_by_autograd_grad_equals_the_backward_one(tmp_path):
    # ddp_static_graph takes the first-pass gradient with torch.autograd.grad; in one process it must give the step
    # the default path gives, with gradient accumulation and a trainable parameter the loss does not reach.
    models = []
    for static_graph in (False, True):
        model = tiny_wrn()
        model.register_parameter("unused", nn.Parameter(torch.ones(3)))
        args = make_args(
            tmp_path / str(static_graph),
            per_device_train_batch_size=4,
            gradient_accumulation_steps=2,
            ddp_static_graph=static_graph,
        )
        AACETrainer(model=model, args=args, train_dataset=make_dataset()).train()
        models.append(model)
    assert_state_close(models[1], models[0], tolerance=0)
    assert not torch.equal(models[0].classifier.weight, tiny_wrn().classifier.weight)


def test_sgd_method_is_the_plain_trainer_step(tmp_path):
    dataset = make_dataset()
    model, expected = tiny_wrn(), tiny_wrn()
    AACETrainer(model=model, args=make_args(tmp_path, sam_method="sgd"), train_dataset=dataset).train()
    expected.train()
    F.cross_entropy(expected(dataset.pixel_values[:8]).logits, dataset.labels[:8]).backward()
    with torch.no_grad():
        for p in expected.parameters():
            p.sub_(0.1 * p.grad)
    assert_state_close(model, expected)


@pytest.mark.parametrize("method", ["aace", "sam", "asam"])
def test_training_step_restores_weights_bit_for_bit_and_updates_batchnorm_once(tmp_path, method):
    model = tiny_wrn()
    trainer = AACETrainer(model=model, args=make_args(tmp_path, sam_method=method), train_dataset=make_dataset())
    inputs = next(iter(trainer.get_train_dataloader()))
    trainer.current_gradient_accumulation_steps = 1  # set by train() in normal use
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer.training_step(trainer.model_wrapped, inputs)
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]), name
        assert param.grad is not None
    counts = [m.num_batches_tracked.item() for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert counts and all(c == 1 for c in counts)


def test_works_with_transformers_resnet_and_models_without_batchnorm(tmp_path):
    class TinyMLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 16), nn.ReLU(), nn.Linear(16, 3))

        def forward(self, pixel_values, labels=None):
            logits = self.net(pixel_values)
            loss = F.cross_entropy(logits, labels) if labels is not None else None
            return ImageClassifierOutputWithNoAttention(loss=loss, logits=logits)

    resnet = ResNetForImageClassification(
        ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3)
    )
    for model in (resnet, TinyMLP()):
        initial = [p.detach().clone() for p in model.parameters()]
        trainer = AACETrainer(model=model, args=make_args(tmp_path, max_steps=3), train_dataset=make_dataset())
        trainer.train()
        assert any(not torch.equal(a, b) for a, b in zip(initial, model.parameters()))
        logged = [entry for entry in trainer.state.log_history if "loss" in entry]
        assert logged and all(
            key in logged[0]
            for key in ("perturbation_loss", "perturbation_grad_norm", "perturbation_norm", "clean_loss")
        )


class WeightsAtStepBegin(TrainerCallback):
    """Keeps a copy of the model's state at the start of every optimizer step."""

    def __init__(self):
        self.states = []

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.states.append({name: value.detach().clone() for name, value in model.state_dict().items()})


def micro_batch_metrics(model, pixel_values, labels, rho: float = 0.2) -> dict[str, float]:
    """The perturbation metrics of one micro-batch at the model's weights, computed without the trainer (AACE, rho)."""
    model.train()
    logits = model(pixel_values).logits
    loss = aace_loss(logits, labels)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    grad_norm = torch.sqrt(sum((g**2).sum() for g in grads)).item()
    return {
        "perturbation_loss": loss.item(),
        "perturbation_grad_norm": grad_norm,
        "perturbation_norm": rho * grad_norm,  # unnormalised AACE: ||e|| = rho ||g||
        "clean_loss": F.cross_entropy(logits, labels).item(),
        "clean_accuracy": (logits.argmax(-1) == labels).float().mean().item(),
    }


def test_metrics_are_logged_as_interval_averages(tmp_path):
    # Each logged value averages 2 logging steps x 2 accumulated micro-batches, each computed here on its own.
    dataset = make_dataset()
    recorder = WeightsAtStepBegin()
    args = make_args(
        tmp_path, max_steps=4, logging_steps=2, per_device_train_batch_size=4, gradient_accumulation_steps=2
    )
    trainer = AACETrainer(model=tiny_wrn(), args=args, train_dataset=dataset, callbacks=[recorder])
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 2 and len(recorder.states) == 4
    probe = tiny_wrn()
    for index, entry in enumerate(logged):
        values = []
        for step in (2 * index, 2 * index + 1):
            probe.load_state_dict(recorder.states[step])
            for micro_batch in (2 * step, 2 * step + 1):
                rows = slice(4 * micro_batch, 4 * micro_batch + 4)
                values.append(micro_batch_metrics(probe, dataset.pixel_values[rows], dataset.labels[rows]))
        for name in values[0]:
            expected = sum(v[name] for v in values) / len(values)
            assert entry[name] == pytest.approx(expected, rel=1e-4, abs=1e-6), (index, name)
        assert "skipped_perturbations" not in entry


def test_sam_perturbation_has_radius_rho(tmp_path):
    trainer = AACETrainer(
        model=tiny_wrn(), args=make_args(tmp_path, sam_method="sam", max_steps=2), train_dataset=make_dataset()
    )
    trainer.train()
    entry = next(e for e in trainer.state.log_history if "loss" in e)
    assert entry["perturbation_norm"] == pytest.approx(0.05, rel=1e-4)


def _train_and_resume(tmp_path, accumulation: int):
    dataset = make_dataset(n=64)
    common = dict(
        max_steps=6,
        per_device_train_batch_size=8 // accumulation,
        gradient_accumulation_steps=accumulation,
        train_sampling_strategy="random",
        learning_rate=0.05,
    )
    straight = tiny_wrn()
    AACETrainer(model=straight, args=make_args(tmp_path / "straight", **common), train_dataset=dataset).train()

    first = tiny_wrn()
    args = make_args(tmp_path / "resumed", save_strategy="steps", save_steps=3, **common)
    trainer = AACETrainer(model=first, args=args, train_dataset=dataset)
    trainer.train()
    checkpoint = tmp_path / "resumed" / "checkpoint-3"
    assert checkpoint.is_dir()
    resumed = tiny_wrn(seed=123)  # different initial weights: everything must come from the checkpoint
    AACETrainer(model=resumed, args=args, train_dataset=dataset).train(resume_from_checkpoint=str(checkpoint))
    return straight, resumed


@pytest.mark.parametrize("accumulation", [1, 2])
def test_resume_from_checkpoint_gives_identical_weights(tmp_path, accumulation):
    straight, resumed = _train_and_resume(tmp_path, accumulation)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_bf16_on_cpu(tmp_path):
    model = tiny_wrn()
    initial = [p.detach().clone() for p in model.parameters()]
    trainer = AACETrainer(model=model, args=make_args(tmp_path, bf16=True, max_steps=3), train_dataset=make_dataset())
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(initial, model.parameters()))


def test_torch_compile_recompiles_at_most_once(tmp_path):
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()
    model = tiny_wrn()
    args = make_args(
        tmp_path, max_steps=4, torch_compile=True, torch_compile_backend="aot_eager", dataloader_drop_last=True
    )
    trainer = AACETrainer(model=model, args=args, train_dataset=make_dataset())
    trainer.train()
    # One graph for pass 1 and one recompile for the BatchNorm toggle of pass 2, then cached.
    assert counters["stats"]["unique_graphs"] <= 2
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in trainer.state.log_history if "loss" in e)
    torch._dynamo.reset()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"sam_method": "adam"}, "--sam_method must be one of aace, sam, asam, sgd"),
        ({"rho": 0.0}, "--rho must be a finite number > 0"),
        ({"sam_method": "sam", "rho": -1.0}, "--rho must be a finite number > 0"),
        ({"rho": float("inf")}, "--rho must be a finite number > 0"),
        ({"rho": float("nan")}, "--rho must be a finite number > 0"),
        ({"aace_threshold": 1.5}, r"--aace_threshold must lie in \[0, 1\]"),
        ({"aace_mode": "const"}, "--aace_mode must be one of adaptive, uniform, random"),
        ({"lr_milestones": [0.6, 0.3]}, "--lr_milestones must be increasing fractions"),
        ({"lr_milestones": []}, "--lr_milestones must be increasing fractions"),
        ({"lr_milestones": [0.0, 0.5]}, "--lr_milestones must be increasing fractions"),
        ({"lr_milestones": [0.5, 1.0]}, "--lr_milestones must be increasing fractions"),
        ({"lr_milestones": [0.5, 1.5]}, "--lr_milestones must be increasing fractions"),
        ({"lr_milestones": [0.5], "lr_gamma": 0.0}, r"--lr_gamma must lie in \(0, 1\]"),
        ({"lr_milestones": [0.5], "lr_gamma": 1.5}, r"--lr_gamma must lie in \(0, 1\]"),
        ({"fp16": True}, "--fp16 needs a GPU"),
        ({"fp16": True, "use_cpu": False}, "--fp16 needs a GPU"),
    ],
)
def test_bad_arguments_raise_value_error(tmp_path, overrides, message):
    if not overrides.get("use_cpu", True) and torch.accelerator.is_available():
        pytest.skip("fp16 is allowed where there is an accelerator")
    with pytest.raises(ValueError, match=message):
        make_args(tmp_path, **overrides)


def test_boundary_arguments_are_accepted(tmp_path):
    for overrides in ({"aace_threshold": 0.0}, {"aace_threshold": 1.0}, {"lr_milestones": [0.5], "lr_gamma": 1.0}):
        args = make_args(tmp_path, **overrides)
        assert all(getattr(args, key) == value for key, value in overrides.items())


@pytest.mark.parametrize(
    ("method", "rho", "normalize"), [("aace", 0.2, False), ("sam", 0.05, True), ("asam", 0.5, True)]
)
def test_method_defaults(tmp_path, method, rho, normalize):
    args = make_args(tmp_path, sam_method=method)
    trainer = AACETrainer(model=tiny_wrn(), args=args, train_dataset=make_dataset())
    assert args.perturbation_for(trainer.model) == trainer.perturbation_settings() == (rho, normalize)
    # Saved run records and cards show the values used, not the unset fields.
    resolved = trainer.resolved_sharpness_aware()
    assert (resolved["rho"], resolved["normalize_perturbation"]) == (rho, normalize)
    assert (args.rho, args.normalize_perturbation) == (None, None)


def test_cli_flags_through_hf_argument_parser(tmp_path):
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(AACETrainingArguments).parse_args_into_dataclasses(
        [
            "--output_dir",
            str(tmp_path),
            "--sam_method",
            "asam",
            "--normalize_perturbation",
            "false",
            "--lr_milestones",
            "0.3",
            "0.6",
            "--use_cpu",
        ]
    )
    assert args.sam_method == "asam" and args.perturbation_for() == (0.5, False)
    assert args.lr_milestones == [0.3, 0.6]


def test_paper_schedule_and_weight_decay_on_all_parameters(tmp_path):
    model = tiny_wrn()
    args = make_args(
        tmp_path, max_steps=10, lr_milestones=[0.3, 0.6, 0.8], weight_decay=5e-4, weight_decay_all_parameters=True
    )
    trainer = AACETrainer(model=model, args=args, train_dataset=make_dataset(n=80))
    trainer.train()
    rates = [e["learning_rate"] for e in trainer.state.log_history if "learning_rate" in e]
    assert rates == pytest.approx([0.1] * 3 + [0.02] * 3 + [0.004] * 2 + [0.0008] * 2)
    decayed = [g for g in trainer.optimizer.param_groups if g["weight_decay"] > 0]
    assert sum(len(g["params"]) for g in decayed) == len(list(model.parameters()))

    # Another train() (as a hyperparameter search runs) builds the schedule again for its own length; a milestone
    # that rounds to step 0 counts as step 1: two steps give milestones 1, 1 and 2.
    trainer.args.max_steps = 2
    trainer.state.log_history = []
    trainer.train()
    rates = [e["learning_rate"] for e in trainer.state.log_history if "learning_rate" in e]
    assert rates == pytest.approx([0.1, 0.004])


def test_a_divergence_callback_is_added_once(tmp_path):
    from hf_aace.divergence import DivergenceCallback

    for callbacks in (None, [DivergenceCallback()]):
        trainer = AACETrainer(model=tiny_wrn(), args=make_args(tmp_path), callbacks=callbacks)
        added = [c for c in trainer.callback_handler.callbacks if isinstance(c, DivergenceCallback)]
        assert len(added) == 1 and (callbacks is None or added[0] is callbacks[0])


def launch_ddp_train(output_dir: Path, *flags: str) -> list[dict]:
    """Runs tests/ddp_train.py on two CPU processes (gloo) and returns each rank's record, with the threads it still
    ran once its process group was ended under "threads_after_end"."""
    script = ROOT / "tests" / "ddp_train.py"
    command = two_process_launch("--multi_gpu", str(script), str(output_dir), *flags)
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    ranks = [json.loads((output_dir / f"rank{i}.json").read_text()) for i in range(2)]
    for i, rank in enumerate(ranks):
        rank["threads_after_end"] = json.loads((output_dir / f"rank{i}-threads.json").read_text())
    return ranks


@pytest.fixture(scope="module")
def ddp_ranks(tmp_path_factory) -> list[dict]:
    return launch_ddp_train(tmp_path_factory.mktemp("ddp"))


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="lists threads through Linux's /proc")
def test_each_process_joins_gloos_threads_before_its_interpreter_exits(ddp_ranks):
    # A finished Trainer's cycles keep the DDP model, and so the group, alive: unless end_process_group frees them,
    # gloo's threads outlive destroy_process_group and meet the interpreter's exit, where they can abort the process.
    for rank in ddp_ranks:
        assert rank["threads_after_end"], "no threads listed"
        assert not [name for name in rank["threads_after_end"] if "gloo" in name], rank["threads_after_end"]


def test_two_processes_perturb_independently_and_stay_identical(ddp_ranks):
    ranks = ddp_ranks
    assert ranks[0]["world_size"] == ranks[1]["world_size"] == 2
    assert ranks[0]["first_grad_norm"] != ranks[1]["first_grad_norm"]
    assert ranks[0]["weights"] == ranks[1]["weights"]
    # The logged perturbation metrics are means over the processes, the same on each.
    mean = (ranks[0]["first_grad_norm"] + ranks[1]["first_grad_norm"]) / 2
    assert ranks[0]["logged_first_grad_norm"] == ranks[1]["logged_first_grad_norm"] == pytest.approx(mean, abs=1e-6)
    losses = ranks[0]["losses"]
    assert sum(losses[-4:]) < sum(losses[:4])
    # Every process draws its own augmentations, from the stream seeded with seed + process index.
    assert ranks[0]["first_augmentation"] != ranks[1]["first_augmentation"]
    assert all(rank["first_augmentation"] == rank["expected_augmentation"] for rank in ranks)


def test_overflowing_fp16_first_pass_skips_the_perturbation_and_is_counted(tmp_path):
    # fp16 Trainer runs need CUDA; a CPU GradScaler with a huge scale drives the same code path on CPU.
    model = tiny_wrn()
    trainer = AACETrainer(model=model, args=make_args(tmp_path), train_dataset=make_dataset())
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**120)
    trainer.current_gradient_accumulation_steps = 1
    inputs = next(iter(trainer.get_train_dataloader()))
    inputs["pixel_values"] = inputs["pixel_values"] * 1e6  # first-layer weight gradients overflow float32
    before = [p.detach().clone() for p in model.parameters()]
    trainer.training_step(trainer.model_wrapped, inputs)
    assert trainer._metric_sums["skipped_perturbations"].item() == 1
    assert trainer._metric_sums["perturbation_norm"].item() == 0
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert all(torch.isfinite(p).all() for p in model.parameters())

    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    trainer.training_step(trainer.model_wrapped, next(iter(trainer.get_train_dataloader())))
    assert trainer._metric_sums["skipped_perturbations"].item() == 1  # a finite pass adds nothing
    norm = trainer._metric_sums["perturbation_norm"].item()
    assert norm > 0

    # The log counts the skipped perturbations and averages the norm over both micro-batches; a log interval without
    # a skipped perturbation does not mention them.
    trainer.log({"loss": 1.0})
    trainer.training_step(trainer.model_wrapped, next(iter(trainer.get_train_dataloader())))
    trainer.log({"loss": 1.0})
    first, second = trainer.state.log_history[-2:]
    assert first["skipped_perturbations"] == 1 and isinstance(first["skipped_perturbations"], int)
    assert first["perturbation_norm"] == pytest.approx(norm / 2, abs=1e-6)
    assert "skipped_perturbations" not in second and second["perturbation_norm"] > 0


def test_resume_continues_the_augmentation_stream(tmp_path):
    from hf_aace import BatchAugmentation
    from hf_aace.data import ImageClassificationSplit

    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8, generator=generator)
    dataset = ImageClassificationSplit(images, torch.randint(0, 3, (64,), generator=generator))

    def augmentation():
        return BatchAugmentation((0.5,) * 3, (0.25,) * 3, crop_padding=2, flip=True, cutout_size=4, seed=999)

    common = dict(max_steps=6, train_sampling_strategy="random", learning_rate=0.05)
    straight = tiny_wrn()
    args = make_args(tmp_path / "straight", **common)
    AACETrainer(model=straight, args=args, train_dataset=dataset, augmentation=augmentation()).train()

    args = make_args(tmp_path / "resumed", save_strategy="steps", save_steps=3, **common)
    AACETrainer(model=tiny_wrn(), args=args, train_dataset=dataset, augmentation=augmentation()).train()
    resumed = tiny_wrn(seed=5)
    trainer = AACETrainer(model=resumed, args=args, train_dataset=dataset, augmentation=augmentation())
    trainer.train(resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-3"))
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name

    # Without the saved stream the second half draws other augmentations and ends elsewhere.
    (tmp_path / "resumed" / "checkpoint-3" / "augmentation_state_0.pth").unlink()
    other = tiny_wrn(seed=5)
    trainer = AACETrainer(model=other, args=args, train_dataset=dataset, augmentation=augmentation())
    trainer.train(resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-3"))
    assert any(not torch.equal(a, b) for a, b in zip(straight.parameters(), other.parameters()))


def test_channels_last_trains_like_the_default_layout(tmp_path):
    dataset = make_dataset()
    default, channels_last = tiny_wrn(), tiny_wrn()
    AACETrainer(model=default, args=make_args(tmp_path / "a", max_steps=2), train_dataset=dataset).train()
    args = make_args(tmp_path / "b", max_steps=2, channels_last=True)
    AACETrainer(model=channels_last, args=args, train_dataset=dataset).train()
    assert channels_last.wide_resnet.embedder.weight.is_contiguous(memory_format=torch.channels_last)
    # Convolution kernels differ between the layouts: equal up to float32 rounding.
    assert_state_close(channels_last, default, tolerance=1e-4)


def test_batches_without_labels_are_refused_clearly(tmp_path):
    trainer = AACETrainer(model=tiny_wrn(), args=make_args(tmp_path), train_dataset=make_dataset())
    trainer.current_gradient_accumulation_steps = 1
    with pytest.raises(ValueError, match=r"needs class labels in every training batch, under \['labels'\]"):
        trainer.training_step(trainer.model_wrapped, {"pixel_values": torch.randn(2, 3, 8, 8)})


def test_model_card_names_the_method_the_trainer_used(tmp_path):
    args = make_args(tmp_path, sam_method="asam", hub_model_id="someone/wrn-asam")
    trainer = AACETrainer(model=tiny_wrn(), args=args, train_dataset=make_dataset())
    (tmp_path / "all_results.json").write_text(json.dumps({"test_accuracy": 0.25}))
    # Given metrics and arguments win over all_results.json and the trainer's arguments.
    trainer.create_model_card(model_name="My WRN", metrics={"test_accuracy": 0.5}, run_arguments={"epochs": 7})
    card = " ".join((tmp_path / "README.md").read_text().split())
    assert "with ASAM (rho 0.5, normalized True) using hf_aace" in card
    assert "# My WRN" in card and 'from_pretrained("someone/wrn-asam"' in card
    assert "| test_accuracy | 0.5000 |" in card and "0.25" not in card and "(`test` split for test metrics)" in card
    assert '"epochs": 7' in card and "sam_method" not in card


def test_model_card_reads_the_saved_results_and_names_the_data_and_the_aace_settings(tmp_path):
    args = make_args(tmp_path, aace_threshold=0.3, aace_mode="uniform", hub_model_id="someone/wrn-aace")
    trainer = AACETrainer(model=tiny_wrn(), args=args, train_dataset=make_dataset())
    (tmp_path / "all_results.json").write_text(json.dumps({"test_accuracy": 0.8125, "test_loss": 0.5}))
    trainer.create_model_card(dataset_id="someone/digits", dataset_name="Digits", test_split="validation")
    text = (tmp_path / "README.md").read_text()
    card = " ".join(text.split())
    assert "# wrn-aace" in card and 'from_pretrained("someone/wrn-aace"' in card
    assert (
        "trained on Digits (someone/digits) with AACE-SAM (rho 0.2, normalized False, threshold 0.3, mode uniform)"
        in card
    )
    assert "| test_accuracy | 0.8125 |" in card and "| test_loss | 0.5000 |" in card
    assert "(`validation` split for test metrics)" in card and "split: validation" in text
    assert "datasets:\n- someone/digits\n" in text and '"aace_mode": "uniform"' in card


@pytest.mark.parametrize(("threshold", "mode"), [(0.3, "adaptive"), (0.0, "uniform")])
def test_aace_threshold_and_mode_set_the_perturbation(tmp_path, threshold, mode):
    dataset = make_dataset()
    model, expected = tiny_wrn(), tiny_wrn()
    args = make_args(tmp_path, aace_threshold=threshold, aace_mode=mode)
    trainer = AACETrainer(model=model, args=args, train_dataset=dataset)
    trainer.train()
    batch = (dataset.pixel_values[:8], dataset.labels[:8])
    logits = tiny_wrn().train()(batch[0]).logits
    value = aace_loss(logits, batch[1], threshold=threshold, mode=mode).item()
    assert value != pytest.approx(aace_loss(logits, batch[1]).item(), rel=1e-2)  # the options matter here
    (entry,) = [e for e in trainer.state.log_history if "perturbation_loss" in e]
    assert entry["perturbation_loss"] == pytest.approx(value, rel=1e-5, abs=1e-6)
    reference_step(expected, [batch], "aace", 0.2, False, lr=0.1, aace_options={"threshold": threshold, "mode": mode})
    assert_state_close(model, expected)


def test_ddp_static_graph_trains_exactly_like_the_default_graph(tmp_path, ddp_ranks):
    ranks = launch_ddp_train(tmp_path, "--static_graph")
    assert ranks[0]["first_grad_norm"] != ranks[1]["first_grad_norm"]
    assert ranks[0]["weights"] == ranks[1]["weights"] == ddp_ranks[0]["weights"]
    assert ranks[0]["losses"] == ddp_ranks[0]["losses"]


def test_static_graph_with_reentrant_checkpointing_is_refused_at_construction(tmp_path):
    args = make_args(
        tmp_path, ddp_static_graph=True, **reentrant_checkpointing(),
    )  # fmt: skip
    with pytest.raises(ValueError, match="cannot combine ddp_static_graph with reentrant gradient checkpointing"):
        AACETrainer(model=tiny_wrn(), args=args, train_dataset=make_dataset())
