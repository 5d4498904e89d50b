"""Faults and bad input: nothing lost, nothing leaked, and every error names its cause (tests/README.md, Reliability).

The end-to-end checks share one short training run, pushed to the local Hub with a token given in a JSON config.
"""

import importlib.util
import io
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import pytest
import torch
from torch import nn

from hf_aace import (
    AACETrainingArguments,
    WideResNetConfig,
    WideResNetForImageClassification,
    convert_reference_checkpoint,
)
from hf_aace.data import load_image_classification_dataset
from hf_aace.image_processing_aace import prepare_image

from hub_datasets import encode, write_hub_dataset, write_integer_label_dataset

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "scripts" / "train.py"
EVALUATE = ROOT / "scripts" / "evaluate.py"
SECRET = "hf_faults_secret_token_value"
REPO = "hf-aace-tester/faults"
SETTINGS = {
    "model": "wide_resnet", "depth": 10, "widen_factor": 1, "dataset": "digits", "per_device_train_batch_size": 64,
    "learning_rate": 0.1, "use_cpu": True, "disable_tqdm": True, "max_steps": 6, "save_strategy": "steps",
    "save_steps": 3, "logging_steps": 4, "eval_strategy": "no", "eval_train_split": False,
}  # fmt: skip


def load_script(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem + "_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def flags(settings: dict) -> list[str]:
    """Command-line flags for a settings dict (booleans as true/false)."""
    values = {key: str(value).lower() if isinstance(value, bool) else str(value) for key, value in settings.items()}
    return [item for key, value in values.items() for item in (f"--{key}", value)]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=600)


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets_cache"))


@pytest.fixture(scope="module")
def pushed_run(local_hub, tmp_path_factory):
    """6 steps, checkpoints at 3 and 6, pushed with a token that only the JSON config holds."""
    root = tmp_path_factory.mktemp("faults")
    config = root / "run.json"
    settings = {**SETTINGS, "output_dir": str(root / "out"), "cache_dir": str(root / "cache")}
    config.write_text(json.dumps({**settings, "push_to_hub": True, "hub_model_id": REPO, "hub_token": SECRET}))
    result = run(TRAIN, config)
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"Pushed to {REPO}" in result.stdout
    return root / "out", settings


def every_file(folder: Path) -> list[Path]:
    return [path for path in folder.rglob("*") if path.is_file()]


def test_no_token_reaches_a_saved_or_pushed_file(pushed_run, local_hub):
    output, _ = pushed_run
    repo = local_hub.repo_dir(REPO)
    uploaded = [path for path in every_file(repo) if path.relative_to(repo).parts[0] != ".git"]
    uploaded += every_file(repo / ".git" / "lfs" / "objects")  # the content of the LFS files
    names = {path.relative_to(repo).as_posix() for path in uploaded}
    assert {"training_args.bin", "run_arguments.json", "README.md", "all_results.json"} <= names
    assert any(name.startswith("runs/") for name in names)  # the TensorBoard logs went up too
    checked = uploaded + every_file(output)  # the output folder: checkpoints, TensorBoard logs, plots
    assert any(path.name == "training_args.bin" and "checkpoint-3" in str(path) for path in checked)
    # The flag/JSON token and the environment's token (HF_TOKEN) alike.
    for token in (SECRET, os.environ["HF_TOKEN"]):
        leaks = [str(path) for path in checked if token.encode() in path.read_bytes()]
        assert not leaks, f"token found in {leaks}"


def test_pickled_training_arguments_hold_no_token(tmp_path):
    # What the Trainer writes as training_args.bin when a program passes hub_token to the arguments itself.
    args = AACETrainingArguments(output_dir=str(tmp_path), hub_token=SECRET, report_to="none", use_cpu=True)
    buffer = io.BytesIO()
    torch.save(args, buffer)
    assert args.hub_token == SECRET  # the live arguments keep it for the upload
    assert SECRET.encode() not in buffer.getvalue()
    # Loaded back, the arguments have no token at all, so an upload falls back to the saved login or HF_TOKEN.
    buffer.seek(0)
    assert torch.load(buffer, weights_only=False).hub_token is None


