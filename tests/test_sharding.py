"""The two-pass step under FSDP2 and DDP (tests/fsdp_train.py on two gloo processes), the launches it refuses, and
models of any floating dtype."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState
from accelerate.utils import FullyShardedDataParallelPlugin
from launch import two_process_launch
from safetensors.torch import load_file
from transformers import AutoModelForImageClassification, Trainer, TrainingArguments

from hf_aace import (
    AACETrainer,
    PyramidNetConfig,
    PyramidNetForImageClassification,
    SharpnessAwareArguments,
    sharpness_aware,
)
from hf_aace.checkpoints import checkpoint_problem, find_resumable_checkpoint
from hf_aace.perturbation import global_norm
from hf_aace.sharding import GLOBAL_BATCH, PER_PROCESS

from fsdp_train import Images, full_weights, tiny_vit, train
from local_hub import free_port
from test_trainer import make_args, make_dataset, tiny_wrn

ROOT = Path(__file__).resolve().parents[1]
# DDP first: the FSDP runs' arguments set ACCELERATE_USE_FSDP in the process environment.
RUNS = ("aace:2:ddp", "aace:1", "aace:2", "sam:2", "asam:1", "aace:2:resume", "save")


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory) -> Path:
    output_dir = tmp_path_factory.mktemp("fsdp")
    command = two_process_launch("--multi_gpu", str(ROOT / "tests" / "fsdp_train.py"), str(output_dir), *RUNS)
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return output_dir


def run_output(output_dir: Path, run: str) -> tuple[dict[str, torch.Tensor], dict]:
    folder = output_dir / run.replace(":", "-")
    return load_file(folder / "weights.safetensors"), json.loads((folder / "record.json").read_text())


def assert_weights_close(weights: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], atol: float) -> float:
    assert weights.keys() == reference.keys()
    difference = max((weights[name] - reference[name]).abs().max().item() for name in reference)
    assert difference <= atol, difference
    return difference


@pytest.mark.parametrize("run", ["aace:1", "aace:2", "sam:2", "asam:1"])
def test_fsdp2_step_is_the_global_batch_step_of_one_process(two_process_runs, tmp_path, run):
    method, accumulation = run.split(":")
    weights, record = run_output(two_process_runs, run)
    assert record["world_size"] == 2 and record["parameter_types"] == ["DTensor"]  # really sharded
    assert record["resolved"]["perturbation_scope"] == GLOBAL_BATCH
    reference = train(tmp_path, method, int(accumulation), processes=1)
    assert_weights_close(weights, full_weights(reference), atol=1e-6)
    # The perturbation's norm is global: the logged first-pass gradient norms are the global batch's.
    logged = [entry["perturbation_grad_norm"] for entry in record["history"] if "loss" in entry]
    expected = [entry["perturbation_grad_norm"] for entry in reference.state.log_history if "loss" in entry]
    assert logged == pytest.approx(expected, rel=1e-5)
    # Training moved the weights well beyond the tolerance, and the perturbation mattered.
    initial = tiny_vit().state_dict()
    assert max((weights[name] - initial[name]).abs().max().item() for name in initial) > 0.05
    plain = train(tmp_path / "sgd", "sgd", int(accumulation), processes=1)
    assert max((weights[n] - w).abs().max().item() for n, w in full_weights(plain).items()) > 1e-3


def test_fsdp2_checkpoint_resumes_to_the_weights_of_an_uninterrupted_run(two_process_runs):
    resumed, record = run_output(two_process_runs, "aace:2:resume")
    uninterrupted, _ = run_output(two_process_runs, "aace:2")
    assert_weights_close(resumed, uninterrupted, atol=1e-6)
    assert record["history"][-2]["step"] == 3


@pytest.mark.parametrize(
    ("damage", "name", "problem"),
    [
        (None, None, None),
        ("delete", "pytorch_model_fsdp_0/.metadata", "pytorch_model_fsdp_0/.metadata is missing"),
        ("delete", "optimizer_0/.metadata", "optimizer_0/.metadata is missing"),
        ("delete", "scheduler.pt", "scheduler.pt is missing"),
        ("truncate", "rng_state_1.pth", "rng_state_1.pth is unreadable"),
    ],
)
def test_sharded_fsdp2_checkpoints_are_resumable_unless_cut_short(two_process_runs, tmp_path, damage, name, problem):
    # The sharded checkpoints hold no model.safetensors or optimizer.pt: a rerun of scripts/train.py resumes from them.
    copy = tmp_path / "run"
    shutil.copytree(two_process_runs / "save", copy)
    if damage is not None:
        broken = copy / "checkpoint-2" / name
        broken.unlink() if damage == "delete" else broken.write_bytes(broken.read_bytes()[:10])
    checkpoint, skipped = find_resumable_checkpoint(copy)
    assert checkpoint == str(copy / ("checkpoint-2" if problem is None else "checkpoint-1"))
    assert [path for path, _ in skipped] == ([] if problem is None else [str(copy / "checkpoint-2")])
    if problem is not None:
        assert skipped[0][1].startswith(problem)


def test_whole_fsdp_checkpoints_are_resumable_unless_cut_short(tmp_path):
    # What the Trainer writes under FSDP with full state dicts, besides model.safetensors.
    checkpoint = tmp_path / "checkpoint-1"
    checkpoint.mkdir()
    (checkpoint / "trainer_state.json").write_text("{}")
    for name in ("pytorch_model_fsdp.bin", "optimizer.bin", "scheduler.pt", "rng_state_0.pth"):
        torch.save({"weight": torch.ones(3)}, checkpoint / name)
    assert checkpoint_problem(checkpoint) is None
    (checkpoint / "optimizer.bin").write_bytes(b"cut")
    assert checkpoint_problem(checkpoint).startswith("optimizer.bin is unreadable")
    (checkpoint / "optimizer.bin").unlink()
    assert checkpoint_problem(checkpoint).startswith("optimizer.bin is missing")


def test_fsdp2_saves_the_models_own_remote_code_weights_and_card(two_process_runs):
    # FSDP2 renames the model's class to FSDPWideResNetForImageClassification, defined in torch: save_pretrained would
    # copy torch's FSDP files as the remote code and point auto_map at them.
    folder = two_process_runs / "save"
    saved = folder / "saved"
    assert sorted(p.name for p in saved.glob("*.py")) == ["configuration_wide_resnet.py", "modeling_wide_resnet.py"]
    config = json.loads((saved / "config.json").read_text())
    assert config["architectures"] == ["WideResNetForImageClassification"]
    assert config["auto_map"]["AutoModelForImageClassification"] == (
        "modeling_wide_resnet.WideResNetForImageClassification"
    )
    model = AutoModelForImageClassification.from_pretrained(saved, trust_remote_code=True)
    assert type(model).__name__ == "WideResNetForImageClassification"
    trained = load_file(folder / "weights.safetensors")
    assert_weights_close(dict(model.state_dict()), trained, atol=0)
    assert (folder / "checkpoint-2" / "pytorch_model_fsdp_0").is_dir()  # the checkpoints stay sharded
    # Each residual unit is an FSDP unit of its own (the models' _no_split_modules), not only the whole model.
    assert "FSDPWideResNetLayer" in json.loads((folder / "record.json").read_text())["sharded_units"]
    card = (folder / "README.md").read_text()
    assert "FSDPWideResNet" not in card and "taken from the gradient of the global batch" in card
    assert "AutoModelForImageClassification" in card


def test_ddp_perturbs_each_process_with_its_own_batch_and_records_it(two_process_runs, tmp_path):
    # ViT takes loss keyword arguments: under DDP with accumulation the Trainer scales its loss by the number of
    # processes in place, which the pair check must allow for (it refused this run before).
    weights, record = run_output(two_process_runs, "aace:2:ddp")
    assert record["world_size"] == 2 and record["parameter_types"] == ["Parameter"]
    assert record["resolved"]["perturbation_scope"] == PER_PROCESS
    global_batch = full_weights(train(tmp_path, "aace", 2, processes=1))
    assert max((weights[name] - global_batch[name]).abs().max().item() for name in weights) > 1e-3


def test_single_process_runs_record_the_global_batch_scope(tmp_path):
    trainer = AACETrainer(model=tiny_wrn(), args=make_args(tmp_path), train_dataset=make_dataset())
    assert trainer.resolved_sharpness_aware()["perturbation_scope"] == GLOBAL_BATCH


def pretend_launch(monkeypatch, **attributes):
    """The Trainer's accelerator set-up as a distributed launch would leave it (these need one to enable)."""
    original = Trainer.create_accelerator_and_postprocess

    def create(self):
        original(self)
        for name, value in attributes.items():
            if name == "fsdp_plugin":
                monkeypatch.setattr(AcceleratorState(), "fsdp_plugin", value, raising=False)
            elif name == "scaler":
                monkeypatch.setattr(self.accelerator, "scaler", value)
            else:
                setattr(self, name, value)

    monkeypatch.setattr(Trainer, "create_accelerator_and_postprocess", create)


