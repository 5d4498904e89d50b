"""End-to-end tests of scripts/train.py and scripts/evaluate.py, with the Hub served on 127.0.0.1."""

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import datasets
import numpy as np
import pytest
import yaml
from launch import two_process_launch
from transformers import HfArgumentParser

from hf_aace.models.architectures import ARCHITECTURES

from hub_datasets import encode, write_hub_dataset
from local_hub import dead_endpoint

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "scripts" / "train.py"
EVALUATE = ROOT / "scripts" / "evaluate.py"
# A short name and no optimizer flags: the run also shows the from-scratch defaults of the architecture table.
QUICK = [
    "--model", "wrn-10-1", "--dataset", "digits", "--per_device_train_batch_size", "64", "--use_cpu",
    "--disable_tqdm", "true", "--logging_steps", "1",
]  # fmt: skip


def load_train_module():
    spec = importlib.util.spec_from_file_location("train_script", TRAIN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(script: Path, *args: str, env: dict | None = None, cache: Path | None = None) -> subprocess.CompletedProcess:
    environment = {**os.environ, **(env or {})}
    extra = ["--cache_dir", str(cache)] if cache is not None else []
    return subprocess.run(
        [sys.executable, str(script), *args, *extra], capture_output=True, text=True, env=environment, timeout=600
    )


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """One short training run shared by the output checks below."""
    output = tmp_path_factory.mktemp("run") / "out"
    cache = tmp_path_factory.mktemp("cache")
    result = run(TRAIN, *QUICK, "--max_steps", "6", "--eval_strategy", "steps", "--eval_steps", "3",
                 "--save_steps", "3", "--output_dir", str(output), cache=cache)  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    return output, cache, result


def test_run_writes_a_complete_publishable_model(trained_run):
    output, _, result = trained_run
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "modeling_wide_resnet.py",
                 "configuration_wide_resnet.py", "image_processing_aace.py", "all_results.json", "run_arguments.json",
                 "README.md", "trainer_state.json"):  # fmt: skip
        assert (output / name).is_file(), name
    assert sorted(p.name for p in (output / "plots").glob("*.png")) == [
        "accuracy.png",
        "losses.png",
        "perturbation.png",
    ]
    assert list((output / "runs").rglob("events.out.tfevents.*")), "no TensorBoard logs"
    assert (output / "checkpoint-6" / "augmentation_state_0.pth").is_file()

    results = json.loads((output / "all_results.json").read_text())
    for key in ("test_accuracy", "test_top5_accuracy", "test_loss", "train_eval_accuracy", "train_eval_top5_accuracy",
                "train_eval_loss", "train_loss"):  # fmt: skip
        assert key in results, key
    assert f"Test accuracy: {results['test_accuracy']:.4f}" in result.stdout

    arguments = json.loads((output / "run_arguments.json").read_text())
    assert arguments["model"]["depth"] == 10 and arguments["training"]["sam_method"] == "aace"
    assert arguments["model"]["model"] == "wrn-10-1" and arguments["model"]["widen_factor"] == 1
    training = arguments["training"]
    assert (training["optim"], training["learning_rate"], training["optim_args"]) == ("sgd", 0.1, "momentum=0.9")
    assert training["lr_milestones"] == [0.3, 0.6, 0.8] and training["weight_decay"] == 5e-4
    assert "Training wrn-10-1 from scratch: the paper's optimizer and schedule are the defaults" in result.stderr

    card = (output / "README.md").read_text()
    metadata = yaml.safe_load(card.split("---")[1])
    assert metadata["library_name"] == "transformers" and metadata["pipeline_tag"] == "image-classification"
    assert {"sam", "aace"} <= set(metadata["tags"])
    measured = metadata["model-index"][0]["results"][0]["metrics"][0]
    assert measured["type"] == "accuracy" and measured["value"] == pytest.approx(results["test_accuracy"])
    assert "trust_remote_code=True" in card and "Ratchatorn" in card and '"rho": 0.2' in card
    assert "AACE-SAM" in card
    for plot in ("accuracy", "losses", "perturbation"):  # the card shows the uploaded training curves
        assert f"![{plot}](plots/{plot}.png)" in card and (output / "plots" / f"{plot}.png").is_file()