def test_metrics_files_are_strict_json_and_train_loss_covers_the_run(pushed_run):
    output, _ = pushed_run

    def refuse(constant):
        raise ValueError(f"bare {constant} in all_results.json")

    results = json.loads((output / "all_results.json").read_text(), parse_constant=refuse)
    history = json.loads((output / "trainer_state.json").read_text())["log_history"]
    logged = {entry["step"]: entry["loss"] for entry in history if "loss" in entry}
    assert sorted(logged) == [3, 4, 6]  # logged at each checkpoint as well as every 4 steps
    expected = (3 * logged[3] + logged[4] + 2 * logged[6]) / 6
    assert results["train_loss"] == pytest.approx(expected, rel=1e-9)

    train = load_script(TRAIN)
    assert train.finite_or_none({"a": math.nan, "b": -math.inf, "c": 1.5, "d": 2}) == {
        "a": None,
        "b": None,
        "c": 1.5,
        "d": 2,
    }


def test_rerun_resumes_from_the_newest_complete_checkpoint_with_the_same_train_loss(pushed_run, tmp_path):
    output, settings = pushed_run
    copy = tmp_path / "out"
    shutil.copytree(output, copy)
    (copy / "checkpoint-6" / "trainer_state.json").unlink()  # killed while checkpoint-6 was written
    result = run(TRAIN, *flags({**settings, "output_dir": copy}))
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"Not resuming from {copy / 'checkpoint-6'}: trainer_state.json is missing" in result.stderr
    assert f"Resuming from {copy / 'checkpoint-3'}" in result.stderr
    assert (copy / "checkpoint-6" / "trainer_state.json").is_file()  # written again by the resumed run
    before = json.loads((output / "all_results.json").read_text())["train_loss"]
    after = json.loads((copy / "all_results.json").read_text())["train_loss"]
    assert after == pytest.approx(before, rel=1e-4)  # not the mean of steps 4-6 only


def test_explicit_resume_from_a_checkpoint_without_optimizer_state_names_the_file(pushed_run, tmp_path):
    output, settings = pushed_run
    checkpoint = tmp_path / "checkpoint-3"
    shutil.copytree(output / "checkpoint-3", checkpoint)
    (checkpoint / "optimizer.pt").unlink()
    argv = flags({**settings, "output_dir": tmp_path / "out", "resume_from_checkpoint": checkpoint})
    with pytest.raises(ValueError, match=f"Cannot resume from {checkpoint}: optimizer.pt is missing"):
        load_script(TRAIN).main(argv)


def test_diverged_run_exits_non_zero_and_saves_or_pushes_nothing(local_hub, tmp_path):
    output = tmp_path / "out"
    settings = {**SETTINGS, "learning_rate": 1e38, "max_steps": 2, "logging_steps": 1}
    settings.update(output_dir=output, cache_dir=tmp_path)
    repo = "hf-aace-tester/diverged"
    result = run(TRAIN, *flags(settings), "--push_to_hub", "--hub_model_id", repo, "--hub_token", SECRET)
    assert result.returncode == 2, result.stderr[-4000:]
    assert "Training diverged: after step" in result.stderr and "--learning_rate, now 1e+38" in result.stderr
    assert "No final model was saved or pushed" in result.stderr
    for name in ("model.safetensors", "all_results.json", "README.md"):
        assert not (output / name).exists(), name
    assert not local_hub.repo_dir(repo).exists()
    assert not [path for path in every_file(output) if SECRET.encode() in path.read_bytes()]


def test_config_file_refuses_an_unknown_recipe_and_train_accepts_pad_to_square(tmp_path):
    train = load_script(TRAIN)
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"recipe": "papr", "output_dir": str(tmp_path)}))
    with pytest.raises(ValueError, match="recipe must be 'paper' or left out, got 'papr'"):
        train.parse_arguments([str(config)])
    _, data_args, _, _ = train.parse_arguments(["--pad_to_square", "true", "--output_dir", str(tmp_path)])
    assert data_args.pad_to_square is True


def test_evaluate_refuses_a_missing_folder_and_other_class_names(pushed_run, tmp_path, monkeypatch):
    output, _ = pushed_run
    evaluate = load_script(EVALUATE)
    monkeypatch.chdir(tmp_path.parent)
    # Absolute, explicitly relative, and "folder/name" where the folder exists here (else it could be a Hub id).
    for missing in (tmp_path / "absent", "./absent", f"{tmp_path.name}/absent"):
        with pytest.raises(ValueError, match="No model folder at"):
            evaluate.check_model_location(str(missing))
    with pytest.raises(ValueError, match="holds no config.json"):
        evaluate.check_model_location(str(tmp_path))
    evaluate.check_model_location("owner/model")  # a Hub id goes on to the Hub

    # Ten 8x8 grayscale classes, as digits, but named otherwise.
    rng = np.random.default_rng(0)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list("abcdefghij"))})
    images = [encode(rng.integers(0, 256, (8, 8), dtype=np.uint8)) for _ in range(10)]
    splits = {split: {"image": images, "label": list(range(10))} for split in ("train", "test")}
    source = write_hub_dataset(tmp_path / "letters", features, splits)
    argv = ["--model", str(output), "--dataset", str(source), "--use_cpu", "--cache_dir", str(tmp_path)]
    with pytest.raises(ValueError, match=r"Class 0 of .* is '0' but 'a' in .*letters"):
        evaluate.main(argv)