@pytest.mark.parametrize(
    "attributes, message",
    [
        ({"is_deepspeed_enabled": True}, "does not support DeepSpeed"),
        ({"is_fsdp_enabled": True, "fsdp_plugin": FullyShardedDataParallelPlugin(fsdp_version=1)}, "FSDP1"),
        (
            {"is_fsdp_enabled": True, "fsdp_plugin": FullyShardedDataParallelPlugin(fsdp_version=2), "scaler": 1},
            "fp16 under FSDP2",
        ),
    ],
)
def test_launches_the_step_cannot_serve_exactly_are_refused(tmp_path, monkeypatch, attributes, message):
    pretend_launch(monkeypatch, **attributes)
    with pytest.raises(ValueError, match=message):
        AACETrainer(model=tiny_wrn(), args=make_args(tmp_path), train_dataset=make_dataset())


def test_fsdp2_launch_is_accepted(tmp_path, monkeypatch):
    pretend_launch(monkeypatch, is_fsdp_enabled=True, fsdp_plugin=FullyShardedDataParallelPlugin(fsdp_version=2))
    trainer = AACETrainer(model=tiny_wrn(), args=make_args(tmp_path), train_dataset=make_dataset())
    assert trainer.is_fsdp_enabled


@pytest.mark.parametrize("how", ["arguments", "launcher"])
def test_fsdp_that_would_silently_run_as_ddp_is_refused(tmp_path, monkeypatch, how):
    if how == "launcher":
        monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
        args = make_args(tmp_path)
    else:
        # What --fsdp and fsdp_config give on a multi-process CPU launch (a single process refuses them itself).
        args = make_args(tmp_path)
        args.fsdp_plugin_args = {"fsdp_version": 2}
        monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")  # accelerate sets it when given the plugin: undone after
    for trainer_class in (AACETrainer, sharpness_aware(Trainer)):
        with pytest.raises(ValueError, match="would silently hold the full weights on every process"):
            trainer_class(model=tiny_wrn(), args=args, train_dataset=make_dataset())


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("method", ["sam", "asam", "aace"])
def test_models_of_any_floating_dtype_train(tmp_path, method, dtype):
    model = tiny_vit().to(dtype)
    dataset = Images()
    dataset.pixel_values = dataset.pixel_values.to(dtype)
    args = TrainingArguments(
        str(tmp_path),
        use_cpu=True,
        per_device_train_batch_size=8,
        max_steps=2,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
    )
    settings = SharpnessAwareArguments(sam_method=method)
    trainer = sharpness_aware(Trainer)(model=model, args=args, train_dataset=dataset, sharpness_aware_args=settings)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer.train()
    assert all(p.dtype == dtype and p.isfinite().all() for p in model.parameters())
    assert any(not torch.equal(before[name], p) for name, p in model.named_parameters())
    assert trainer.state.log_history[0]["perturbation_norm"] > 0