def test_logged_metrics_include_the_perturbation(trained_run):
    output, _, _ = trained_run
    history = json.loads((output / "trainer_state.json").read_text())["log_history"]
    logged = [entry for entry in history if "loss" in entry]
    assert len(logged) == 6
    for key in ("perturbation_loss", "perturbation_grad_norm", "perturbation_norm", "clean_loss", "clean_accuracy"):
        assert all(key in entry for entry in logged), key
    assert [e["eval_accuracy"] for e in history if "eval_accuracy" in e]


def test_rerun_resumes_from_the_last_checkpoint(trained_run, tmp_path):
    output, cache, _ = trained_run
    copy = tmp_path / "out"
    subprocess.run(["cp", "-r", str(output), str(copy)], check=True)
    result = run(TRAIN, *QUICK, "--max_steps", "8", "--save_steps", "3", "--eval_strategy", "no",
                 "--output_dir", str(copy), cache=cache)  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Resuming from" in result.stderr and "checkpoint-6" in result.stderr
    history = json.loads((copy / "trainer_state.json").read_text())["log_history"]
    steps = [entry["step"] for entry in history if "loss" in entry]
    assert steps[-2:] == [7, 8] and steps.count(7) == 1


def test_evaluate_script_reproduces_the_training_test_metrics(trained_run):
    output, cache, _ = trained_run
    results = json.loads((output / "all_results.json").read_text())
    result = run(EVALUATE, "--model", str(output), "--dataset", "digits", "--use_cpu", cache=cache)
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"accuracy       {results['test_accuracy']:.4f}" in result.stdout
    assert f"loss           {results['test_loss']:.4f}" in result.stdout


def test_paper_recipe_and_explicit_flags_override_it(tmp_path):
    train = load_train_module()
    model_args, _, recipe, args = train.parse_arguments(
        ["--recipe", "paper", "--model", "pyramidnet", "--output_dir", str(tmp_path), "--learning_rate", "0.05"]
    )
    assert recipe.recipe == "paper"
    assert (model_args.depth, model_args.alpha, model_args.bottleneck) == (272, 200, False)
    assert args.per_device_train_batch_size == 64 and args.num_train_epochs == 200
    assert args.learning_rate == 0.05  # the explicit flag wins
    assert args.optim == "sgd" and args.optim_args == "momentum=0.9" and args.weight_decay == 5e-4
    assert args.weight_decay_all_parameters and args.lr_milestones == [0.3, 0.6, 0.8] and args.lr_gamma == 0.2
    assert args.max_grad_norm == 0.0 and args.seed == 42 and args.sam_method == "aace" and args.rho is None

    config = tmp_path / "run.json"
    config.write_text(json.dumps({"recipe": "paper", "model": "wide_resnet", "output_dir": str(tmp_path), "seed": 7}))
    model_args, _, _, args = train.parse_arguments([str(config)])
    assert (model_args.depth, model_args.widen_factor, model_args.dropout_rate) == (28, 10, 0.0)
    assert args.per_device_train_batch_size == 256 and args.seed == 7


def test_from_scratch_defaults_are_the_papers_optimizer_and_flags_win(tmp_path):
    train = load_train_module()
    paper = {"learning_rate": 0.1, "optim": "sgd", "optim_args": "momentum=0.9", "weight_decay": 5e-4,
             "weight_decay_all_parameters": True, "lr_milestones": [0.3, 0.6, 0.8], "lr_gamma": 0.2,
             "max_grad_norm": 0.0}  # fmt: skip
    config = tmp_path / "run.json"
    for model in ("wide_resnet", "pyramidnet", "wrn-16-8", "pyramidnet-110"):
        config.write_text(json.dumps({"model": model, "output_dir": str(tmp_path), "num_train_epochs": 7}))
        for argv in (["--model", model, "--output_dir", str(tmp_path), "--num_train_epochs", "7"], [str(config)]):
            _, _, _, args = train.parse_arguments(argv)
            assert {key: getattr(args, key) for key in paper} == paper, (model, argv)
            assert args.num_train_epochs == 7 and args.per_device_train_batch_size == 8  # epochs and batch: the user's
    _, _, _, args = train.parse_arguments(
        ["--output_dir", str(tmp_path), "--learning_rate", "0.03", "--optim", "adamw_torch"]
    )
    assert (args.learning_rate, args.optim, args.lr_milestones) == (0.03, "adamw_torch", [0.3, 0.6, 0.8])

    # Fine-tuning a checkpoint keeps the Trainer's defaults.
    _, _, _, args = train.parse_arguments(["--model", "some/checkpoint", "--output_dir", str(tmp_path)])
    assert (args.learning_rate, args.optim, args.lr_milestones, args.max_grad_norm) == (
        5e-5,
        "adamw_torch_fused",
        None,
        1.0,
    )


