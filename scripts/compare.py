#!/usr/bin/env python
"""Compare SGD, SAM, ASAM and AACE over seeds, as the paper's tables do, and summarise the runs.

Each (method, seed) is an ordinary `scripts/train.py` run in `OUTPUT_DIR/{method}-seed{seed}` (model, card, metrics,
plots, checkpoints), launched as a subprocess. Every flag this script does not know goes to `scripts/train.py`, so the
model, dataset and recipe are chosen as for one run. At the end it writes `comparison.json`, `comparison.md` (mean ±
sample std of the test accuracy per method) and `comparison.png` into OUTPUT_DIR.

A method may carry cheaper-step settings and is then a contender of its own, with its own runs, row and colour:
`aace:k=5` trains with `--sam_method aace --perturbation_interval 5` in `OUTPUT_DIR/aace-k5-seed{seed}`, `sam:f=0.5`
with `--sam_method sam --perturbation_batch_fraction 0.5` in `OUTPUT_DIR/sam-f0.5-seed{seed}`.

    python scripts/compare.py --dataset digits --methods sgd sam asam aace --seeds 0 1 2 --label_noise 0.2 \
        --output_dir outputs/compare --model wide_resnet --depth 16 --widen_factor 2
    python scripts/compare.py --dataset digits --methods sgd aace aace:k=5 aace:f=0.5 --output_dir outputs/cheaper
    python scripts/compare.py scripts/configs/paper_cifar100.json --launcher "accelerate launch --num_processes 8"
    python scripts/compare.py --summarize outputs/machine-a outputs/machine-b --output_dir outputs/merged

A rerun of the same command skips the runs that finished (their `all_results.json` and `run_arguments.json` exist) and
lets `train.py` resume an interrupted one from its last checkpoint.
"""

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on training machines
import matplotlib.pyplot as plt  # noqa: E402

from hf_aace.methods import METHODS  # noqa: E402
from hf_aace.training_args import (  # noqa: E402
    VARIANT_FORM,
    VARIANT_OPTIONS,
    method_variant_name,
    parse_method_variant,
)

TRAIN = Path(__file__).resolve().with_name("train.py")
# The paper's row order (the baseline first, the proposed method last), then any other method of the library's table.
METHOD_ORDER = ("sgd", "sam", "asam", "aace")
ALL_METHODS = tuple(name for name in METHOD_ORDER if name in METHODS) + tuple(
    name for name in METHODS if name not in METHOD_ORDER
)
DEFAULT_SEEDS = (0, 1, 2)
# train.py flags this script sets per run: the method's own from its variant (`aace:k=5`).
VARIANT_FLAGS = tuple(f"--{field_name}" for field_name, _ in VARIANT_OPTIONS.values())
RESERVED_FLAGS = ("--sam_method", *VARIANT_FLAGS, "--seed", "--output_dir", "--resume_from_checkpoint")
# run_arguments.json entries that must agree between runs for their accuracies to be comparable (not where the files
# came from, nor the batch split over processes). The method's own settings are compared within each method only.
SHARED_SETTINGS = {
    "model": ("model", "depth", "widen_factor", "alpha", "bottleneck", "dropout_rate"),
    "data": (
        "dataset",
        "coarse_labels",
        "image_size",
        "augment",
        "crop_padding",
        "flip",
        "cutout_size",
        "label_noise",
    ),
    "training": (
        "num_train_epochs",
        "max_steps",
        "learning_rate",
        "optim",
        "optim_args",
        "weight_decay",
        "weight_decay_all_parameters",
        "lr_scheduler_type",
        "lr_milestones",
        "lr_gamma",
        "warmup_steps",
        "warmup_ratio",
        "max_grad_norm",
        "label_smoothing_factor",
    ),
}
METHOD_SETTINGS = ("rho", "normalize_perturbation", "aace_threshold", "aace_mode")