@pytest.mark.parametrize("stray", [2_000_000, 10**12])
def test_a_stray_integer_label_is_refused_not_a_huge_model(tmp_path, stray):
    source = write_integer_label_dataset(tmp_path, [0, 1, 2, stray, 1])
    with pytest.raises(
        ValueError, match=rf"labels up to {stray}, but only 4 of those {stray + 1} classes occur.*row 3"
    ):
        load_image_classification_dataset(source, label_column="label", cache_dir=tmp_path)


def test_sixteen_bit_grayscale_is_scaled_not_saturated(tmp_path):
    values = np.linspace(0, 65535, 64).astype(np.uint16).reshape(8, 8)
    expected = ((values.astype(np.int64) + 128) // 257).astype(np.uint8)
    image = PIL.Image.fromarray(values)
    assert image.mode == "I;16"
    np.testing.assert_array_equal(np.asarray(prepare_image(image, 1)), expected)
    big_endian = PIL.Image.frombytes("I;16B", (8, 8), values.astype(">u2").tobytes())
    np.testing.assert_array_equal(np.asarray(prepare_image(big_endian, 3))[..., 0], expected)

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    splits = {split: {"image": [encode(image)] * 2, "label": [0, 1]} for split in ("train", "test")}
    data = load_image_classification_dataset(
        str(write_hub_dataset(tmp_path / "d", features, splits)), cache_dir=tmp_path
    )
    np.testing.assert_array_equal(data.train.images[0, 0].numpy(), expected)


def test_a_truncated_dataset_cache_is_decoded_again(tmp_path):
    source = write_integer_label_dataset(tmp_path, [0, 1, 1])
    first = load_image_classification_dataset(source, label_column="label", cache_dir=tmp_path / "cache")
    (cache_file,) = (tmp_path / "cache").glob("*.safetensors")
    cache_file.write_bytes(cache_file.read_bytes()[:100])
    again = load_image_classification_dataset(source, label_column="label", cache_dir=tmp_path / "cache")
    assert torch.equal(again.train.images, first.train.images) and again.label_names == first.label_names
    assert cache_file.stat().st_size > 100  # replaced by a complete file


def test_an_empty_split_is_named(tmp_path):
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    image = encode(np.zeros((4, 4), dtype=np.uint8))
    splits = {"train": {"image": [image, image], "label": [0, 1]}, "test": {"image": [], "label": []}}
    source = write_hub_dataset(tmp_path / "d", features, splits)
    with pytest.raises(ValueError, match=r"The 'test' split of '.*d' is empty"):
        load_image_classification_dataset(str(source), cache_dir=tmp_path)


def test_size_mismatch_message_names_the_script_flags(tmp_path):
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    images = [encode(np.zeros((8, 8), dtype=np.uint8)), encode(np.zeros((6, 10), dtype=np.uint8))]
    splits = {split: {"image": images, "label": [0, 1]} for split in ("train", "test")}
    source = write_hub_dataset(tmp_path / "d", features, splits)
    with pytest.raises(ValueError, match="scripts/train.py: --image_size and --pad_to_square"):
        load_image_classification_dataset(str(source), cache_dir=tmp_path)


class PickledNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(2, 2)


def test_converter_errors_name_the_problem_without_unsafe_advice(tmp_path):
    (tmp_path / "wrn.pth").write_bytes(b"")
    with pytest.raises(ValueError, match=r"is a folder; pass the checkpoint file itself \(it holds wrn.pth\)"):
        convert_reference_checkpoint(tmp_path, "cifar10")

    path = tmp_path / "model.pth"
    torch.save(PickledNet(), path)
    with pytest.raises(ValueError, match=r"not a plain state dict \(it holds a .*PickledNet object\)") as error:
        convert_reference_checkpoint(path, "cifar10")
    assert "weights_only" not in str(error.value) and "state_dict()" in str(error.value)


def test_a_pooling_window_larger_than_the_feature_map_is_explained():
    model = WideResNetForImageClassification(WideResNetConfig(depth=10, widen_factor=1, pooling_size=16)).eval()
    with pytest.raises(ValueError, match=r"pooling_size=16 does not pool the \(8, 8\) feature map of \(32, 32\)"):
        model(torch.zeros(1, 3, 32, 32))
