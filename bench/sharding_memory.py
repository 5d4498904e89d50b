"""Memory per rank of the two-pass step under FSDP2 against DDP: two gloo processes on the CPU, one launch per
configuration.

For each model, method (`sgd`, `sam`, `aace`, ...) and sharding (`ddp`, `fsdp2`) this script launches itself as a
fresh pair of processes with `accelerate launch --multi_gpu --num_processes 2` (so that no peak carries over between
configurations) and trains `--steps` steps of `AACETrainer` (use_cpu=True) on random 32x32 images, `--batch_size`
per process. FSDP2 is accelerate's (`fsdp=True, fsdp_config={"fsdp_version": 2, ...}`): one FSDP unit per residual
block (`transformer_layer_cls_to_wrap`), to which accelerate adds the stem, the final norm and the root. accelerate
shards only on GPU-type backends, so on these CPU processes its FSDP2 path is switched on by `CPUSharding` of
tests/fsdp_train.py, as the FSDP2 tests do.

Recorded by every rank:
- tensor bytes: the sum of the rank's local tensors (a DTensor's `.to_local()`) of the parameters, their gradients,
  the optimizer state and the perturbation's saved copy of the weights, taken right after `optimizer.step()` (all of
  them alive), maximum over the steps. Deterministic. Not counted: activations, the first pass's gradient (freed once
  applied as the perturbation), DDP's gradient buckets, FSDP2's all-gathered blocks during forward and backward.
- peak RSS rise in train(): the process's peak resident set size (Linux VmHWM, reset through /proc/self/clear_refs
  after malloc_trim, `step_cost.PeakMemory`) during `train()` over the RSS at its start. Under FSDP2 the start holds
  the whole model, built on every rank, which sharding frees inside train().
- peak RSS over the pre-model baseline: the same peak over the RSS before the model was built (everything the
  training added to a process with torch imported): the RSS figure to compare between the shardings.

RSS is what the OS sees, allocator caching included. The workers therefore run with glibc's MALLOC_MMAP_THRESHOLD_
fixed (`--mmap_threshold`, default 128 KiB), so that freed large blocks go back to the OS and RSS follows the live
tensors. With glibc's default (`--mmap_threshold 0`) the threshold rises up to 32 MiB as large blocks are freed,
later blocks then come from the heap and stay in RSS after they are freed, and FSDP2's saving did not show in the peak
RSS (bench/RESULTS.md section 13).

Usage:
    python bench/sharding_memory.py [--models wrn-22-10 wrn-16-4] [--methods sgd sam aace] [--steps 2]
        [--batch_size 8] [--threads 1] [--mmap_threshold 131072] [--output_json PATH] [--output_md PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import accelerate
import torch
from torch.distributed.fsdp import FSDPModule
from transformers import TrainerCallback

from hf_aace import AACETrainer
from hf_aace.perturbation import local_shards

from common import build_hf_aace_model, run_and_report, training_arguments
from step_cost import PeakMemory, format_mib

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from fsdp_train import CPUSharding  # noqa: E402

SHARDINGS = ("ddp", "fsdp2")
# One FSDP unit per residual block: only one block's weights are gathered whole at a time.
BLOCK_CLASSES = ("WideResNetLayer", "PyramidNetBasicLayer", "PyramidNetBottleNeckLayer")
LAUNCH = [
    "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
    "--mixed_precision", "no", "--dynamo_backend", "no",
]  # fmt: skip
COMPONENTS = ("parameters", "gradients", "optimizer_state", "saved_weights")


class CPUShardedAACETrainer(CPUSharding, AACETrainer):
    pass


def local_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in local_shards([t for t in tensors if t is not None]))


class TensorBytes(TrainerCallback):
    """Bytes of the rank's parameters, gradients, optimizer state and saved weights right after each optimizer step;
    keeps the step with the largest total."""

    def __init__(self):
        self.trainer = None
        self.largest: dict[str, int] = {}

    def on_optimizer_step(self, args, state, control, **kwargs):
        params = [p for p in self.trainer.model.parameters() if p.requires_grad]
        optimizer = getattr(self.trainer.optimizer, "optimizer", self.trainer.optimizer)
        states = [value for entry in optimizer.state.values() for value in entry.values() if torch.is_tensor(value)]
        saved = self.trainer._perturbation._saved or []  # the copy the restore reads back; None for sgd
        sizes = {
            "parameters": local_bytes(params),
            "gradients": local_bytes(p.grad for p in params),
            "optimizer_state": local_bytes(states),
            "saved_weights": local_bytes(saved),
        }
        sizes["total"] = sum(sizes.values())
        if sizes["total"] > self.largest.get("total", -1):
            self.largest = sizes


class RandomImages(torch.utils.data.Dataset):
    def __init__(self, rows: int, seed: int):
        generator = torch.Generator().manual_seed(seed)
        self.pixel_values = torch.randn(rows, 3, 32, 32, generator=generator)
        self.labels = torch.randint(0, 10, (rows,), generator=generator)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.pixel_values[index], "labels": self.labels[index]}


def worker(cli: argparse.Namespace) -> None:
    """One rank of one configuration: trains, then writes its figures to `<result_dir>/rank<N>.json`."""
    torch.set_num_threads(cli.threads)
    before_model_kib = PeakMemory._status_kib("VmRSS")
    torch.manual_seed(0)
    model = build_hf_aace_model(cli.model)
    parameters = sum(p.numel() for p in model.parameters())
    options = {}
    trainer_class = AACETrainer
    if cli.sharding == "fsdp2":
        trainer_class = CPUShardedAACETrainer
        blocks = sorted({type(module).__name__ for module in model.modules()} & set(BLOCK_CLASSES))
        options = dict(fsdp=True, fsdp_config={"fsdp_version": 2, "transformer_layer_cls_to_wrap": blocks})
    with tempfile.TemporaryDirectory() as output_dir:
        args = training_arguments(cli.method, output_dir, cli, cli.steps, **options)
        rank = args.process_index
        callback = TensorBytes()
        trainer = trainer_class(
            model=model,
            args=args,
            train_dataset=RandomImages(cli.batch_size * args.world_size * cli.steps, seed=rank),
            callbacks=[callback],
        )
        callback.trainer = trainer
        started = time.perf_counter()
        with PeakMemory("cpu") as peak:
            trainer.train()
        seconds = time.perf_counter() - started
        peak_kib = PeakMemory._status_kib("VmHWM")
    fsdp_units = [name or "(root)" for name, module in trainer.model.named_modules() if isinstance(module, FSDPModule)]
    record = {
        "rank": rank,
        "world_size": args.world_size,
        "parameters": parameters,
        "scope": trainer.resolved_sharpness_aware().get("perturbation_scope"),
        "parameter_types": sorted({type(p).__name__ for p in trainer.model.parameters()}),
        "fsdp_units": fsdp_units,
        "tensor_bytes": callback.largest,
        "peak_rss_rise_bytes": peak.rise_bytes,
        "peak_rss_over_baseline_bytes": None if peak_kib is None else (peak_kib - before_model_kib) * 1024,
        "rss_before_model_bytes": before_model_kib * 1024,
        "train_seconds": seconds,
    }
    Path(cli.result_dir, f"rank{rank}.json").write_text(json.dumps(record))


def launch(cli: argparse.Namespace, model: str, method: str, sharding: str) -> dict:
    """Runs one configuration in two fresh processes; returns the records of both ranks."""
    with tempfile.TemporaryDirectory() as result_dir:
        command = ["nice", "-n", "10", sys.executable, *LAUNCH, str(Path(__file__).resolve()), "--worker"]
        command += ["--model", model, "--method", method, "--sharding", sharding, "--result_dir", result_dir]
        command += ["--steps", str(cli.steps), "--batch_size", str(cli.batch_size), "--threads", str(cli.threads)]
        environment = {
            **os.environ,
            "OMP_NUM_THREADS": str(cli.threads),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        }
        environment.pop("MALLOC_MMAP_THRESHOLD_", None)
        if cli.mmap_threshold:
            environment["MALLOC_MMAP_THRESHOLD_"] = str(cli.mmap_threshold)
        started = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=cli.timeout)
        if result.returncode != 0:
            raise RuntimeError(f"{model} {method} {sharding} failed:\n{result.stdout[-2000:]}{result.stderr[-4000:]}")
        ranks = [json.loads(path.read_text()) for path in sorted(Path(result_dir).glob("rank*.json"))]
    print(f"{model} {method} {sharding}: {time.perf_counter() - started:.0f} s", flush=True)
    return {"ranks": ranks, "launch_seconds": time.perf_counter() - started}


def run(cli: argparse.Namespace) -> dict:
    results = {}
    order = list(SHARDINGS)
    for model in cli.models:
        for method in cli.methods:
            # Alternate which sharding runs first, as the other benchmarks interleave their contenders.
            for sharding in order:
                results.setdefault(model, {}).setdefault(method, {})[sharding] = launch(cli, model, method, sharding)
            order.reverse()
    return results


def per_rank(ranks: list[dict], key: str, component: str | None = None) -> list[int | None]:
    return [rank[key] if component is None else rank[key][component] for rank in ranks]


def ratio(fsdp2: list[int | None], ddp: list[int | None]) -> str:
    if None in fsdp2 or None in ddp or min(ddp) <= 0:
        return "n/a"
    return f"{max(fsdp2) / max(ddp):.2f}"


def markdown(cli: argparse.Namespace, results: dict, header: list[str], command: str) -> str:
    lines = ["## Memory per rank: FSDP2 against DDP (CPU, 2 gloo processes)", ""]
    lines += header
    lines += [
        f"- accelerate {accelerate.__version__}",
        f"- command: `{command}`",
        "- settings: each configuration launched as 2 fresh processes (accelerate launch --multi_gpu, gloo), "
        f"nice 10, {cli.threads} torch thread(s) each, MALLOC_MMAP_THRESHOLD_ "
        f"{cli.mmap_threshold or 'unset (glibc default, dynamic)'}; AACETrainer, {cli.steps} steps, batch "
        f"{cli.batch_size} per process of random 32x32 images, fp32, SGD momentum 0.9; FSDP2 with one unit per "
        "residual block, the stem, the final norm and the root",
        "- columns per rank (rank 0 / rank 1): tensor MiB = parameters + gradients + optimizer state + saved weights "
        "(local shards, after optimizer.step()); RSS rise = peak RSS in train() over its start; RSS over base = peak "
        "RSS in train() over the RSS before the model was built; ratios FSDP2/DDP of the larger rank",
        "",
        "| model | params | method | sharding | FSDP units | params / grads / optim / saved (MiB) | tensor MiB "
        "| RSS rise in train() (MiB) | RSS over base (MiB) | train() (s) | tensor FSDP2/DDP | RSS over base "
        "FSDP2/DDP |",
        "|---|---:|---|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]

    def both(values: list) -> str:
        return " / ".join(format_mib(value) for value in values)

    for model, methods in results.items():
        for method, shardings in methods.items():
            for sharding in SHARDINGS:
                ranks = shardings[sharding]["ranks"]
                first = ranks[0]
                parts = " / ".join(format_mib(first["tensor_bytes"][part]) for part in COMPONENTS)
                tensor_ratio = over_base_ratio = ""
                if sharding == "fsdp2":
                    ddp = shardings["ddp"]["ranks"]
                    tensor_ratio = ratio(
                        per_rank(ranks, "tensor_bytes", "total"), per_rank(ddp, "tensor_bytes", "total")
                    )
                    over_base = "peak_rss_over_baseline_bytes"
                    over_base_ratio = ratio(per_rank(ranks, over_base), per_rank(ddp, over_base))
                seconds = "/".join(f"{rank['train_seconds']:.0f}" for rank in ranks)
                lines.append(
                    f"| {model} | {first['parameters'] / 1e6:.2f}M | {method} | {sharding} | "
                    f"{len(first['fsdp_units'])} | "
                    f"{parts} | {both(per_rank(ranks, 'tensor_bytes', 'total'))} | "
                    f"{both(per_rank(ranks, 'peak_rss_rise_bytes'))} | "
                    f"{both(per_rank(ranks, 'peak_rss_over_baseline_bytes'))} | {seconds} | {tensor_ratio} | "
                    f"{over_base_ratio} |"
                )
    return "\n".join(lines) + "\n"


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["wrn-22-10", "wrn-16-4"], help="hf_aace model names")
    parser.add_argument("--methods", nargs="+", default=["sgd", "sam", "aace"])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=8, help="per process")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument(
        "--mmap_threshold",
        type=int,
        default=128 * 1024,
        help="glibc's MALLOC_MMAP_THRESHOLD_ for the workers, in bytes: larger blocks are mapped and given back to "
        "the OS when freed, so RSS follows the live tensors; 0 leaves glibc's default (a threshold that rises up to "
        "32 MiB as large blocks are freed; freed heap memory then stays in RSS)",
    )
    parser.add_argument("--timeout", type=int, default=600, help="seconds per launch")
    parser.add_argument("--output_json")
    parser.add_argument("--output_md")
    # The worker mode, run by the launches.
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--sharding", choices=SHARDINGS, help=argparse.SUPPRESS)
    parser.add_argument("--result_dir", help=argparse.SUPPRESS)
    cli = parser.parse_args(argv)
    cli.device, cli.bf16, cli.compile = "cpu", False, False  # what common.training_arguments and the header read
    return cli


if __name__ == "__main__":
    arguments = parse_arguments()
    if arguments.worker:
        worker(arguments)
    else:
        run_and_report(arguments, run, markdown)