def test_global_norm_keeps_float64():
    tensors = [torch.full((3,), 1e-200, dtype=torch.float64), torch.full((2,), 2e-200, dtype=torch.float64)]
    norm = global_norm(tensors)
    # Far below float32's range: squared in float32, these would underflow to 0.
    assert norm.dtype == torch.float64 and norm.item() == pytest.approx(11**0.5 * 1e-200, rel=1e-12)
    assert global_norm([torch.ones(4, dtype=torch.bfloat16)]).dtype == torch.float32


def test_own_models_name_their_stem_as_input_embeddings():
    # accelerate's FSDP2 wrapping calls get_input_embeddings() on every model it shards.
    wide_resnet = tiny_wrn()
    assert wide_resnet.get_input_embeddings() is wide_resnet.wide_resnet.embedder
    pyramidnet = PyramidNetForImageClassification(PyramidNetConfig(depth=8, alpha=6, num_labels=3))
    assert pyramidnet.get_input_embeddings() is pyramidnet.pyramidnet.embedder


def test_train_script_under_fsdp2_publishes_a_whole_model_and_resumes(tmp_path):
    # `accelerate launch --use_fsdp --fsdp_version 2 scripts/train.py ...`, sharded on CPU processes as on GPUs.
    output = tmp_path / "out"

    def launch(max_steps: int) -> subprocess.CompletedProcess:
        command = two_process_launch("--use_fsdp", "--fsdp_version", "2",
                   str(ROOT / "tests" / "fsdp_train.py"), "script", "--model", "wrn-10-1", "--dataset", "digits",
                   "--per_device_train_batch_size", "32", "--use_cpu", "--disable_tqdm", "true", "--logging_steps",
                   "1", "--max_steps", str(max_steps), "--save_strategy", "steps", "--save_steps", "2",
                   "--eval_train_split", "false", "--output_dir", str(output), "--cache_dir",
                   str(tmp_path / "cache"))  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
        return result

    first = launch(2)
    assert first.stdout.count("Test accuracy:") == 1
    # The script's default channels_last would make the weights non-contiguous, which FSDP2 cannot shard.
    assert "channels_last is off under FSDP" in first.stderr
    assert (output / "checkpoint-2" / "pytorch_model_fsdp_0").is_dir()
    assert sorted(p.name for p in output.glob("modeling_*.py")) == ["modeling_wide_resnet.py"]
    assert not list(output.glob("_fsdp*.py"))
    assert json.loads((output / "run_arguments.json").read_text())["training"]["perturbation_scope"] == GLOBAL_BATCH
    model = AutoModelForImageClassification.from_pretrained(output, trust_remote_code=True)
    assert type(model).__name__ == "WideResNetForImageClassification"

    second = launch(4)  # a rerun with more steps resumes from the sharded checkpoint
    assert f"Resuming from {output / 'checkpoint-2'}" in second.stderr
    history = json.loads((output / "trainer_state.json").read_text())["log_history"]
    assert [entry["step"] for entry in history if "loss" in entry] == [1, 2, 3, 4]


def test_the_process_group_is_ended_before_the_interpreter_exits():
    # Left to the interpreter's exit, gloo's threads can abort a process whose run succeeded.
    script = (
        "import torch.distributed as dist\n"
        "from hf_aace.sharding import end_process_group\n"
        f"dist.init_process_group('gloo', init_method='tcp://127.0.0.1:{free_port()}', rank=0, world_size=1)\n"
        "end_process_group()\n"
        "assert not dist.is_initialized()\n"
        "end_process_group()  # nothing to end: a no-op\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