def test_short_model_names_set_the_size_and_conflicting_flags_are_refused(tmp_path):
    train = load_train_module()
    model_args, _, _, _ = train.parse_arguments(["--model", "wrn-16-8", "--output_dir", str(tmp_path)])
    assert (model_args.depth, model_args.widen_factor) == (16, 8)
    data = types.SimpleNamespace(num_labels=3, id2label={0: "a", 1: "b", 2: "c"}, label2id={}, num_channels=1)
    config = train.build_model(model_args, data).config
    assert (config.model_type, config.depth, config.widen_factor, config.num_channels) == (
        "aace_wide_resnet",
        16,
        8,
        1,
    )
    model_args, _, _, _ = train.parse_arguments(["--model", "pyramidnet-20-48", "--output_dir", str(tmp_path)])
    config = train.build_model(model_args, data).config
    assert (config.model_type, config.depth, config.alpha, config.bottleneck) == ("aace_pyramidnet", 20, 48, False)
    # The size flags are the architecture table's.
    flags = {field.name: field.type for field in dataclasses.fields(train.ModelArguments)}
    help_text = HfArgumentParser(train.ModelArguments).format_help()
    for architecture in ARCHITECTURES.values():
        for name in architecture.cli_fields:
            assert name in flags and f"--{name}" in help_text, name
    model_args, _, _, _ = train.parse_arguments(
        ["--model", "pyramidnet", "--bottleneck", "true", "--depth", "11", "--output_dir", str(tmp_path)]
    )
    assert model_args.bottleneck is True and model_args.depth == 11 and model_args.dropout_rate is None
    with pytest.raises(ValueError, match="--model wrn-16-8 means depth 16, but --depth is 28"):
        train.parse_arguments(["--model", "wrn-16-8", "--depth", "28", "--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match="wrn-DEPTH-WIDEN"):
        train.parse_arguments(["--model", "wrn-27-10", "--output_dir", str(tmp_path)])
    # The paper's recipe on a named size: the size is the name's, the rest the paper's.
    model_args, _, _, args = train.parse_arguments(
        ["--model", "wrn-16-8", "--recipe", "paper", "--output_dir", str(tmp_path)]
    )
    assert (model_args.depth, model_args.widen_factor, model_args.dropout_rate) == (16, 8, 0.0)
    assert args.per_device_train_batch_size == 256 and args.num_train_epochs == 200


def test_help_lists_every_argument_and_says_which_defaults_apply(capsys):
    train = load_train_module()
    with pytest.raises(SystemExit):
        train.parse_arguments(["--help"])
    text = "".join(capsys.readouterr().out.split())  # argparse wraps lines at spaces and hyphens
    for flag in ("--model", "--dataset", "--recipe", "--sam_method", "--learning_rate", "--label_noise"):
        assert flag in text, flag
    for sentence in (
        "defaults to the paper's optimizer and schedule: learning_rate 0.1, optim sgd",
        "Fine-tuning a checkpoint (--model PATH or Hub id) keeps the Trainer's defaults",
        "wrn-28-10",
        "fashion_mnist",
    ):
        assert "".join(sentence.split()) in text, sentence


def test_recipe_rejects_models_it_does_not_cover(tmp_path):
    train = load_train_module()
    with pytest.raises(ValueError, match="--recipe paper needs --model wide_resnet or pyramidnet"):
        train.parse_arguments(["--recipe", "paper", "--model", "some/checkpoint", "--output_dir", str(tmp_path)])


def test_push_to_local_hub_then_load_evaluate_and_classify(local_hub, tmp_path):
    repo = "hf-aace-tester/wrn-digits"
    output = tmp_path / "out"
    result = run(TRAIN, *QUICK, "--max_steps", "2", "--eval_strategy", "no", "--save_strategy", "no",
                 "--output_dir", str(output), "--push_to_hub", "--hub_model_id", repo, cache=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"Pushed to {repo}" in result.stdout
    results = json.loads((output / "all_results.json").read_text())

    script = textwrap.dedent(
        f"""
        import sys
        if sys.argv[1] == "without":
            sys.modules["hf_aace"] = None  # the Hub copy of the code must do on its own
        else:
            import hf_aace
        import numpy as np, PIL.Image, torch
        from huggingface_hub import list_repo_files
        from transformers import AutoModelForImageClassification, pipeline
        files = set(list_repo_files({repo!r}))
        assert {{"README.md", "model.safetensors", "modeling_wide_resnet.py", "all_results.json"}} <= files, files
        model = AutoModelForImageClassification.from_pretrained({repo!r}, trust_remote_code=True)
        print("module", type(model).__module__)
        classifier = pipeline("image-classification", model={repo!r}, trust_remote_code=True)
        prediction = classifier(PIL.Image.fromarray(np.full((8, 8), 200, dtype=np.uint8)), top_k=1)
        assert prediction[0]["label"] in [str(i) for i in range(10)], prediction
        print("ok")
        """
    )
    for mode in ("without", "with"):
        loaded = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True, cwd=tmp_path)
        assert loaded.returncode == 0, loaded.stderr[-4000:]
        assert "ok" in loaded.stdout
        expected = "transformers_modules" if mode == "without" else "hf_aace"
        assert f"module {expected}" in loaded.stdout

    evaluated = run(
        EVALUATE, "--model", repo, "--dataset", "digits", "--use_cpu", "--trust_remote_code", cache=tmp_path
    )
    assert evaluated.returncode == 0, evaluated.stderr[-4000:]
    assert f"accuracy       {results['test_accuracy']:.4f}" in evaluated.stdout


def test_train_on_a_hub_dataset_served_by_the_local_hub(local_hub, tmp_path):
    rng = np.random.default_rng(0)
    features = datasets.Features({"picture": datasets.Image(), "kind": datasets.ClassLabel(names=["a", "b", "c"])})
    splits = {
        split: {"picture": [encode(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)) for _ in range(n)],
                "kind": rng.integers(0, 3, n).tolist()}
        for split, n in (("train", 24), ("test", 9))
    }  # fmt: skip
    local_hub.seed_dataset_repo("hf-aace-tester/tiny-pictures", write_hub_dataset(tmp_path / "data", features, splits))
    output = tmp_path / "out"
    result = run(TRAIN, *QUICK, "--dataset", "hf-aace-tester/tiny-pictures", "--max_steps", "2", "--eval_strategy",
                 "no", "--save_strategy", "no", "--output_dir", str(output), cache=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    config = json.loads((output / "config.json").read_text())
    assert config["num_channels"] == 3 and config["id2label"] == {"0": "a", "1": "b", "2": "c"}
    assert "test split, 9 images" in result.stdout
    card = yaml.safe_load((output / "README.md").read_text().split("---")[1])
    assert card["datasets"] == ["hf-aace-tester/tiny-pictures"]


def test_failed_push_keeps_the_results_and_says_what_to_do(tmp_path):
    output = tmp_path / "out"
    result = run(TRAIN, *QUICK, "--max_steps", "2", "--eval_strategy", "no", "--save_strategy", "no",
                 "--output_dir", str(output), "--push_to_hub", "--hub_model_id", "hf-aace-tester/unreachable",
                 env={"HF_ENDPOINT": dead_endpoint()}, cache=tmp_path)  # fmt: skip
    assert result.returncode == 1
    assert "Push to the Hub failed" in result.stderr and "Nothing is lost" in result.stderr
    assert "hf upload hf-aace-tester/unreachable" in result.stderr
    for name in ("model.safetensors", "config.json", "README.md", "all_results.json"):
        assert (output / name).is_file(), name


@pytest.mark.hub
@pytest.mark.skipif(
    not (os.environ.get("HF_AACE_HUB_TOKEN") and os.environ.get("HF_AACE_HUB_USER")),
    reason="set HF_AACE_HUB_TOKEN and HF_AACE_HUB_USER (and have network) to test against the real Hub",
)
def test_push_to_the_real_hub_and_load_back(tmp_path):
    repo = f"{os.environ['HF_AACE_HUB_USER']}/hf-aace-test-{os.getpid()}"
    env = {"HF_ENDPOINT": "https://huggingface.co", "HF_TOKEN": os.environ["HF_AACE_HUB_TOKEN"]}
    result = run(TRAIN, *QUICK, "--max_steps", "2", "--eval_strategy", "no", "--save_strategy", "no",
                 "--output_dir", str(tmp_path / "out"), "--push_to_hub", "--hub_model_id", repo, "--hub_private_repo",
                 "true", env=env, cache=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    script = (
        "import sys; sys.modules['hf_aace'] = None\n"
        "from transformers import AutoModelForImageClassification\n"
        f"AutoModelForImageClassification.from_pretrained({repo!r}, trust_remote_code=True)\n"
        "from huggingface_hub import delete_repo\n"
        f"delete_repo({repo!r})\n"
    )
    loaded = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env={**os.environ, **env})
    assert loaded.returncode == 0, loaded.stderr[-4000:]


def test_train_script_under_accelerate_launch_on_two_processes(tmp_path):
    output = tmp_path / "out"
    options = ["--max_steps", "3", "--eval_strategy", "no", "--save_strategy", "no", "--output_dir", str(output)]
    command = two_process_launch("--multi_gpu", str(TRAIN), *QUICK, *options, "--cache_dir", str(tmp_path))
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("Test accuracy:") == 1  # printed by the main process only
    history = json.loads((output / "trainer_state.json").read_text())["log_history"]
    assert [entry["step"] for entry in history if "loss" in entry] == [1, 2, 3]
    arguments = json.loads((output / "run_arguments.json").read_text())
    assert arguments["training"]["ddp_find_unused_parameters"] is False


@pytest.mark.parametrize("world_size", [4, 8])
@pytest.mark.parametrize(("model", "global_batch"), [("wide_resnet", 256), ("pyramidnet", 64)])
def test_paper_recipe_splits_the_global_batch_over_the_processes(
    tmp_path, monkeypatch, world_size, model, global_batch
):
    train = load_train_module()
    monkeypatch.setenv("WORLD_SIZE", str(world_size))  # what accelerate launch sets in every process
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"recipe": "paper", "model": model, "output_dir": str(tmp_path)}))
    flags = ["--recipe", "paper", "--model", model, "--output_dir", str(tmp_path)]
    for argv in (flags, [str(config)]):
        model_args, _, _, args = train.parse_arguments(argv)
        assert args.per_device_train_batch_size == global_batch // world_size, argv
        if model == "wide_resnet":
            assert model_args.dropout_rate == 0.0
    _, _, _, args = train.parse_arguments([*flags, "--per_device_train_batch_size", "3"])
    assert args.per_device_train_batch_size == 3  # an explicit flag still wins

    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ValueError, match=f"global batch of {global_batch}, which 3 processes cannot split"):
        train.parse_arguments(flags)


