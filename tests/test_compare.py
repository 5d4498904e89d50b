"""End-to-end tests of scripts/compare.py: real scripts/train.py runs per method and seed, then the comparison."""

import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from test_scripts import QUICK, ROOT, TRAIN, load_train_module

from hf_aace.methods import METHODS

COMPARE = ROOT / "scripts" / "compare.py"
NOISE = 0.2
DIGITS_TRAIN = 1437


def load_compare_module():
    spec = importlib.util.spec_from_file_location("compare_script", COMPARE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


compare = load_compare_module()


def compare_arguments(output: Path, seed: int, cache: Path) -> list[str]:
    return [
        "--methods", "sgd", "aace", "--seeds", str(seed), "--output_dir", str(output), *QUICK, "--optim", "sgd",
        "--max_steps", "4", "--eval_strategy", "steps", "--eval_steps", "2", "--per_device_eval_batch_size", "360",
        "--save_strategy", "no", "--eval_train_split", "false", "--report_to", "none",
        "--label_noise", str(NOISE), "--cache_dir", str(cache),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """Two comparisons of sgd and aace, seed 0 in one folder and seed 1 in another, run side by side.

    Seed 0 runs through the command line; seed 1 through `main` in this process meanwhile (it still launches
    scripts/train.py per run), which saves one start of the script.
    """
    root = tmp_path_factory.mktemp("compare")
    cache = root / "cache"
    folders = {seed: root / f"seed{seed}" for seed in (0, 1)}
    # Two trainings side by side: one thread each, so that neither waits on the other's spinning threads.
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    command_line = subprocess.Popen(
        [sys.executable, str(COMPARE), *compare_arguments(folders[0], 0, cache)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environment,
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        assert compare.main(compare_arguments(folders[1], 1, cache)) == 0
    stdout, stderr = command_line.communicate(timeout=600)
    assert command_line.returncode == 0, stderr[-4000:]
    return folders, cache, stdout


def test_each_run_is_a_full_training_run_on_noisy_labels(compared):
    folders, _, stdout = compared
    assert "sgd-seed0: training" in stdout and "aace-seed0: test accuracy" in stdout
    for seed, folder in folders.items():
        for method in ("sgd", "aace"):
            run = folder / f"{method}-seed{seed}"
            for name in ("model.safetensors", "README.md", "all_results.json", "trainer_state.json", "train.log"):
                assert (run / name).is_file(), run / name
            assert (run / "plots" / "accuracy.png").is_file()
            arguments = json.loads((run / "run_arguments.json").read_text())
            assert arguments["training"]["sam_method"] == method and arguments["training"]["seed"] == seed
            assert arguments["data"]["label_noise"] == NOISE
            rate = round(NOISE * DIGITS_TRAIN) / DIGITS_TRAIN
            assert arguments["label_noise"] == {"rate": rate, "corrupted": round(NOISE * DIGITS_TRAIN), "seed": seed}
            assert json.loads((run / "all_results.json").read_text())["train_label_noise_rate"] == rate
            assert (
                f"Label noise: 287 of {DIGITS_TRAIN} training labels replaced (seed {seed})"
                in (run / "train.log").read_text()
            )


def test_comparison_files_agree_with_the_runs(compared):
    folders, _, _ = compared
    folder = folders[0]
    comparison = json.loads((folder / "comparison.json").read_text())
    assert [(run["method"], run["seed"]) for run in comparison["runs"]] == [("sgd", 0), ("aace", 0)]
    for run in comparison["runs"]:
        results = json.loads((Path(run["output_dir"]) / "all_results.json").read_text())
        assert Path(run["output_dir"]) == folder / f"{run['method']}-seed0"
        for key in ("test_accuracy", "test_top5_accuracy", "test_loss", "train_runtime"):
            assert run[key] == results[key], key
        assert comparison["summary"][run["method"]] == {"mean": results["test_accuracy"], "std": None, "n": 1}
    settings = comparison["settings"]
    assert settings["dataset"] == "digits" and settings["depth"] == 10 and settings["label_noise"] == NOISE
    assert settings["train_label_noise_rate"] == round(NOISE * DIGITS_TRAIN) / DIGITS_TRAIN
    assert settings["method_settings"] == {
        "sgd": {},
        "aace": {"rho": 0.2, "normalize_perturbation": False, "aace_threshold": 0.0, "aace_mode": "adaptive"},
    }
    assert settings["command"].startswith("python scripts/compare.py --methods sgd aace --seeds 0")
    assert settings["first_run_command"].endswith(f"--sam_method sgd --seed 0 --output_dir {folder / 'sgd-seed0'}")
    table = (folder / "comparison.md").read_text()
    assert "| SGD |" in table and "| AACE |" in table and "label noise 20%" in table
    assert (folder / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_summarize_merges_folders_into_mean_and_sample_std(compared, tmp_path):
    folders, _, _ = compared
    merged = tmp_path / "merged"
    assert compare.main(["--summarize", str(folders[0]), str(folders[1]), "--output_dir", str(merged)]) == 0
    comparison = json.loads((merged / "comparison.json").read_text())
    keys = [(run["method"], run["seed"]) for run in comparison["runs"]]
    assert keys == [("sgd", 0), ("sgd", 1), ("aace", 0), ("aace", 1)]
    for method in ("sgd", "aace"):
        accuracies = [
            json.loads((folders[seed] / f"{method}-seed{seed}" / "all_results.json").read_text())["test_accuracy"]
            for seed in (0, 1)
        ]
        summary = comparison["summary"][method]
        assert summary["n"] == 2
        assert summary["mean"] == pytest.approx(sum(accuracies) / 2)
        assert summary["std"] == pytest.approx(abs(accuracies[0] - accuracies[1]) / 2**0.5)  # ddof=1
    assert (merged / "comparison.png").is_file() and (merged / "comparison.md").is_file()


def test_summary_statistics_and_table_on_known_accuracies(compared, tmp_path):
    folders, _, _ = compared
    known = {("sgd", 0): 0.5, ("sgd", 1): 0.7, ("aace", 0): 0.9, ("aace", 1): 0.8}
    for seed, folder in folders.items():
        shutil.copytree(folder, tmp_path / folder.name, ignore=shutil.ignore_patterns("comparison.*"))
        for method in ("sgd", "aace"):
            results_path = tmp_path / folder.name / f"{method}-seed{seed}" / "all_results.json"
            results = json.loads(results_path.read_text())
            results_path.write_text(json.dumps({**results, "test_accuracy": known[method, seed]}))
    output = tmp_path / "out"
    compare.main(["--summarize", str(tmp_path / "seed0"), str(tmp_path / "seed1"), "--output_dir", str(output)])
    summary = json.loads((output / "comparison.json").read_text())["summary"]
    assert summary["sgd"]["mean"] == pytest.approx(0.6) and summary["aace"]["mean"] == pytest.approx(0.85)
    assert summary["sgd"]["std"] == pytest.approx(statistics.stdev([0.5, 0.7])) == pytest.approx(0.141421356)
    assert summary["aace"]["std"] == pytest.approx(0.0707106781)
    table = (output / "comparison.md").read_text()
    assert "| SGD | 60.00 ± 14.14 | 2 | 0: 50.00, 1: 70.00 |" in table
    assert "| AACE | **85.00 ± 7.07** | 2 | 0: 90.00, 1: 80.00 |" in table

    # --methods chooses and orders the methods of the summary.
    compare.main(["--summarize", str(tmp_path / "seed0"), "--methods", "aace", "--output_dir", str(output)])
    comparison = json.loads((output / "comparison.json").read_text())
    assert list(comparison["summary"]) == ["aace"] and comparison["summary"]["aace"]["std"] is None


def test_rerun_skips_finished_runs(compared, capsys):
    folders, cache, _ = compared
    models = sorted(folders[0].glob("*/model.safetensors"))
    before = [path.stat().st_mtime_ns for path in models]
    (folders[0] / "comparison.json").unlink()
    assert compare.main(compare_arguments(folders[0], 0, cache)) == 0
    printed = capsys.readouterr().out
    assert "sgd-seed0: finished earlier, skipped" in printed and "aace-seed0: finished earlier, skipped" in printed
    assert [path.stat().st_mtime_ns for path in models] == before
    assert (folders[0] / "comparison.json").is_file()


def test_unfinished_run_is_launched_again_with_the_launcher_and_failures_stop(compared, tmp_path):
    folders, cache, _ = compared
    folder = tmp_path / "seed0"
    shutil.copytree(folders[0], folder)
    (folder / "aace-seed0" / "run_arguments.json").unlink()  # interrupted after its metrics, before the end
    launcher = f"{sys.executable} -c 'import sys; print(\"launched\", *sys.argv[1:]); sys.exit(3)'"
    with pytest.raises(
        SystemExit, match=r"aace-seed0 failed \(exit status 3\)[\s\S]*resumes from its last checkpoint"
    ):
        compare.main([*compare_arguments(folder, 0, cache), "--launcher", launcher])
    log = (folder / "aace-seed0" / "train.log").read_text()
    launched = [line for line in log.splitlines() if line.startswith("launched")]
    assert len(launched) == 1 and launched[0].startswith(f"launched {TRAIN} ")
    assert "--methods" not in launched[0] and "--seeds" not in launched[0]  # compare's own options stay with it
    assert (
        "--label_noise 0.2" in launched[0]
        and f"--sam_method aace --seed 0 --output_dir {folder / 'aace-seed0'}" in launched[0]
    )
    assert not (folder / "sgd-seed0" / "train.log").read_text().count("launched")


def test_summarize_refuses_duplicate_runs_and_different_settings(compared, tmp_path):
    folders, _, _ = compared
    with pytest.raises(ValueError, match="Two runs of sgd with seed 0"):
        compare.main(["--summarize", str(folders[0]), str(folders[0]), "--output_dir", str(tmp_path / "out")])
    other = tmp_path / "other"
    shutil.copytree(folders[1], other)
    arguments_path = other / "aace-seed1" / "run_arguments.json"
    arguments = json.loads(arguments_path.read_text())
    arguments["data"]["label_noise"] = 0.4
    arguments_path.write_text(json.dumps(arguments))
    with pytest.raises(ValueError, match=r"differ in label_noise \(0\.2, 0\.4\)"):
        compare.main(["--summarize", str(folders[0]), str(other), "--output_dir", str(tmp_path / "out")])
    with pytest.raises(ValueError, match="holds no finished runs"):
        compare.main(["--summarize", str(tmp_path), "--output_dir", str(tmp_path / "out")])


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--methods", "sgd", "adamw"], "unknown method adamw; --methods takes any of: sgd sam asam aace"),
        (["--seed", "3"], "--seed is set per run by this script: use --methods, --seeds and --output_dir"),
        (["--sam_method=sam"], "--sam_method is set per run"),
        (["--seeds", "0", "0"], "--seeds lists a value twice"),
        (["--summarize", "a", "--depth", "16"], "--summarize trains nothing; remove the scripts/train.py flags"),
    ],
)
def test_bad_options_are_refused_with_the_fix(arguments, message, capsys):
    with pytest.raises(SystemExit):
        compare.parse_arguments([*arguments, "--output_dir", "out"])
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "method, message",
    [
        ("aace:k=0", "'aace:k=0': --perturbation_interval must be a whole number of optimizer steps >= 1"),
        ("aace:k=1.5", "'aace:k=1.5': k takes a whole number; write METHOD[:k=INTERVAL][:f=FRACTION][:r=1]"),
        ("sam:f=1.5", "'sam:f=1.5': --perturbation_batch_fraction must lie in (0, 1]"),
        ("aace:x=5", "'aace:x=5' is not a method variant; write METHOD[:k=INTERVAL][:f=FRACTION][:r=1], e.g."),
        ("aace:k=5:r=2", "'aace:k=5:r=2': r takes 0 or 1"),
        ("aace:r=1", "'aace:r=1': --perturbation_reuse reuses a perturbation between two-pass steps"),
        ("aace:k=5:k=2", "'aace:k=5:k=2' gives k twice"),
        ("sgd:k=5", "'sgd:k=5': sgd takes no first pass, so k, f and r do not apply"),
        ("adamw:k=5", "unknown method adamw:k=5; --methods takes any of: sgd sam asam aace, each with optional"),
    ],
)
def test_bad_method_variants_are_refused_with_the_accepted_form(method, message, capsys):
    with pytest.raises(SystemExit):
        compare.parse_arguments(["--methods", "sgd", method, "--output_dir", "out"])
    assert message in capsys.readouterr().err


def test_method_variants_get_one_name_each_and_their_flags_are_set_per_method(capsys):
    options, _ = compare.parse_arguments(["--methods", "sam", "aace:f=0.5:k=5", "aace:k=1", "--output_dir", "out"])
    assert options.methods == ["sam", "aace:k=5:f=0.5", "aace"]
    with pytest.raises(SystemExit):
        compare.parse_arguments(["--methods", "aace", "aace:k=1", "--output_dir", "out"])
    assert "--methods lists a value twice: aace aace" in capsys.readouterr().err
    for flag in ("--perturbation_interval", "--perturbation_batch_fraction=0.5"):
        with pytest.raises(SystemExit):
            compare.parse_arguments(["--methods", "aace", flag, "5", "--output_dir", "out"])
        assert (
            "is set per run by this script: use --methods, --seeds and --output_dir (method variants such as "
            "aace:k=5" in capsys.readouterr().err
        )


# Stands in for scripts/train.py: writes the files of a finished run, with a test accuracy per (sam_method,
# perturbation_interval, perturbation_batch_fraction) and seed, so that the comparison of variants is checked without
# training.
FAKE_ACCURACY = {("sgd", 1, 1.0): 0.90, ("aace", 1, 1.0): 0.80, ("aace", 5, 1.0): 0.86, ("aace", 1, 0.5): 0.82}
FAKE_TRAIN = f"""
import json, sys
from pathlib import Path
flags = dict(zip(sys.argv[2::2], sys.argv[3::2]))
training = {{"sam_method": flags["--sam_method"], "seed": int(flags["--seed"]),
            "perturbation_interval": int(flags.get("--perturbation_interval", 1)),
            "perturbation_batch_fraction": float(flags.get("--perturbation_batch_fraction", 1.0))}}
key = training["sam_method"], training["perturbation_interval"], training["perturbation_batch_fraction"]
accuracy = {FAKE_ACCURACY!r}[key]
accuracy -= 0.02 * training["seed"]
run = Path(flags["--output_dir"])
arguments = {{"model": {{"model": "wrn-10-1"}}, "data": {{"dataset": "digits", "label_noise": 0.2}},
             "training": training}}
(run / "all_results.json").write_text(json.dumps({{"test_accuracy": accuracy}}))
(run / "trainer_state.json").write_text(json.dumps({{"log_history": [{{"epoch": 1.0, "eval_accuracy": accuracy}}]}}))
(run / "run_arguments.json").write_text(json.dumps(arguments))
"""


def test_method_variants_train_and_are_summarised_as_methods_of_their_own(tmp_path, capsys):
    fake = tmp_path / "fake_train.py"
    fake.write_text(FAKE_TRAIN)
    output = tmp_path / "out"
    methods = ["sgd", "aace", "aace:k=5", "aace:f=0.5"]
    arguments = ["--methods", *methods, "--seeds", "0", "1", "--output_dir", str(output), "--label_noise", "0.2"]
    assert compare.main([*arguments, "--launcher", f"{sys.executable} {fake}"]) == 0

    folders = {"sgd": "sgd", "aace": "aace", "aace:k=5": "aace-k5", "aace:f=0.5": "aace-f0.5"}
    flags = {"sgd": "sgd", "aace": "aace", "aace:k=5": "aace --perturbation_interval 5"}
    flags["aace:f=0.5"] = "aace --perturbation_batch_fraction 0.5"
    for method, folder in folders.items():
        command = (output / f"{folder}-seed1" / "train.log").read_text()
        assert command.endswith(f"--sam_method {flags[method]} --seed 1 --output_dir {output / f'{folder}-seed1'}\n")
        assert "--label_noise 0.2" in command
    train = load_train_module()
    *_, args = train.parse_arguments(command.split()[4:])  # the real scripts/train.py reads the variant's flags
    assert (args.sam_method, args.perturbation_batch_fraction, args.perturbation_interval) == ("aace", 0.5, 1)

    comparison = json.loads((output / "comparison.json").read_text())
    assert list(comparison["summary"]) == methods
    assert [run["method"] for run in comparison["runs"]] == [method for method in methods for _ in (0, 1)]
    table = (output / "comparison.md").read_text()
    assert "| SGD | **89.00 ± 1.41** | 2 | 0: 90.00, 1: 88.00 |" in table
    assert "| AACE | 79.00 ± 1.41 | 2 | 0: 80.00, 1: 78.00 |" in table
    assert "| AACE:k=5 | 85.00 ± 1.41 | 2 | 0: 86.00, 1: 84.00 |" in table
    assert "| AACE:f=0.5 | 81.00 ± 1.41 | 2 | 0: 82.00, 1: 80.00 |" in table
    printed = capsys.readouterr().out
    assert "aace-k5-seed0: test accuracy 0.8600" in printed and "  AACE:k=5: 85.00 ± 1.41 % test accuracy" in printed

    # A rerun skips the variants' finished runs, and --summarize finds them without --methods, each after its method.
    assert compare.main([*arguments, "--launcher", "false"]) == 0
    assert "aace-f0.5-seed1: finished earlier, skipped" in capsys.readouterr().out
    assert compare.main(["--summarize", str(output), "--output_dir", str(tmp_path / "merged")]) == 0
    merged = json.loads((tmp_path / "merged" / "comparison.json").read_text())
    assert list(merged["summary"]) == ["sgd", "aace", "aace:f=0.5", "aace:k=5"]
    assert merged["summary"]["aace:k=5"] == comparison["summary"]["aace:k=5"]


def test_every_method_of_the_library_can_be_compared():
    assert compare.ALL_METHODS[:4] == ("sgd", "sam", "asam", "aace")
    assert set(compare.ALL_METHODS) == set(METHODS)


def test_paper_cifar100_config_gives_the_paper_runs(tmp_path):
    config = ROOT / "scripts" / "configs" / "paper_cifar100.json"
    options, flags = compare.parse_arguments([str(config), "--seeds", "5"])
    assert options.methods == ["sgd", "sam", "asam", "aace"] and options.seeds == [5]  # the command line wins
    assert flags[flags.index("--bf16") + 1] == "true"
    train = load_train_module()
    model_args, data_args, recipe, args = train.parse_arguments(
        [*flags, "--bf16", "false", "--sam_method", "sam", "--seed", "5", "--output_dir", str(tmp_path)]
    )  # bf16 off: this machine has no GPU
    assert recipe.recipe == "paper" and data_args.dataset == "cifar100"
    assert (model_args.model, model_args.depth, model_args.widen_factor) == ("wide_resnet", 28, 10)
    assert args.per_device_train_batch_size == 256 and args.num_train_epochs == 200 and args.learning_rate == 0.1
    assert args.sam_method == "sam" and args.seed == 5 and args.perturbation_for() == (0.05, True)
