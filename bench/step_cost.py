"""Cost of one AACETrainer optimizer step for sgd, sam, asam and aace, side by side in one run.

Every method trains the same model object on the same fixed batch through `AACETrainer.train()`, so the timed step is
exactly the Trainer's loop: fetch and collate the batch, `training_step` (one pass for sgd, two for the sharpness-aware
methods), gradient norm, `optimizer.step()`, `lr_scheduler.step()`, `zero_grad()`. A callback stamps the clock at every
`on_step_end` (after `torch.cuda.synchronize()` on CUDA); a step's time is the gap between two consecutive stamps.
The first `--warmup` steps of every `train()` call are not timed.

A method may carry cheaper-step settings (`aace:k=5` is `perturbation_interval=5`, `aace:f=0.5` is
`perturbation_batch_fraction=0.5`); with an interval k the step times alternate, so the mean over a multiple of k
timed steps is the cost per step (`mean ratio`).

Methods run round-robin: repeat 1 runs sgd, sam, asam, aace; repeat 2 runs them in reverse order; and so on, so that
drift of a shared machine affects every method alike. Reported: the median step time over all timed steps, images/s
at that median, the ratio of the median to sgd's median, and peak memory:

- CUDA: `torch.cuda.max_memory_allocated()` during the method's first `train()` call, minus what was allocated when
  it started (the method's optimizer state, perturbation buffers, gradients and activations above the model weights);
- CPU: the rise of the process's peak resident set size (Linux VmHWM, reset through /proc/self/clear_refs after
  returning freed heap with malloc_trim) during the method's first `train()` call, the same quantity as seen by the OS
  (allocator caching included, so it is coarse).

The inputs are random normalised floats (no augmentation): this measures the optimizer step, not the data pipeline
(bench/reference_loop.py measures end to end).

Models: hf_aace's (`wrn-DEPTH-WIDEN`, `pyramidnet-DEPTH-ALPHA[-bottleneck]`, named sizes such as `pyramidnet-272`, as
`hf_aace.models.architectures.resolve_model` reads them) on 32x32 images, and two transformers models from random-init
configs: `vit-tiny` (ViT-Ti/4 on 32x32 images: hidden 192, 12 layers, 3 heads) and `bert-tiny` (hidden 128, 2 layers,
2 heads, 30,522-token vocabulary, 128-token sequences, 2 classes).

Usage:
    python bench/step_cost.py [--models wrn-16-4 pyramidnet-20-48 vit-tiny bert-tiny] [--batch_size 128]
        [--steps 2] [--warmup 1] [--repeats 3] [--methods sgd sam asam aace aace:k=5 aace:f=0.5]
        [--device cpu|cuda] [--bf16]
        [--channels_last] [--compile] [--step_capture cuda_graph] [--no_nan_inf_filter] [--output_json PATH]
        [--output_md PATH]

With `--step_capture cuda_graph` every kind of step is captured as a CUDA graph on its third occurrence (two eager
warm-up steps first): keep `--warmup` at 3 or more so that, for methods with k = 1, the timed steps are replays (with
an interval k the two-pass step's graph is captured at step 2k, and that one slow step falls into the mean).
`--no_nan_inf_filter` sets the Trainer's `logging_nan_inf_filter=False`: the Trainer's loop then reads nothing back
to the host per step (its two syncs are that filter's `isnan`/`isinf` of the step's loss), so the host can queue the
next step while the device runs this one.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import tempfile

import torch
from transformers import BertConfig, BertForSequenceClassification, ViTConfig, ViTForImageClassification
from transformers.trainer_callback import PrinterCallback

from hf_aace import AACETrainer
from hf_aace.capture import CAPTURE_CHOICES
from hf_aace.methods import METHODS
from hf_aace.training_args import parse_method_variant

from common import (
    StepTimer,
    build_hf_aace_model,
    resolve_hf_aace_model,
    run_and_report,
    training_arguments,
)

TEXT_LENGTH = 128
TRANSFORMERS_MODELS = {
    "vit-tiny": lambda: ViTForImageClassification(
        ViTConfig(
            image_size=32,
            patch_size=4,
            hidden_size=192,
            num_hidden_layers=12,
            num_attention_heads=3,
            intermediate_size=768,
            num_labels=10,
        )  # fmt: skip
    ),
    "bert-tiny": lambda: BertForSequenceClassification(
        BertConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512, num_labels=2)
    ),
}


def build_model(spec: str, num_labels: int = 10) -> torch.nn.Module:
    """A fresh model from a short name: an hf_aace model name or a `TRANSFORMERS_MODELS` key."""
    if spec in TRANSFORMERS_MODELS:
        return TRANSFORMERS_MODELS[spec]()
    return build_hf_aace_model(spec, num_labels)


class PeakMemory:
    """Peak memory rise during a block: CUDA allocator peak, or the process's peak RSS (Linux) on CPU."""

    def __init__(self, device: str):
        self.device = device
        self.rise_bytes: int | None = None
        self._libc = None
        if device == "cpu":
            try:
                self._libc = ctypes.CDLL("libc.so.6")
            except OSError:
                self._libc = None

    @staticmethod
    def _status_kib(field: str) -> int | None:
        try:
            with open("/proc/self/status") as status:
                for line in status:
                    if line.startswith(field + ":"):
                        return int(line.split()[1])
        except OSError:
            pass
        return None

    def __enter__(self) -> PeakMemory:
        self.rise_bytes = None
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated()
            return self
        if self._libc is not None:
            self._libc.malloc_trim(0)
        try:
            with open("/proc/self/clear_refs", "w") as clear_refs:
                clear_refs.write("5")  # resets VmHWM to the current RSS
            self._start = self._status_kib("VmRSS")
        except OSError:
            self._start = None
        return self

    def __exit__(self, *exc_info) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.rise_bytes = torch.cuda.max_memory_allocated() - self._start
        elif self._start is not None:
            peak = self._status_kib("VmHWM")
            self.rise_bytes = None if peak is None else (peak - self._start) * 1024


