"""Kernels and host syncs of one AACETrainer optimizer step per method, counted on the CPU (no GPU needed).

Every method trains the same model on the same fixed batch through `AACETrainer.train()` under
`hf_aace.op_count.OpCounter`; a callback takes the counter's totals at every `on_step_begin` and `on_step_end`, so a
step's figures cover exactly what the Trainer's loop does between them: fetch the batch, `training_step` for each
micro-batch (one pass for sgd, two for the others), clipping, `optimizer.step()`, the scheduler, `zero_grad()`; the
kernels before `on_pre_optimizer_step` (fetch and training steps) are also given apart. The first step is not counted
(it allocates the saved weights and checks the AACE pairs once).

Reported per method: kernels (operations that are not views: each is a kernel launch on a GPU), host syncs (values
read back to the host: `.item()`, `bool(tensor)`), and their ratios to sgd's. On a GPU each sync stalls the host
until the device has caught up; with few kernels per launch the step is host-bound (bench/RESULTS.md section 9).

With `--captured`, the step runs as `step_capture="cuda_graph"` runs it, through the CPU stand-in of CUDA graphs in
tests/capture_emulation.py, and a replay counts as one launch: the figures are then what the host still launches and
reads back per step with the step captured (the copies into the graph's inputs, the graph, the Trainer's optimizer
and logging). The steps before every kind of step has its graph are not counted.

Usage:
    python bench/step_ops.py [--models wrn-16-4 vit-tiny bert-tiny] [--methods sgd sam asam aace aace:k=5]
        [--batch_size 8] [--steps 3] [--captured] [--output_json PATH] [--output_md PATH]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback

from hf_aace import AACETrainer
from hf_aace.capture import StepCapture
from hf_aace.methods import METHODS
from hf_aace.op_count import OpCounter
from hf_aace.training_args import parse_method_variant

from common import run_and_report, training_arguments
from step_cost import TRANSFORMERS_MODELS, build_model, fixed_batch


class OneLaunchReplays:
    """The CPU stand-in of CUDA graphs, whose replay runs the step's operations again, with each replay counted as
    the one launch it is on a GPU: `hidden` tallies the operations to take off the counter's totals."""

    def __init__(self, model: torch.nn.Module, counter: OpCounter):
        tests = str(Path(__file__).resolve().parent.parent / "tests")
        if tests not in sys.path:  # once, however many methods are counted
            sys.path.insert(0, tests)
        from capture_emulation import EmulatedGraphs

        self.graphs, self.counter, self.hidden = EmulatedGraphs(model), counter, 0

    def run_eagerly(self, step):
        return self.graphs.run_eagerly(step)

    def capture(self, step):
        return self.graphs.capture(step)

    def replay(self, graph) -> None:
        before = self.counter.kernels
        self.graphs.replay(graph)
        self.hidden += self.counter.kernels - before - 1


class StepCounts(TrainerCallback):
    """The counter's kernel and sync totals between each step's begin and end (less the replays' hidden operations)."""

    def __init__(self, counter: OpCounter, replays: OneLaunchReplays | None = None):
        self.counter, self.replays = counter, replays
        self.steps: list[tuple[int, int]] = []
        self.before_optimizer: list[int] = []

    def _kernels(self) -> int:
        return self.counter.kernels - (self.replays.hidden if self.replays is not None else 0)

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = (self._kernels(), self.counter.syncs)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.before_optimizer.append(self._kernels() - self._start[0])

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append((self._kernels() - self._start[0], self.counter.syncs - self._start[1]))


def run(cli: argparse.Namespace) -> dict:
    results = {"models": {}}
    with tempfile.TemporaryDirectory() as output_dir:
        for spec in cli.models:
            rows = {}
            for method in cli.methods:
                torch.manual_seed(0)
                model = build_model(spec)
                name, settings = parse_method_variant(method)
                # Uncounted: the first step, or with capture every step until each kind of step has its graph (the
                # two-pass step's is captured at step 2k).
                skip = 2 * settings.get("perturbation_interval", 1) + 1 if cli.captured else 1
                args = training_arguments(name, output_dir, cli, cli.steps + skip, **settings)
                counter = OpCounter()
                replays = OneLaunchReplays(model, counter) if cli.captured else None
                counts = StepCounts(counter, replays)
                trainer = AACETrainer(
                    model=model, args=args, train_dataset=fixed_batch(spec, cli, cli.batch_size * (cli.steps + skip)),
                    callbacks=[counts],
                )  # fmt: skip
                trainer.remove_callback(PrinterCallback)
                if replays is not None:
                    trainer._step_capture = StepCapture(replays)
                with counter:
                    trainer.train()
                steps = counts.steps[skip:]
                rows[method] = {
                    "kernels_per_step": statistics.mean(k for k, _ in steps),
                    "syncs_per_step": statistics.mean(s for _, s in steps),
                    "kernels_before_optimizer": statistics.mean(counts.before_optimizer[skip:]),
                    "steps": steps,
                }
                print(f"{spec} {method}: {rows[method]['kernels_per_step']:.0f} kernels, "
                      f"{rows[method]['syncs_per_step']:.1f} syncs per step", flush=True)  # fmt: skip
            sgd = rows.get("sgd")
            for row in rows.values():
                row["kernel_ratio_to_sgd"] = row["kernels_per_step"] / sgd["kernels_per_step"] if sgd else None
            results["models"][spec] = {"methods": rows}
    return results


def markdown(cli: argparse.Namespace, results: dict, header: list[str], command: str) -> str:
    lines = ["## Kernels and host syncs per optimizer step", "", *header, f"- command: `{command}`"]
    lines += [
        f"- settings: CPU, batch {cli.batch_size}, fp32, one micro-batch per step, {cli.steps} counted steps after "
        + (
            "every kind of step has its graph (captured: a replay counts as one launch)"
            if cli.captured
            else "one uncounted step"
        )
        + "; kernels = aten operations that are not views, syncs = values read back to the host",
        "",
        "| model | method | kernels per step | ratio to sgd | of which before the optimizer | host syncs per step |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for spec, model in results["models"].items():
        for method, row in model["methods"].items():
            ratio = "n/a" if row["kernel_ratio_to_sgd"] is None else f"{row['kernel_ratio_to_sgd']:.3f}"
            lines.append(
                f"| {spec} | {method} | {row['kernels_per_step']:.0f} | {ratio} | "
                f"{row['kernels_before_optimizer']:.0f} | {row['syncs_per_step']:.1f} |"
            )
    return "\n".join(lines) + "\n"


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["wrn-16-4", "vit-tiny", "bert-tiny"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), help="as for bench/step_cost.py")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3, help="counted steps (after one uncounted step)")
    parser.add_argument("--captured", action="store_true", help="the step captured, a replay counted as one launch")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--output_json", default=None)
    parser.add_argument("--output_md", default=None)
    cli = parser.parse_args(argv)
    cli.device, cli.bf16, cli.compile = "cpu", False, False
    for method in cli.methods:
        try:
            parse_method_variant(method)
        except ValueError as error:
            parser.error(str(error))
    for spec in cli.models:
        if spec not in TRANSFORMERS_MODELS and not spec.startswith(("wrn-", "pyramidnet-")):
            parser.error(f"--models: {spec!r} is not a model of bench/step_cost.py")
    return cli


def main(argv: list[str] | None = None) -> None:
    run_and_report(parse_arguments(argv), run, markdown)


if __name__ == "__main__":
    main()
