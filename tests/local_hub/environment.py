"""Where the local hub lives and the process environment that points the Hugging Face clients at it."""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

DEFAULT_USER = "hf-aace-tester"
DEFAULT_TOKEN = "hf_aace_local_test_token"
# Variables that would send the clients elsewhere than the local hub (cache folders outside HF_HOME, offline mode,
# another token).
_CONFLICTING_VARIABLES = (
    "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_DATASETS_CACHE", "TRANSFORMERS_CACHE", "HF_XET_CACHE",
    "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH",
)  # fmt: skip

_settings: HubSettings | None = None


@dataclass(frozen=True)
class HubSettings:
    """Where the local hub lives and how the clients reach it.

    Attributes:
        root: Folder holding the git repositories, the LFS store, `HF_HOME` and the logs.
        port: Port of the front server on 127.0.0.1.
        endpoint: Value of `HF_ENDPOINT`, `http://127.0.0.1:<port>`.
        token: Value of `HF_TOKEN`.
    """

    root: Path
    port: int
    endpoint: str
    token: str

    @property
    def hf_home(self) -> Path:
        """Value of `HF_HOME`: the hub, datasets and xet caches of the clients."""
        return self.root / "hf_home"

    @property
    def mirrors(self) -> Path:
        """Folder of git repositories, laid out `<mirrors>/{models,datasets,spaces}/<org>/<name>`."""
        return self.root / "mirrors"

    @property
    def logs(self) -> Path:
        """Folder of `front.log` (every request the front server answers) and olah's logs."""
        return self.root / "logs"


def free_port() -> int:
    """Returns a TCP port on 127.0.0.1 that nothing listens on (it could be taken again before it is used)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def dead_endpoint() -> str:
    """Returns an `http://127.0.0.1:<port>` URL on which no server listens, for connection-failure tests."""
    return f"http://127.0.0.1:{free_port()}"


def configure_environment(root: Path, token: str = DEFAULT_TOKEN) -> HubSettings:
    """Points the Hugging Face clients of this process (and of its future subprocesses) at a local hub.

    Must run before `huggingface_hub`, `transformers` or `datasets` is imported: they read these variables once.

    Args:
        root: Folder for the hub's repositories, the client caches (`HF_HOME`) and the logs; created if missing.
        token: Value of `HF_TOKEN`, sent by the clients as `Authorization: Bearer <token>`.

    Returns:
        The settings, to pass to `LocalHub`.

    Raises:
        RuntimeError: If `huggingface_hub` was imported already (it would keep its endpoint).
    """
    global _settings
    if "huggingface_hub" in sys.modules:
        endpoint = sys.modules["huggingface_hub"].constants.ENDPOINT
        raise RuntimeError(
            f"huggingface_hub was imported before configure_environment (its endpoint is {endpoint}); call "
            "configure_environment at the top of conftest.py, before anything imports huggingface_hub, transformers "
            "or datasets."
        )
    port = free_port()
    settings = HubSettings(root=Path(root).resolve(), port=port, endpoint=f"http://127.0.0.1:{port}", token=token)
    for folder in (settings.hf_home, settings.mirrors, settings.logs):
        folder.mkdir(parents=True, exist_ok=True)
    for name in _CONFLICTING_VARIABLES:
        os.environ.pop(name, None)
    os.environ.update(
        {
            "HF_ENDPOINT": settings.endpoint,
            "HF_HOME": str(settings.hf_home),
            "HF_TOKEN": token,
            # hf_xet would upload through the Xet protocol, which the front server does not speak.
            "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_SYMLINKS_WARNING": "1",
        }
    )
    no_proxy = [item for item in os.environ.get("NO_PROXY", "").split(",") if item]
    os.environ["NO_PROXY"] = os.environ["no_proxy"] = ",".join(dict.fromkeys([*no_proxy, "127.0.0.1", "localhost"]))
    _settings = settings
    return settings


def ensure_environment() -> HubSettings:
    """Returns the settings of this process's `configure_environment` call, configuring a temporary root if none.

    A root created here is deleted when the interpreter exits, unless `HF_AACE_KEEP_LOCAL_HUB=1` (to read the logs).
    """
    if _settings is not None:
        return _settings
    root = Path(tempfile.mkdtemp(prefix="hf_aace_hub_"))
    if os.environ.get("HF_AACE_KEEP_LOCAL_HUB") != "1":
        atexit.register(shutil.rmtree, root, ignore_errors=True)
    return configure_environment(root)