class FixedBatch(torch.utils.data.Dataset):
    """`length` items cycling over one batch of inputs, so that every step sees the same inputs."""

    def __init__(self, inputs: dict[str, torch.Tensor], length: int):
        self.inputs, self.length = inputs, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        index %= self.inputs["labels"].shape[0]
        return {name: values[index] for name, values in self.inputs.items()}


def fixed_batch(spec: str, cli: argparse.Namespace, length: int) -> FixedBatch:
    """Random normalised images with 10 classes, or random token ids with 2 classes for `bert-tiny`."""
    generator = torch.Generator().manual_seed(0)
    if spec == "bert-tiny":
        inputs = {
            "input_ids": torch.randint(0, 30522, (cli.batch_size, TEXT_LENGTH), generator=generator),
            "labels": torch.randint(0, 2, (cli.batch_size,), generator=generator),
        }
    else:
        inputs = {
            "pixel_values": torch.randn(cli.batch_size, 3, cli.image_size, cli.image_size, generator=generator),
            "labels": torch.randint(0, 10, (cli.batch_size,), generator=generator),
        }
    return FixedBatch(inputs, length)


def median_or_none(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def format_mib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:.0f}"


def run(cli: argparse.Namespace) -> dict:
    device = cli.device
    max_steps = cli.warmup + cli.steps
    results = {"models": {}}
    with tempfile.TemporaryDirectory() as output_dir:
        for spec in cli.models:
            dataset = fixed_batch(spec, cli, cli.batch_size * max_steps)
            torch.manual_seed(0)
            model = build_model(spec)
            if cli.channels_last:
                model = model.to(memory_format=torch.channels_last)
            parameters = sum(p.numel() for p in model.parameters())
            timer = StepTimer(device)
            trainers = {}
            for method in cli.methods:
                name, settings = parse_method_variant(method)
                args = training_arguments(
                    name, output_dir, cli, max_steps, logging_nan_inf_filter=not cli.no_nan_inf_filter, **settings
                )
                trainers[method] = AACETrainer(model=model, args=args, train_dataset=dataset, callbacks=[timer])
                trainers[method].remove_callback(PrinterCallback)  # the end-of-train metrics line, once per call
            times = {method: [] for method in cli.methods}
            memory = {}
            for repeat in range(cli.repeats):
                order = cli.methods if repeat % 2 == 0 else cli.methods[::-1]
                for method in order:
                    meter = PeakMemory(device)
                    with meter:
                        trainers[method].train()
                    if method not in memory:
                        memory[method] = meter.rise_bytes
                    steps = timer.step_times(cli.warmup)
                    times[method].extend(steps)
                    print(
                        f"{spec} repeat {repeat + 1}/{cli.repeats} {method}: "
                        + " ".join(f"{1000 * t:.1f}" for t in steps)
                        + " ms",
                        flush=True,
                    )
            sgd_median = median_or_none(times.get("sgd", []))
            sgd_mean = statistics.mean(times["sgd"]) if times.get("sgd") else None
            rows = {}
            for method in cli.methods:
                median = median_or_none(times[method])
                mean = statistics.mean(times[method])
                rows[method] = {
                    "step_times_s": times[method],
                    "median_step_s": median,
                    "mean_step_s": mean,
                    "images_per_s": cli.batch_size / median,
                    "ratio_to_sgd": median / sgd_median if sgd_median else None,
                    "mean_ratio_to_sgd": mean / sgd_mean if sgd_mean else None,
                    "peak_memory_rise_bytes": memory[method],
                }
            results["models"][spec] = {"parameters": parameters, "methods": rows}
            del trainers, model
    return results