def build_parser() -> argparse.ArgumentParser:
    default_rhos = ", ".join(
        f"{name} {METHODS[name].default_rho}"
        + (
            f" ({METHODS[name].own_architecture_defaults[0]} on hf_aace's models)"
            if METHODS[name].own_architecture_defaults
            else ""
        )
        for name in ALL_METHODS
        if METHODS[name].perturbs
    )
    parser = argparse.ArgumentParser(
        usage="%(prog)s [CONFIG.json] [options] [scripts/train.py flags]",
        description=__doc__.split("\n\n")[0] + " CONFIG.json, as the first argument, holds settings by name: "
        "methods, seeds, output_dir, launcher and any scripts/train.py flag; flags on the command line override it.",
        epilog="Every other flag goes to scripts/train.py for each run (e.g. --model wide_resnet --depth 16 "
        "--widen_factor 2 --dataset cifar100 --recipe paper --label_noise 0.2 --bf16). Leave --rho out to give each "
        f"method its own default ({default_rhos}); a --rho given here applies to all methods.",
        allow_abbrev=False,  # --seed must reach the check below rather than be read as --seeds
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        help=f"Methods to compare (default: {' '.join(ALL_METHODS)}). Each may carry cheaper-step settings and is "
        f"then compared as a method of its own: {VARIANT_FORM} (k: --perturbation_interval, f: "
        "--perturbation_batch_fraction).",
    )
    parser.add_argument(
        "--seeds",
        nargs="+",
        type=int,
        help="Seeds, one run per method and seed (default: 0 1 2; with --summarize: every seed found).",
    )
    parser.add_argument("--output_dir", help="Folder of the runs and of the comparison files.")
    parser.add_argument(
        "--launcher",
        help='Command that runs scripts/train.py, e.g. "accelerate launch --multi_gpu --num_processes 8" (default: '
        "this Python interpreter).",
    )
    parser.add_argument(
        "--summarize",
        nargs="+",
        metavar="DIR",
        help="Train nothing: merge the finished runs found in these output folders (e.g. from several machines) and "
        "write the comparison files into --output_dir.",
    )
    return parser


def config_flags(values: dict[str, Any]) -> list[str]:
    """Turns a JSON config's scripts/train.py settings into the flags HfArgumentParser reads."""
    flags = []
    for key, value in values.items():
        if value is None:
            continue
        if isinstance(value, bool):
            flags += [f"--{key}", str(value).lower()]
        elif isinstance(value, list):
            flags += [f"--{key}", *(str(item) for item in value)]
        elif isinstance(value, dict):
            flags += [f"--{key}", json.dumps(value)]
        else:
            flags += [f"--{key}", str(value)]
    return flags


def parse_arguments(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Splits the command line into this script's options and the flags for scripts/train.py."""
    parser = build_parser()
    config = argv[0] if argv and argv[0].endswith(".json") else None
    options, train_flags = parser.parse_known_args(argv[1:] if config else argv)
    if config is not None:
        with open(config) as file:
            values = json.load(file)
        own = {key: values.pop(key) for key in ("methods", "seeds", "output_dir", "launcher") if key in values}
        for key, value in own.items():
            if getattr(options, key) is None:
                setattr(options, key, value)
        train_flags = config_flags(values) + train_flags  # later flags win, so the command line overrides the file
    if options.output_dir is None:
        parser.error("--output_dir is required (the folder of the runs and of the comparison files).")
    unknown = [method for method in options.methods or () if method.split(":")[0] not in METHODS]
    if unknown:
        parser.error(
            f"unknown method {' '.join(unknown)}; --methods takes any of: {' '.join(ALL_METHODS)}, each with optional "
            f"cheaper-step settings: {VARIANT_FORM}."
        )
    if options.methods is not None:
        try:  # one name per contender, so that aace:f=0.5:k=5 and aace:k=5:f=0.5 are one method, aace:k=1 is aace
            options.methods = [method_variant_name(*parse_method_variant(method)) for method in options.methods]
        except ValueError as error:
            parser.error(f"--methods: {error}")
    for name, values in (("--methods", options.methods), ("--seeds", options.seeds)):
        if values is not None and len(set(values)) != len(values):
            parser.error(f"{name} lists a value twice: {' '.join(map(str, values))}.")
    reserved = sorted({flag.split("=")[0] for flag in train_flags if flag.split("=")[0] in RESERVED_FLAGS})
    if reserved:
        parser.error(
            f"{' '.join(reserved)} is set per run by this script: use --methods, --seeds and --output_dir (method "
            "variants such as aace:k=5 or sam:f=0.5 set the cheaper-step settings; a rerun resumes unfinished runs by "
            "itself)."
        )
    if options.summarize and train_flags:
        parser.error(f"--summarize trains nothing; remove the scripts/train.py flags {' '.join(train_flags)}.")
    return options, train_flags


def train_runs(
    output_dir: Path, methods: list[str], seeds: list[int], train_flags: list[str], launcher: str | None
) -> None:
    """Runs scripts/train.py once per method and seed, skipping finished runs; stops at the first failure."""
    command_start = shlex.split(launcher) if launcher else [sys.executable]
    for method in methods:
        name, settings = parse_method_variant(method)
        method_flags = ["--sam_method", name]
        for field_name, value in settings.items():
            method_flags += [f"--{field_name}", str(value)]
        for seed in seeds:
            run_dir = output_dir / run_folder_name(method, seed)
            if is_finished(run_dir):
                print(f"{run_dir.name}: finished earlier, skipped")
                continue
            command = [*command_start, str(TRAIN), *train_flags]
            command += [*method_flags, "--seed", str(seed), "--output_dir", str(run_dir)]
            run_dir.mkdir(parents=True, exist_ok=True)
            log_path = run_dir / "train.log"
            print(f"{run_dir.name}: training (log: {log_path})", flush=True)
            start = time.perf_counter()
            with open(log_path, "a") as log:
                log.write(f"$ {shlex.join(command)}\n")
                log.flush()
                returncode = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT).returncode
            if returncode != 0:
                tail = "".join(log_path.read_text().splitlines(keepends=True)[-20:])
                raise SystemExit(
                    f"{run_dir.name} failed (exit status {returncode}). Last lines of {log_path}:\n{tail}\n"
                    "Fix the cause and rerun the same command: finished runs are skipped and this one resumes from "
                    "its last checkpoint."
                )
            accuracy = json.loads((run_dir / "all_results.json").read_text())["test_accuracy"]
            print(f"{run_dir.name}: test accuracy {accuracy:.4f} ({time.perf_counter() - start:.0f} s)", flush=True)