def test_train_with_random_resized_crop_on_encoded_images_of_varying_sizes(tmp_path):
    rng = np.random.default_rng(3)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    splits = {
        split: {"image": [encode(rng.integers(0, 256, (int(rng.integers(20, 40)), int(rng.integers(20, 40)), 3),
                                              dtype=np.uint8), "JPEG") for _ in range(n)],
                "label": rng.integers(0, 2, n).tolist()}
        for split, n in (("train", 16), ("test", 6))
    }  # fmt: skip
    source = write_hub_dataset(tmp_path / "data", features, splits)
    output = tmp_path / "out"
    result = run(TRAIN, *QUICK[:2], "--dataset", str(source), *QUICK[4:], "--per_device_train_batch_size", "8",
                 "--random_resized_crop", "16", "--dataloader_num_workers", "1", "--max_steps", "2",
                 "--eval_strategy", "no", "--save_strategy", "no", "--output_dir", str(output),
                 env={"HF_DATASETS_CACHE": str(tmp_path / "datasets_cache")}, cache=tmp_path / "cache")  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    results = json.loads((output / "all_results.json").read_text())
    assert "test_accuracy" in results and "train_eval_accuracy" in results
    assert "test split, 6 images" in result.stdout
    assert "crop_padding=0, flip=False, cutout_size=0" in result.stderr  # the device only normalises
    assert json.loads((output / "run_arguments.json").read_text())["data"]["random_resized_crop"] == 16
    assert not (tmp_path / "cache").exists()