def markdown(cli: argparse.Namespace, results: dict, header: list[str], command: str) -> str:
    memory_kind = (
        "CUDA max_memory_allocated rise"
        if cli.device == "cuda"
        else "peak RSS (VmHWM) rise, coarse: allocator caching"
    )
    lines = ["## AACETrainer step cost", ""]
    lines += header
    lines += [
        f"- command: `{command}`",
        f"- settings: device {cli.device}, batch {cli.batch_size}, {cli.image_size}x{cli.image_size}x3 random inputs, "
        f"{'bf16' if cli.bf16 else 'fp32'}, channels_last {cli.channels_last}, torch.compile {cli.compile}, "
        f"step_capture {cli.step_capture}, logging_nan_inf_filter {not cli.no_nan_inf_filter}; "
        f"{cli.repeats} repeats x {cli.steps} timed steps per method (after {cli.warmup} warmup steps per repeat), "
        "methods interleaved round-robin (order reversed every other repeat); SGD momentum 0.9, weight decay 5e-4, "
        "no clipping",
        f"- memory column: {memory_kind}, in the method's first train() call",
        "",
        "| model | params | method | median step (ms) | images/s | ratio to sgd | mean step (ms) | mean ratio "
        "| min-max step (ms) | peak memory rise (MiB) |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for spec, model in results["models"].items():
        for method, row in model["methods"].items():
            ratio = "n/a" if row["ratio_to_sgd"] is None else f"{row['ratio_to_sgd']:.3f}"
            mean_ratio = "n/a" if row.get("mean_ratio_to_sgd") is None else f"{row['mean_ratio_to_sgd']:.3f}"
            spread = f"{1000 * min(row['step_times_s']):.1f}-{1000 * max(row['step_times_s']):.1f}"
            lines.append(
                f"| {spec} | {model['parameters'] / 1e6:.2f}M | {method} | {1000 * row['median_step_s']:.1f} | "
                f"{row['images_per_s']:.1f} | {ratio} | {1000 * row['mean_step_s']:.1f} | {mean_ratio} | {spread} | "
                f"{format_mib(row['peak_memory_rise_bytes'])} |"
            )
    return "\n".join(lines) + "\n"


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--models",
        nargs="+",
        default=["wrn-16-4", "pyramidnet-20-48"],
        help="wrn-DEPTH-WIDEN, pyramidnet-DEPTH-ALPHA[-bottleneck], vit-tiny, bert-tiny (default: wrn-16-4 "
        "pyramidnet-20-48)",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        default=list(METHODS),
        help="methods to time, each optionally with cheaper-step settings: aace:k=5 (perturbation_interval 5), "
        "sam:f=0.5 (perturbation_batch_fraction 0.5), aace:k=2:f=0.25. With k > 1, compare the mean step time over "
        "a multiple of k timed steps (--steps), not the median.",
    )
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=None, help="timed steps per repeat (default: cpu 2, cuda 20)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per repeat, >= 1 (cpu 1, cuda 5)")
    parser.add_argument("--repeats", type=int, default=None, help="round-robin repeats (default: cpu 3, cuda 5)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (the Trainer's --bf16)")
    parser.add_argument("--channels_last", action="store_true", help="model weights in channels_last memory format")
    parser.add_argument("--compile", action="store_true", help="the Trainer's --torch_compile")
    parser.add_argument(
        "--step_capture", choices=CAPTURE_CHOICES, default="none", help="--step_capture (cuda_graph: CUDA only)"
    )
    parser.add_argument(
        "--no_nan_inf_filter", action="store_true", help="logging_nan_inf_filter=False: no host sync per step"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--output_json", default=None, help="also write the raw step times and results here")
    parser.add_argument("--output_md", default=None, help="also write the Markdown table here")
    cli = parser.parse_args(argv)
    on_cuda = cli.device == "cuda"
    cli.steps = cli.steps if cli.steps is not None else (20 if on_cuda else 2)
    cli.warmup = cli.warmup if cli.warmup is not None else (5 if on_cuda else 1)
    cli.repeats = cli.repeats if cli.repeats is not None else (5 if on_cuda else 3)
    if cli.warmup < 1 or cli.steps < 1 or cli.repeats < 1 or cli.batch_size < 1:
        parser.error("--warmup, --steps, --repeats and --batch_size must be >= 1 (the first step is never timed).")
    if on_cuda and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device.")
    for method in cli.methods:
        try:
            parse_method_variant(method)
        except ValueError as error:
            parser.error(str(error))
    for spec in cli.models:
        if spec not in TRANSFORMERS_MODELS:
            try:
                resolve_hf_aace_model(spec)
            except ValueError as error:
                parser.error(f"{error} Or one of {', '.join(TRANSFORMERS_MODELS)}.")
    return cli


def main(argv: list[str] | None = None) -> None:
    run_and_report(parse_arguments(argv), run, markdown)


if __name__ == "__main__":
    main()