def run_folder_name(method: str, seed: int) -> str:
    """The run's folder: "aace-seed0", "aace-k5-seed0" for aace:k=5 (no ":", which Windows refuses in file names,
    nor "=")."""
    return f"{method.replace(':', '-').replace('=', '')}-seed{seed}"


def display_name(method: str) -> str:
    """How tables and plots name a method: "AACE", "AACE:k=5"."""
    name, separator, options = method.partition(":")
    return name.upper() + separator + options


def is_finished(run_dir: Path) -> bool:
    """Whether scripts/train.py completed in run_dir: it writes run_arguments.json after all metrics."""
    return (run_dir / "all_results.json").is_file() and (run_dir / "run_arguments.json").is_file()


def collect_runs(folders: list[Path]) -> list[dict[str, Any]]:
    """Reads every finished run (a subfolder with all_results.json and run_arguments.json) of the given folders."""
    runs = []
    for folder in folders:
        found = sorted(path for path in folder.iterdir() if is_finished(path)) if folder.is_dir() else []
        if not found:
            raise ValueError(
                f"{folder} holds no finished runs (subfolders with all_results.json and run_arguments.json); pass the "
                "--output_dir of a comparison."
            )
        for run_dir in found:
            arguments = json.loads((run_dir / "run_arguments.json").read_text())
            results = json.loads((run_dir / "all_results.json").read_text())
            history = json.loads((run_dir / "trainer_state.json").read_text())["log_history"]
            runs.append(
                {
                    # Runs older than the cheaper-step settings lack them: their defaults, the plain method.
                    "method": method_variant_name(arguments["training"]["sam_method"], arguments["training"]),
                    "seed": arguments["training"]["seed"],
                    "test_accuracy": results["test_accuracy"],
                    "test_top5_accuracy": results.get("test_top5_accuracy"),
                    "test_loss": results.get("test_loss"),
                    "train_runtime": results.get("train_runtime"),
                    "output_dir": str(run_dir),
                    "arguments": arguments,
                    "curve": [(e["epoch"], e["eval_accuracy"]) for e in history if "eval_accuracy" in e],
                }
            )
    return runs


def methods_found(runs: list[dict[str, Any]]) -> list[str]:
    """Every method the runs hold, in the order of `ALL_METHODS`, each method's variants after it by name."""
    names = {run["method"] for run in runs}
    return sorted(names, key=lambda name: (ALL_METHODS.index(parse_method_variant(name)[0]), ":" in name, name))


