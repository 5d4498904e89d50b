"""Tests of the local Hub (tests/local_hub/): what the clients push through `HF_ENDPOINT` comes back intact."""

import pytest

from local_hub import (
    DEFAULT_TOKEN,
    DEFAULT_USER,
    HubSettings,
    LocalHub,
    dead_endpoint,
    ensure_environment,
    free_port,
    shared_hub,
)

# The Hugging Face clients read HF_ENDPOINT when they are imported: configure it first (a no-op once conftest.py has
# called configure_environment). If conftest.py imported them before configuring it, these tests cannot run.
try:
    ensure_environment()
except RuntimeError as error:
    pytest.skip(str(error), allow_module_level=True)

import io  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402
import urllib.error  # noqa: E402
import urllib.request  # noqa: E402
from email.message import Message  # noqa: E402
from pathlib import Path  # noqa: E402

try:  # huggingface_hub 2 talks through httpx2, 1.x through httpx
    import httpx2  # noqa: E402
except ImportError:
    import httpx as httpx2  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402
from datasets import ClassLabel, load_dataset  # noqa: E402
from datasets import Image as ImageFeature  # noqa: E402
from huggingface_hub import HfApi, ModelCard, hf_hub_download, snapshot_download  # noqa: E402
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, RevisionNotFoundError  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import ResNetConfig, ResNetForImageClassification, Trainer, TrainingArguments  # noqa: E402

DATASET_README = """\
---
dataset_info:
  features:
  - name: img
    dtype: image
  - name: label
    dtype:
      class_label:
        names:
          '0': cat
          '1': dog
          '2': frog
  splits:
  - name: train
    num_examples: 3
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*
---
# Tiny images
"""


@pytest.fixture(scope="session")
def local_hub() -> LocalHub:
    # Same name and object as the conftest.py fixture: both return this process's one hub.
    return shared_hub()


def tiny_resnet(seed: int = 0) -> ResNetForImageClassification:
    torch.manual_seed(seed)
    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3)
    return ResNetForImageClassification(config).eval()