def select_runs(runs: list[dict[str, Any]], methods: list[str], seeds: list[int] | None) -> list[dict[str, Any]]:
    """Keeps the runs of the given methods (and seeds), in method order, then seed order; refuses duplicates."""
    selected = sorted(
        (run for run in runs if run["method"] in methods and (seeds is None or run["seed"] in seeds)),
        key=lambda run: (methods.index(run["method"]), run["seed"]),
    )
    if not selected:
        raise ValueError(f"No finished runs of the methods {' '.join(methods)} were found.")
    for first, second in zip(selected, selected[1:]):
        if (first["method"], first["seed"]) == (second["method"], second["seed"]):
            raise ValueError(
                f"Two runs of {first['method']} with seed {first['seed']}: {first['output_dir']} and "
                f"{second['output_dir']}. Merge folders that hold different seeds or methods, or remove one run."
            )
    return selected


def shared_settings(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The settings all runs share, plus each method's own; refuses runs trained under different settings."""
    settings: dict[str, Any] = {}
    for section, keys in SHARED_SETTINGS.items():
        for key in keys:
            values = {json.dumps(run["arguments"][section].get(key)) for run in runs}
            if len(values) > 1:
                raise ValueError(
                    f"The runs differ in {key} ({', '.join(sorted(values))}), so their accuracies are not "
                    "comparable; compare runs trained with the same settings."
                )
            value = runs[0]["arguments"][section].get(key)
            if value is not None:
                settings[key] = value
    # The same label_noise on the same training split gives the same rate (runs older than the option: none).
    settings["train_label_noise_rate"] = runs[0]["arguments"].get("label_noise", {}).get("rate", 0.0)
    settings["recipe"] = runs[0]["arguments"].get("recipe")
    log_path = Path(runs[0]["output_dir"]) / "train.log"
    if log_path.is_file():  # the exact scripts/train.py command, as this script launched it
        settings["first_run_command"] = log_path.read_text().splitlines()[0].removeprefix("$ ")
    per_method: dict[str, dict[str, Any]] = {}
    for run in runs:
        own = method_settings(run["method"], run["arguments"]["training"])
        if per_method.setdefault(run["method"], own) != own:
            raise ValueError(
                f"The {run['method']} runs differ in {', '.join(METHOD_SETTINGS)}: {per_method[run['method']]} vs "
                f"{own} ({run['output_dir']}); compare runs trained with the same settings."
            )
    settings["method_settings"] = per_method
    return settings


def method_settings(method: str, training: dict[str, Any]) -> dict[str, Any]:
    """A run's perturbation settings, with the method's defaults filled in where the run left them unset."""
    entry = METHODS[parse_method_variant(method)[0]]
    if not entry.perturbs:
        return {}
    own = {key: training.get(key) for key in METHOD_SETTINGS}
    if own["rho"] is None:
        own["rho"] = entry.default_rho
    if own["normalize_perturbation"] is None:
        own["normalize_perturbation"] = entry.default_normalize
    if entry.perturbation_loss != "aace":  # the AACE options act on the AACE loss only
        del own["aace_threshold"], own["aace_mode"]
    return own


def summarize(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Mean and sample standard deviation (n - 1) of the test accuracy per method; std is None for a single seed."""
    summary = {}
    for run in runs:
        summary.setdefault(run["method"], []).append(run["test_accuracy"])
    return {
        method: {
            "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else None,
            "n": len(values),
        }
        for method, values in summary.items()
    }


def markdown(runs: list[dict[str, Any]], summary: dict[str, dict[str, Any]], settings: dict[str, Any]) -> str:
    """The comparison as a paper-style table: test accuracy in %, mean ± std over seeds, best mean in bold."""
    best = max(entry["mean"] for entry in summary.values())
    rows = []
    for method, entry in summary.items():
        cell = f"{100 * entry['mean']:.2f}" + (f" ± {100 * entry['std']:.2f}" if entry["std"] is not None else "")
        if entry["mean"] == best:
            cell = f"**{cell}**"
        per_seed = ", ".join(
            f"{run['seed']}: {100 * run['test_accuracy']:.2f}" for run in runs if run["method"] == method
        )
        rows.append(f"| {display_name(method)} | {cell} | {entry['n']} | {per_seed} |")
    model = ", ".join(
        f"{key} {settings[key]}" for key in SHARED_SETTINGS["model"] if key in settings and key != "model"
    )
    noise = settings.get("label_noise") or 0.0
    lines = [
        f"# Method comparison on {settings['dataset']}",
        "",
        f"Model {settings['model']}{f' ({model})' if model else ''}; training-label noise {100 * noise:g}% "
        f"({settings['train_label_noise_rate']:.2%} of the training labels changed); test accuracy in %, mean ± "
        "sample standard deviation (n - 1) over seeds; the best mean in bold.",
        "",
        "| method | test accuracy (%) | seeds | per seed (seed: accuracy) |",
        "|---|---:|---:|---|",
        *rows,
        "",
        "Settings shared by all runs:",
        "",
        *(
            f"- `{key}`: {json.dumps(value)}"
            for key, value in settings.items()
            if key not in ("method_settings", "command", "first_run_command")
        ),
        *(
            f"- {display_name(method)}: {json.dumps(own)}"
            for method, own in settings["method_settings"].items()
            if own
        ),
        "",
        "Command:",
        "",
        "```bash",
        settings["command"],
        "```",
        "",
    ]
    if "first_run_command" in settings:
        lines += ["First run's scripts/train.py command:", "", "```bash", settings["first_run_command"], "```", ""]
    return "\n".join(lines)


def plot(runs: list[dict[str, Any]], summary: dict[str, dict[str, Any]], path: Path, title: str) -> None:
    """Left: test accuracy per method, one point per seed, the mean as a bar; right: test accuracy during training."""
    figure, (left, right) = plt.subplots(1, 2, figsize=(11.0, 4.2))
    colours = {method: f"C{index}" for index, method in enumerate(summary)}
    for index, (method, entry) in enumerate(summary.items()):
        values = [100 * run["test_accuracy"] for run in runs if run["method"] == method]
        offsets = [0.0] if len(values) == 1 else [0.2 * (i / (len(values) - 1) - 0.5) for i in range(len(values))]
        left.scatter([index + offset for offset in offsets], values, color=colours[method], zorder=3, label=None)
        left.hlines(100 * entry["mean"], index - 0.3, index + 0.3, color=colours[method], linewidth=2.5)
    left.set_xticks(range(len(summary)), [display_name(method) for method in summary])
    left.set(title="Test accuracy per seed (bar: mean)", ylabel="test accuracy (%)")
    left.grid(axis="y", alpha=0.3)
    labelled = set()
    for run in runs:
        if not run["curve"]:
            continue
        epochs, accuracies = zip(*run["curve"])
        label = None if run["method"] in labelled else display_name(run["method"])
        labelled.add(run["method"])
        right.plot(epochs, [100 * value for value in accuracies], color=colours[run["method"]], alpha=0.7, label=label)
    right.set(title="Test accuracy during training (one line per run)", xlabel="epoch", ylabel="test accuracy (%)")
    right.grid(alpha=0.3)
    if labelled:
        right.legend()
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_comparison(runs: list[dict[str, Any]], output_dir: Path, command: str) -> dict[str, Any]:
    """Writes comparison.json, comparison.md and comparison.png into output_dir and returns the JSON's content."""
    settings = {**shared_settings(runs), "command": command}
    summary = summarize(runs)
    comparison = {
        "runs": [{key: value for key, value in run.items() if key not in ("arguments", "curve")} for run in runs],
        "summary": summary,
        "settings": settings,
    }
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "comparison.json").write_text(json.dumps(comparison, indent=2) + "\n")
    (output_dir / "comparison.md").write_text(markdown(runs, summary, settings))
    noise = settings.get("label_noise") or 0.0
    plot(runs, summary, output_dir / "comparison.png", f"{settings['dataset']}, label noise {100 * noise:g}%")
    return comparison


def main(argv: list[str]) -> int:
    options, train_flags = parse_arguments(argv)
    output_dir = Path(options.output_dir)
    command = shlex.join(["python", "scripts/compare.py", *argv])
    if options.summarize:
        found = collect_runs([Path(folder) for folder in options.summarize])
        runs = select_runs(found, options.methods or methods_found(found), options.seeds)
    else:
        methods, seeds = options.methods or list(ALL_METHODS), options.seeds or list(DEFAULT_SEEDS)
        train_runs(output_dir, methods, seeds, train_flags, options.launcher)
        runs = select_runs(collect_runs([output_dir]), methods, seeds)
    comparison = write_comparison(runs, output_dir, command)
    width = max(len(method) for method in comparison["summary"])
    for method, entry in comparison["summary"].items():
        spread = f" ± {100 * entry['std']:.2f}" if entry["std"] is not None else ""
        print(f"{display_name(method):>{width}}: {100 * entry['mean']:.2f}{spread} % test accuracy (n = {entry['n']})")
    print(f"comparison.json, comparison.md and comparison.png are in {output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