def fixed_input() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def logits_in_fresh_process(repo_id: str, tmp_path: Path) -> torch.Tensor:
    """Loads `repo_id` with from_pretrained in a new interpreter that inherits this process's environment."""
    out = tmp_path / "logits.pt"
    code = textwrap.dedent(
        f"""
        import torch
        from transformers import ResNetForImageClassification
        model = ResNetForImageClassification.from_pretrained({repo_id!r}).eval()
        x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            torch.save(model(x).logits, {str(out)!r})
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out)


def test_push_to_hub_then_from_pretrained_in_fresh_process(local_hub: LocalHub, tmp_path: Path) -> None:
    model = tiny_resnet()
    with torch.no_grad():
        expected = model(fixed_input()).logits

    commit = model.push_to_hub(f"{DEFAULT_USER}/tiny")

    assert commit.repo_url.repo_id == f"{DEFAULT_USER}/tiny"
    tree = {entry.path: entry for entry in HfApi().list_repo_tree(f"{DEFAULT_USER}/tiny")}
    assert {"config.json", "model.safetensors", "README.md"} <= set(tree)
    assert tree["model.safetensors"].lfs is not None and tree["config.json"].lfs is None
    assert torch.equal(logits_in_fresh_process(f"{DEFAULT_USER}/tiny", tmp_path), expected)


def test_second_push_is_served_fresh(local_hub: LocalHub, tmp_path: Path) -> None:
    repo_id = f"{DEFAULT_USER}/repushed"
    tiny_resnet(seed=0).push_to_hub(repo_id)
    first = ResNetForImageClassification.from_pretrained(repo_id).eval()
    changed = tiny_resnet(seed=1)
    changed.push_to_hub(repo_id)

    second = ResNetForImageClassification.from_pretrained(repo_id).eval()

    with torch.no_grad():
        assert torch.equal(second(fixed_input()).logits, changed(fixed_input()).logits)
        assert not torch.equal(first(fixed_input()).logits, second(fixed_input()).logits)
    assert len(HfApi().list_repo_commits(repo_id)) == 3  # initial commit and two pushes


def test_snapshot_download_of_seeded_model_repo(local_hub: LocalHub, tmp_path: Path) -> None:
    folder = tmp_path / "seed"
    (folder / "nested").mkdir(parents=True)
    files = {
        "config.json": b'{"model_type": "resnet"}',
        "model.safetensors": bytes(range(256)) * 8,
        "nested/notes.txt": b"tiny\n",
    }
    for name, content in files.items():
        (folder / name).write_bytes(content)

    sha = local_hub.seed_model_repo("seed-org/seeded-model", folder)
    snapshot = Path(snapshot_download("seed-org/seeded-model"))

    assert snapshot.name == sha
    for name, content in files.items():
        assert (snapshot / name).read_bytes() == content
    assert HfApi().model_info("seed-org/seeded-model").sha == sha
    with pytest.raises(EntryNotFoundError):
        hf_hub_download("seed-org/seeded-model", "missing.json")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download("seed-org/seeded-model", "config.json", revision="no-such-branch")


def test_load_dataset_of_seeded_dataset_repo(local_hub: LocalHub, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    pixels = [rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8) for _ in range(3)]
    encoded = []
    for array in pixels:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        encoded.append({"bytes": buffer.getvalue(), "path": None})
    folder = tmp_path / "dataset"
    (folder / "data").mkdir(parents=True)
    # Plain parquet without datasets' schema metadata: the Image and ClassLabel types come from README.md.
    table = pa.table({"img": encoded, "label": [2, 0, 1]})
    pq.write_table(table, folder / "data" / "train-00000-of-00001.parquet")
    (folder / "README.md").write_text(DATASET_README)
    local_hub.seed_dataset_repo("seed-org/tiny-images", folder)

    dataset = load_dataset("seed-org/tiny-images", split="train")

    assert isinstance(dataset.features["img"], ImageFeature)
    assert isinstance(dataset.features["label"], ClassLabel)
    assert dataset.features["label"].names == ["cat", "dog", "frog"]
    assert dataset["label"][:] == [2, 0, 1]
    for row, array in zip(dataset, pixels, strict=True):
        np.testing.assert_array_equal(np.asarray(row["img"]), array)


def test_seed_dataset_repo_requires_readme(local_hub: LocalHub, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="README.md"):
        local_hub.seed_dataset_repo("seed-org/no-readme", tmp_path)


class TinyImages(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(index)
        return {"pixel_values": torch.randn(3, 32, 32, generator=generator), "labels": torch.tensor(index % 3)}


def test_trainer_push_to_hub_at_end(local_hub: LocalHub, tmp_path: Path) -> None:
    repo_id = f"{DEFAULT_USER}/trainer-tiny"
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        push_to_hub=True,
        hub_model_id=repo_id,
        hub_strategy="end",
        max_steps=1,
        per_device_train_batch_size=4,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(model=tiny_resnet(), args=args, train_dataset=TinyImages())
    trainer.train()

    trainer.push_to_hub()

    files = HfApi().list_repo_files(repo_id)
    assert {"config.json", "model.safetensors", "training_args.bin", "README.md"} <= set(files)
    card = ModelCard.load(repo_id)
    assert "trainer-tiny" in card.text


def test_commit_deletes_files_and_checks_the_model_card(local_hub: LocalHub, tmp_path: Path) -> None:
    api = HfApi()
    repo_id = api.create_repo("cards").repo_id  # no namespace: the token's user
    api.upload_file(path_or_fileobj=b"to delete", path_in_repo="old.txt", repo_id=repo_id)
    ModelCard("---\nlicense: mit\n---\n# Card\n").push_to_hub(repo_id)
    api.delete_file("old.txt", repo_id=repo_id)

    assert repo_id == f"{DEFAULT_USER}/cards"
    assert set(api.list_repo_files(repo_id)) == {".gitattributes", "README.md"}
    assert ModelCard.load(repo_id).data.license == "mit"
    with pytest.raises(ValueError, match="Invalid metadata in README.md"):
        api.upload_file(path_or_fileobj=b"---\nlicense: [mit\n---\n", path_in_repo="README.md", repo_id=repo_id)


def test_upload_without_token_is_rejected_with_401(local_hub: LocalHub) -> None:
    with pytest.raises(HfHubHTTPError, match="Missing token") as error:
        tiny_resnet().push_to_hub(f"{DEFAULT_USER}/no-token", token=False)

    assert error.value.response.status_code == 401
    assert not local_hub.repo_dir(f"{DEFAULT_USER}/no-token").exists()


def test_wrong_token_is_rejected_when_a_token_is_configured(tmp_path: Path) -> None:
    port = free_port()
    settings = HubSettings(root=tmp_path, port=port, endpoint=f"http://127.0.0.1:{port}", token="hf_right")
    with LocalHub(settings, token="hf_right") as strict:
        with pytest.raises(HfHubHTTPError, match="Invalid credentials") as error:
            HfApi(endpoint=strict.url, token="hf_wrong").create_repo("org/model")
        assert error.value.response.status_code == 401
        assert HfApi(endpoint=strict.url, token="hf_right").whoami()["name"] == DEFAULT_USER
    with pytest.raises(httpx2.ConnectError):  # stopped: nothing listens on the port any more
        HfApi(endpoint=strict.url, token="hf_right").whoami()


def test_start_fails_when_the_port_is_taken(local_hub: LocalHub, tmp_path: Path) -> None:
    taken = HubSettings(root=tmp_path, port=local_hub.settings.port, endpoint=local_hub.url, token=DEFAULT_TOKEN)
    with pytest.raises(RuntimeError, match=f"did not start on port {taken.port}: .*address already in use"):
        LocalHub(taken).start()
    assert HfApi().whoami()["name"] == DEFAULT_USER  # the running hub is untouched


def front_request(url: str, method: str, body: bytes = b"") -> tuple[int, Message, bytes]:
    """Status, headers (case-insensitive) and body of a raw request with the configured token."""
    request = urllib.request.Request(
        url, data=body, method=method, headers={"Authorization": f"Bearer {DEFAULT_TOKEN}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read()


def test_front_server_answers_hub_style_errors(local_hub: LocalHub) -> None:
    repo_id = HfApi().create_repo("routing", exist_ok=True).repo_id

    # A revision with an encoded '/' still reaches the preupload route, which commits to main only.
    status, headers, body = front_request(
        f"{local_hub.url}/api/models/{repo_id}/preupload/refs%2Fpr%2F1", "POST", b'{"files": []}'
    )
    assert (status, headers["X-Error-Code"]) == (404, "RevisionNotFound")
    assert "refs/pr/1" in json.loads(body)["error"]
    # Writes the front server does not implement are neither forwarded to olah nor dropped.
    status, headers, body = front_request(f"{local_hub.url}/api/models/{repo_id}/settings", "PUT", b"{}")
    assert status == 501 and "does not implement PUT" in headers["X-Error-Message"]
    assert json.loads(body)["error"] == headers["X-Error-Message"]
    # HEAD of a file is forwarded to olah: its length, no body.
    status, headers, body = front_request(f"{local_hub.url}/{repo_id}/resolve/main/.gitattributes", "HEAD")
    assert status == 200 and body == b""
    assert int(headers["Content-Length"]) == (local_hub.repo_dir(repo_id) / ".gitattributes").stat().st_size


def test_unreachable_endpoint_raises_a_connection_error(tmp_path: Path) -> None:
    with pytest.raises(httpx2.ConnectError):
        HfApi(endpoint=dead_endpoint()).create_repo("org/model", exist_ok=True)
