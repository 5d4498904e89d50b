"""A Hugging Face Hub on 127.0.0.1 for offline tests: downloads served by olah, uploads by a small front server.

The clients (`huggingface_hub`, `transformers`, `datasets`) read `HF_ENDPOINT` once, when they are imported, so the
environment has to be configured first (`configure_environment` or `ensure_environment`, called by `conftest.py` at
import time). `LocalHub` then starts two servers:

* olah (a Hub mirror, run as a subprocess in offline mode) serves the git repositories under `<root>/mirrors` with the
  real download API: `/api/{type}s/{repo}/revision/...`, `tree`, `paths-info`, `/{repo}/resolve/...`.
* the front server listens on `HF_ENDPOINT`. It implements the write API that `create_repo`, `create_commit`,
  `upload_folder`, `whoami`, `ModelCard.push_to_hub` and transformers' `push_to_hub` call (repo creation, preupload,
  NDJSON commit, LFS batch and upload), committing into the same git repositories, and forwards every read request
  to olah. Olah reads the git repositories on each request, so a commit is downloadable as soon as it is answered.

LFS files are stored as git-lfs pointer files whose content lives in `.git/lfs/objects`, the layout olah reads.
"""

from __future__ import annotations

import atexit
import base64
import binascii
import hashlib
import http.client
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import Any

import yaml

DEFAULT_USER = "hf-aace-tester"
DEFAULT_TOKEN = "hf_aace_local_test_token"
READINESS_PROBE = "/api/models/hf-aace-local/readiness-probe/revision/main"
# Files the front server asks clients to send through LFS whatever their size. `datasets` deletes its temporary
# parquet files before the commit, so they must be uploaded (LFS) during preupload rather than inlined at commit time.
LFS_SUFFIXES = (
    ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".npy", ".npz", ".pkl", ".pickle",
    ".parquet", ".arrow", ".zip", ".gz", ".tar", ".png", ".jpg", ".jpeg", ".webp", ".tfevents",
)  # fmt: skip
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024
_REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_REPO_ID = re.compile(rf"^{_NAME}/{_NAME}$")
_OID = re.compile(r"^[0-9a-f]{64}$")
_LFS_POINTER = re.compile(rb"^version https://git-lfs\.github\.com/spec/v1\noid sha256:([0-9a-f]{64})\nsize (\d+)\n$")
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}
# Variables that would send the clients elsewhere than the local hub (cache folders outside HF_HOME, offline mode,
# another token).
_CONFLICTING_VARIABLES = (
    "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_DATASETS_CACHE", "TRANSFORMERS_CACHE", "HF_XET_CACHE",
    "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH",
)  # fmt: skip

_settings: HubSettings | None = None
_shared_hub: LocalHub | None = None
_shared_lock = threading.Lock()


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


def shared_hub() -> LocalHub:
    """Returns this process's `LocalHub`, started on the first call and stopped when the interpreter exits.

    Lets a session fixture in `conftest.py` and a test module's own fixture share one hub on the configured port.
    """
    global _shared_hub
    with _shared_lock:
        if _shared_hub is None:
            _shared_hub = LocalHub(ensure_environment()).start()
        return _shared_hub


class HubError(Exception):
    """A Hub-style error answer: status, `X-Error-Code` and message (also sent as `{"error": message}`)."""

    def __init__(self, status: int, message: str, code: str | None = None, header_message: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.header_message = header_message or message


def _check_repo_id(repo_id: str) -> str:
    if not _REPO_ID.match(repo_id) or ".." in repo_id or repo_id.endswith(".git"):
        raise HubError(400, f"Invalid repo id {repo_id!r}: expected '<org>/<name>' with letters, digits, '.-_'.")
    return repo_id


def _check_path_in_repo(path: str) -> str:
    parts = PurePosixPath(path).parts
    if not parts or path.startswith("/") or ".." in parts or "\\" in path or parts[0] == ".git":
        raise HubError(400, f"Invalid path in repo {path!r}.")
    return str(PurePosixPath(path))


def _lfs_pointer(oid: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n".encode()


def wants_lfs(path: str, size: int, sample: bytes = b"") -> bool:
    """The front server's preupload rule: LFS for binary suffixes, files of 10 MiB or more and non-text samples."""
    return path.lower().endswith(LFS_SUFFIXES) or size >= LFS_SIZE_THRESHOLD or b"\x00" in sample


class _GitStore:
    """The git repositories olah serves and the LFS objects uploaded before their commit."""

    def __init__(self, mirrors: Path, lfs_store: Path):
        self.mirrors = mirrors
        self.lfs_store = lfs_store
        self.lfs_store.mkdir(parents=True, exist_ok=True)
        # One commit at a time: commits rewrite the working tree of their repository.
        self.lock = threading.Lock()

    def repo_dir(self, repo_type: str, repo_id: str) -> Path:
        if repo_type not in _REPO_TYPES.values():
            raise HubError(400, f"Invalid repo type {repo_type!r}: expected one of {sorted(_REPO_TYPES.values())}.")
        return self.mirrors / f"{repo_type}s" / _check_repo_id(repo_id)

    def existing_repo_dir(self, repo_type: str, repo_id: str) -> Path:
        repo_dir = self.repo_dir(repo_type, repo_id)
        if not (repo_dir / ".git").is_dir():
            raise HubError(404, "Repository not found", code="RepoNotFound")
        return repo_dir

    @staticmethod
    def git(repo_dir: Path, *args: str, input: bytes | None = None, check: bool = True) -> bytes:
        identity = ["-c", f"user.name={DEFAULT_USER}", "-c", "user.email=tester@localhost", "-c", "core.quotepath=off"]
        result = subprocess.run(
            ["git", *identity, *args], cwd=repo_dir, input=input, capture_output=True, check=False, timeout=60
        )
        if check and result.returncode != 0:
            raise HubError(500, f"git {' '.join(args)} failed: {result.stderr.decode(errors='replace').strip()}")
        return result.stdout

    def create(self, repo_type: str, repo_id: str) -> bool:
        """Creates the repository with an initial `.gitattributes` commit, as the Hub does; False if it exists."""
        repo_dir = self.repo_dir(repo_type, repo_id)
        with self.lock:
            if (repo_dir / ".git").is_dir():
                return False
            repo_dir.mkdir(parents=True, exist_ok=True)
            self.git(repo_dir, "init", "-q", "-b", "main")
            attributes = "".join(f"*{suffix} filter=lfs diff=lfs merge=lfs -text\n" for suffix in LFS_SUFFIXES)
            (repo_dir / ".gitattributes").write_text(attributes)
            self.git(repo_dir, "add", "-A")
            self.git(repo_dir, "commit", "-q", "-m", "initial commit")
        return True

    def head(self, repo_dir: Path) -> str:
        return self.git(repo_dir, "rev-parse", "HEAD").decode().strip()

    def resolve(self, repo_dir: Path, revision: str) -> str | None:
        out = self.git(repo_dir, "rev-parse", "--verify", "--quiet", f"{revision}^{{commit}}", check=False)
        return out.decode().strip() or None

    def has_path(self, repo_dir: Path, commit: str, path: str) -> bool:
        return bool(self.git(repo_dir, "ls-tree", "--name-only", commit, "--", path.rstrip("/"), check=False))

    def remote_oids(self, repo_dir: Path, paths: Iterable[str]) -> dict[str, str]:
        """OIDs of existing files as `huggingface_hub` computes them locally: sha256 for LFS, git blob sha else."""
        wanted = set(paths)
        oids = {}
        for line in self.git(repo_dir, "ls-tree", "-r", "-l", "-z", "HEAD").split(b"\0"):
            if not line:
                continue
            meta, path = line.decode().split("\t", 1)
            _, kind, blob, size = meta.split()
            if path not in wanted or kind != "blob":
                continue
            oids[path] = blob
            if size.isdigit() and 100 < int(size) < 200:
                match = _LFS_POINTER.match(self.git(repo_dir, "cat-file", "blob", blob))
                if match:
                    oids[path] = match.group(1).decode()
        return oids

    def lfs_path(self, oid: str) -> Path:
        return self.lfs_store / oid

    def put_lfs(self, oid: str, data: bytes) -> None:
        if hashlib.sha256(data).hexdigest() != oid:
            raise HubError(400, f"Uploaded content does not match its sha256 oid {oid}.")
        with tempfile.NamedTemporaryFile(dir=self.lfs_store, delete=False) as handle:
            handle.write(data)
        os.replace(handle.name, self.lfs_path(oid))

    def commit(
        self,
        repo_dir: Path,
        *,
        files: dict[str, bytes],
        lfs_files: dict[str, str],
        deletions: list[str],
        summary: str,
        description: str = "",
        parent: str | None = None,
    ) -> str:
        """Writes the operations into the working tree, commits them on `main` and returns the commit sha.

        Args:
            repo_dir: The repository.
            files: Regular files, path in repo -> content.
            lfs_files: LFS files, path in repo -> sha256 oid of content already in the LFS store.
            deletions: Paths of files or folders (trailing '/') to delete.
            summary: First line of the commit message.
            description: Rest of the commit message.
            parent: Expected current head, as `parentCommit`; a mismatch raises a 412 error.
        """
        for oid in lfs_files.values():
            if not self.lfs_path(oid).is_file():
                raise HubError(
                    400,
                    f"LFS object {oid} was not uploaded: call the LFS batch endpoint and upload it before committing.",
                )
        with self.lock:
            head = self.head(repo_dir)
            if parent is not None and parent != head:
                raise HubError(412, f"A commit has happened since {parent}. Please refresh and try again.")
            for path in deletions:
                target = repo_dir / _check_path_in_repo(path)
                if not target.exists():
                    raise HubError(404, f"A file with this name doesn't exist: {path}", code="EntryNotFound")
            try:
                for path in deletions:
                    target = repo_dir / _check_path_in_repo(path)
                    if target.is_dir():
                        shutil.rmtree(target)
                    else:
                        target.unlink()
                for path, content in files.items():
                    self._write(repo_dir / _check_path_in_repo(path), content)
                for path, oid in lfs_files.items():
                    size = self.lfs_path(oid).stat().st_size
                    self._write(repo_dir / _check_path_in_repo(path), _lfs_pointer(oid, size))
                    stored = repo_dir / ".git" / "lfs" / "objects" / oid[:2] / oid[2:4] / oid
                    if not stored.exists():
                        stored.parent.mkdir(parents=True, exist_ok=True)
                        shutil.copyfile(self.lfs_path(oid), stored)
                self.git(repo_dir, "add", "-A")
                message = summary if not description else f"{summary}\n\n{description}"
                self.git(repo_dir, "commit", "-q", "--allow-empty", "-F", "-", input=message.encode())
            except BaseException:
                self.git(repo_dir, "reset", "-q", "--hard", head, check=False)
                self.git(repo_dir, "clean", "-q", "-fd", check=False)
                raise
            return self.head(repo_dir)

    @staticmethod
    def _write(target: Path, content: bytes) -> None:
        if target.is_dir():
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)


class LocalHub:
    """Olah and the front server, on 127.0.0.1, serving the repositories under `settings.mirrors`.

    Use as a context manager, or `start()` / `stop()`. Any non-empty bearer token is accepted for writes unless
    `token` is given; requests without one get 401.

    Args:
        settings: From `configure_environment`.
        token: The only token to accept for writes (and whoami); None accepts any non-empty token.
        user: Name `whoami` returns, and the namespace of repos created without an organization.
        start_timeout: Seconds to wait for olah to answer.
    """

    def __init__(
        self, settings: HubSettings, token: str | None = None, user: str = DEFAULT_USER, start_timeout: float = 20.0
    ):
        self.settings = settings
        self.token = token
        self.user = user
        self.start_timeout = start_timeout
        self.store = _GitStore(settings.mirrors, settings.root / "lfs-store")
        self.olah_port: int | None = None
        self._olah: subprocess.Popen | None = None
        self._olah_output: Any = None
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.logger = logging.getLogger(f"{__name__}.{settings.port}")

    @property
    def url(self) -> str:
        """The endpoint, `http://127.0.0.1:<port>` (equal to `HF_ENDPOINT`)."""
        return self.settings.endpoint

    def __enter__(self) -> LocalHub:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> LocalHub:
        """Starts olah and the front server and waits until olah answers; returns self."""
        if self._server is not None:
            raise RuntimeError("LocalHub is already running.")
        self.settings.logs.mkdir(parents=True, exist_ok=True)
        self._setup_logging()
        try:
            self._start_olah()
            self._server = _FrontServer(("127.0.0.1", self.settings.port), _FrontHandler, self)
            self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
            self._thread.start()
            self._wait_for_olah()
        except BaseException:
            self.stop()
            raise
        atexit.register(self.stop)  # a script that dies on an exception must not leave olah running
        self.logger.info("local hub ready at %s (olah on port %s)", self.url, self.olah_port)
        return self

    def stop(self) -> None:
        """Stops both servers; safe to call twice."""
        atexit.unregister(self.stop)
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._olah is not None:
            self._olah.terminate()
            try:
                self._olah.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._olah.kill()
                self._olah.wait(timeout=5)
            self._olah = None
        if self._olah_output is not None:
            self._olah_output.close()
            self._olah_output = None
        for handler in list(self.logger.handlers):
            self.logger.removeHandler(handler)
            handler.close()

    def _setup_logging(self) -> None:
        handler = logging.FileHandler(self.settings.logs / "front.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        self.logger.addHandler(handler)
        self.logger.setLevel(logging.INFO)
        self.logger.propagate = False

    def _start_olah(self) -> None:
        self.olah_port = free_port()
        dead = f"127.0.0.1:{free_port()}"  # nothing listens there: olah's upstream calls fail at once
        netloc = urllib.parse.urlsplit(self.url).netloc
        config = {
            "host": "127.0.0.1",
            "port": self.olah_port,
            "repos-path": str(self.settings.root / "olah-cache"),
            "hf-scheme": "http",
            "hf-netloc": dead,
            "hf-lfs-netloc": dead,
            "mirror-scheme": "http",
            "mirror-netloc": netloc,
            "mirror-lfs-netloc": netloc,
        }
        lines = ["[basic]", *(f"{key} = {json.dumps(value)}" for key, value in config.items())]
        lines += [
            f"mirrors-path = [{json.dumps(str(self.settings.mirrors))}]",
            "",
            "[accessibility]",
            "offline = true",
        ]
        config_path = self.settings.root / "olah.toml"
        config_path.write_text("\n".join(lines) + "\n")
        self._olah_output = open(self.settings.logs / "olah.out", "ab")
        command = [sys.executable, "-m", "olah.server", "-c", str(config_path), "--log-path", str(self.settings.logs)]
        self._olah = subprocess.Popen(
            command,
            cwd=self.settings.root,
            stdout=self._olah_output,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )

    def _wait_for_olah(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self._olah.poll() is not None:
                break
            try:
                connection = http.client.HTTPConnection("127.0.0.1", self.olah_port, timeout=2)
                connection.request("GET", READINESS_PROBE)
                status = connection.getresponse().status
                connection.close()
                if status < 500:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        log = (self.settings.logs / "olah.out").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"olah did not answer on port {self.olah_port} (exit code {self._olah.poll()}):\n{log}")

    def repo_dir(self, repo_id: str, repo_type: str = "model") -> Path:
        """The git repository of `repo_id` (which may not exist yet)."""
        return self.store.repo_dir(repo_type, repo_id)

    def seed_model_repo(self, repo_id: str, folder: Path | str) -> str:
        """Commits the files of `folder` to model repo `repo_id` (created if missing); returns the commit sha.

        Files already in the repo and absent from `folder` are kept. Files matching the preupload LFS rule are stored
        as LFS objects, as an upload would store them.
        """
        return self._seed("model", repo_id, Path(folder))

    def seed_dataset_repo(self, repo_id: str, folder: Path | str) -> str:
        """Commits the files of `folder` to dataset repo `repo_id` (created if missing); returns the commit sha.

        Raises:
            ValueError: If neither `folder` nor the repo has a README.md (olah and `load_dataset` need one).
        """
        folder = Path(folder)
        if not (folder / "README.md").is_file() and not (self.repo_dir(repo_id, "dataset") / "README.md").is_file():
            raise ValueError(f"{folder} has no README.md: a dataset repo without one is not found by load_dataset.")
        return self._seed("dataset", repo_id, folder)

    def _seed(self, repo_type: str, repo_id: str, folder: Path) -> str:
        if not folder.is_dir():
            raise ValueError(f"{folder} is not a folder.")
        self.store.create(repo_type, repo_id)
        files, lfs_files = {}, {}
        for path in sorted(p for p in folder.rglob("*") if p.is_file() and ".git" not in p.relative_to(folder).parts):
            name = path.relative_to(folder).as_posix()
            content = path.read_bytes()
            if wants_lfs(name, len(content), content[:512]):
                oid = hashlib.sha256(content).hexdigest()
                self.store.put_lfs(oid, content)
                lfs_files[name] = oid
            else:
                files[name] = content
        repo_dir = self.store.existing_repo_dir(repo_type, repo_id)
        return self.store.commit(
            repo_dir, files=files, lfs_files=lfs_files, deletions=[], summary=f"Seed {folder.name}"
        )


class _FrontServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], hub: LocalHub):
        self.hub = hub
        super().__init__(address, handler)


_API = r"/api/(?P<type>models|datasets|spaces)/(?P<repo>[^/]+/[^/]+)"
_RESOLVE = re.compile(r"^/(?:(?P<type>datasets|spaces)/)?(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
_REPO_INFO = re.compile(rf"^{_API}$")
_READ_API = re.compile(rf"^{_API}/(?P<kind>revision|tree|paths-info)/(?P<rev>[^/]+)(?:/(?P<path>.*))?$")


class _FrontHandler(BaseHTTPRequestHandler):
    """Answers the write API itself and forwards reads to olah (fixing up its errors for missing files)."""

    protocol_version = "HTTP/1.1"
    server: _FrontServer

    routes = [
        ("POST", re.compile(r"^/api/repos/create$"), "create_repo"),
        ("GET", re.compile(r"^/api/whoami-v2$"), "whoami"),
        ("POST", re.compile(r"^/api/validate-yaml$"), "validate_yaml"),
        ("POST", re.compile(rf"^{_API}/preupload/(?P<rev>[^/]+)$"), "preupload"),
        ("POST", re.compile(rf"^{_API}/commit/(?P<rev>[^/]+)$"), "commit"),
        ("POST", re.compile(r"^/(?:(?P<type>datasets|spaces)/)?(?P<repo>[^/]+/[^/]+)\.git/info/lfs/objects/batch$"),
         "lfs_batch"),
        ("PUT", re.compile(r"^/lfs-upload/(?P<oid>[0-9a-f]{64})$"), "lfs_upload"),
        # olah lists commit authors as {"name": ...}; huggingface_hub reads {"user": ...}.
        ("GET", re.compile(rf"^{_API}/commits/(?P<rev>[^/]+)$"), "commits"),
    ]  # fmt: skip

    @property
    def hub(self) -> LocalHub:
        return self.server.hub

    def log_message(self, format: str, *args: Any) -> None:
        self.hub.logger.info("%s %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def do_PATCH(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        path = urllib.parse.urlsplit(self.path).path
        try:
            body = self._read_body()
            for method, pattern, name in self.routes:
                match = pattern.match(path)
                if match and method == self.command:
                    getattr(self, f"_{name}")(match, body)
                    return
            if self.command in ("GET", "HEAD") or (self.command == "POST" and "/paths-info/" in path):
                self._forward(path, body)
                return
            raise HubError(501, f"LocalHub does not implement {self.command} {path}.")
        except HubError as error:
            self.hub.logger.info("%s %s -> %s %s", self.command, self.path, error.status, error.message)
            self._send_error(error)
        except Exception as error:  # a bug here must reach the client as a 500, not a dropped connection
            self.hub.logger.exception("%s %s failed", self.command, self.path)
            self._send_error(HubError(500, f"LocalHub internal error: {error!r}"))

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        headers = {"Content-Type": "application/json", **(headers or {})}
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(self, payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), headers)

    def _send_error(self, error: HubError) -> None:
        headers = {"X-Error-Message": error.header_message}
        if error.code:
            headers["X-Error-Code"] = error.code
        self._send_json({"error": error.message}, error.status, headers)

    def _json(self, body: bytes) -> Any:
        try:
            return json.loads(body)
        except ValueError as error:
            raise HubError(400, f"Request body is not JSON: {error}") from error

    def _authorize(self) -> str:
        header = self.headers.get("Authorization", "")
        if not header.startswith("Bearer ") or not header[len("Bearer ") :].strip():
            raise HubError(
                401,
                "Missing token: send `Authorization: Bearer <token>` (set HF_TOKEN or pass token=...).",
                header_message="Invalid credentials in Authorization header",
            )
        token = header[len("Bearer ") :].strip()
        if self.hub.token is not None and token != self.hub.token:
            raise HubError(401, "Invalid credentials in Authorization header")
        return token

    def _repo(self, match: re.Match, default_type: str = "models") -> tuple[str, str, Path]:
        repo_type = _REPO_TYPES[match.group("type") or default_type]
        repo_id = urllib.parse.unquote(match.group("repo"))
        return repo_type, repo_id, self.hub.store.existing_repo_dir(repo_type, repo_id)

    def _main_only(self, match: re.Match) -> None:
        revision = urllib.parse.unquote(match.group("rev"))
        if revision != "main":
            raise HubError(404, f"LocalHub only commits to main, not {revision!r}.", code="RevisionNotFound")
        if "create_pr=1" in urllib.parse.urlsplit(self.path).query:
            raise HubError(400, "LocalHub does not support create_pr.")

    def _repo_url(self, repo_type: str, repo_id: str) -> str:
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        return f"{self.hub.url}/{prefix}{repo_id}"

    def _create_repo(self, match: re.Match, body: bytes) -> None:
        self._authorize()
        payload = self._json(body)
        repo_type = payload.get("type") or "model"
        name = payload.get("name")
        if not isinstance(name, str) or not name:
            raise HubError(400, "Missing repo name.")
        repo_id = f"{payload.get('organization') or self.hub.user}/{name}"
        url = self._repo_url(repo_type, repo_id)
        if not self.hub.store.create(repo_type, repo_id):
            self._send_json({"error": f"You already created this {repo_type} repo", "url": url}, 409)
            return
        self._send_json({"url": url, "name": repo_id, "id": repo_id})

    def _whoami(self, match: re.Match, body: bytes) -> None:
        self._authorize()
        self._send_json(
            {
                "type": "user",
                "id": "0" * 24,
                "name": self.hub.user,
                "fullname": "hf_aace local tester",
                "email": "tester@localhost",
                "emailVerified": True,
                "isPro": False,
                "canPay": False,
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"displayName": "local", "role": "write"}},
            }
        )

    def _validate_yaml(self, match: re.Match, body: bytes) -> None:
        content = self._json(body).get("content", "")
        found = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", content, flags=re.S)
        errors = []
        if found:
            try:
                metadata = yaml.safe_load(found.group(1))
            except yaml.YAMLError as error:
                errors.append({"message": f"Invalid YAML in the metadata block: {error}"})
            else:
                if metadata is not None and not isinstance(metadata, dict):
                    errors.append({"message": "The metadata block must be a YAML mapping."})
        self._send_json({"errors": errors, "warnings": []}, 400 if errors else 200)

    def _preupload(self, match: re.Match, body: bytes) -> None:
        self._authorize()
        _, _, repo_dir = self._repo(match)
        self._main_only(match)
        files = self._json(body).get("files", [])
        remote = self.hub.store.remote_oids(repo_dir, (entry["path"] for entry in files))
        answer = []
        for entry in files:
            sample = base64.b64decode(entry.get("sample", ""))
            mode = "lfs" if wants_lfs(entry["path"], int(entry.get("size", 0)), sample) else "regular"
            answer.append(
                {"path": entry["path"], "uploadMode": mode, "shouldIgnore": False, "oid": remote.get(entry["path"])}
            )
        self._send_json({"files": answer, "commitOid": self.hub.store.head(repo_dir)})

    def _commit(self, match: re.Match, body: bytes) -> None:
        self._authorize()
        repo_type, repo_id, repo_dir = self._repo(match)
        self._main_only(match)
        header: dict[str, Any] = {}
        files: dict[str, bytes] = {}
        lfs_files: dict[str, str] = {}
        deletions: list[str] = []
        for line in body.splitlines():
            if not line.strip():
                continue
            item = self._json(line)
            key, value = item.get("key"), item.get("value", {})
            if key == "header":
                header = value
            elif key == "file":
                if value.get("encoding", "base64") != "base64":
                    raise HubError(400, f"Unsupported encoding {value.get('encoding')!r} for {value.get('path')}.")
                try:
                    files[_check_path_in_repo(value["path"])] = base64.b64decode(value["content"], validate=True)
                except binascii.Error as error:
                    raise HubError(400, f"Invalid base64 content for {value['path']}: {error}") from error
            elif key == "lfsFile":
                if not _OID.match(str(value.get("oid", ""))) or value.get("algo", "sha256") != "sha256":
                    raise HubError(400, f"Invalid LFS oid for {value.get('path')}.")
                lfs_files[_check_path_in_repo(value["path"])] = value["oid"]
            elif key in ("deletedFile", "deletedFolder"):
                deletions.append(value["path"])
            else:
                raise HubError(400, f"LocalHub does not support commit operation {key!r}.")
        if not header.get("summary"):
            raise HubError(400, "The commit header needs a summary.")
        oid = self.hub.store.commit(
            repo_dir,
            files=files,
            lfs_files=lfs_files,
            deletions=deletions,
            summary=header["summary"],
            description=header.get("description", ""),
            parent=header.get("parentCommit"),
        )
        self.hub.logger.info("commit %s to %s %s: %s", oid, repo_type, repo_id, sorted({*files, *lfs_files}))
        url = f"{self._repo_url(repo_type, repo_id)}/commit/{oid}"
        self._send_json({"success": True, "commitOid": oid, "commitUrl": url, "hookOutput": ""})

    def _commits(self, match: re.Match, body: bytes) -> None:
        _, _, repo_dir = self._repo(match)
        revision = urllib.parse.unquote(match.group("rev"))
        commit = self.hub.store.resolve(repo_dir, revision)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")
        log = self.hub.store.git(repo_dir, "log", "-z", "--format=%H%x1f%an%x1f%at%x1f%s%x1f%b", commit)
        commits = []
        for record in log.decode().split("\0"):
            if record.strip():
                sha, author, timestamp, title, message = record.split("\x1f")
                date = datetime.fromtimestamp(int(timestamp), timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
                authors = [{"user": author, "avatar": None}]
                commits.append({"id": sha, "title": title, "message": message, "authors": authors, "date": date})
        self._send_json(commits)

    def _lfs_batch(self, match: re.Match, body: bytes) -> None:
        self._authorize()
        self._repo(match)
        payload = self._json(body)
        if payload.get("operation") != "upload":
            raise HubError(400, "LocalHub's LFS batch endpoint only handles uploads; downloads go through resolve.")
        objects = []
        for entry in payload.get("objects", []):
            oid, size = str(entry.get("oid", "")), entry.get("size")
            answer: dict[str, Any] = {"oid": oid, "size": size}
            if not _OID.match(oid) or not isinstance(size, int):
                answer["error"] = {"code": 422, "message": "Invalid oid or size."}
            elif not self.hub.store.lfs_path(oid).is_file():
                answer["authenticated"] = True
                answer["actions"] = {"upload": {"href": f"{self.hub.url}/lfs-upload/{oid}", "header": {}}}
            objects.append(answer)
        self._send_json(
            {"transfer": "basic", "objects": objects}, headers={"Content-Type": "application/vnd.git-lfs+json"}
        )

    def _lfs_upload(self, match: re.Match, body: bytes) -> None:
        # Like the Hub's pre-signed storage URLs, this one takes no Authorization header.
        self.hub.store.put_lfs(match.group("oid"), body)
        self._send(200, b"", {"ETag": f'"{match.group("oid")}"'})

    def _forward(self, path: str, body: bytes) -> None:
        target = self.path
        if _REPO_INFO.match(path):
            # Olah asks the (dead) upstream Hub for repo info without a revision; the Hub answers for `main`.
            split = urllib.parse.urlsplit(self.path)
            target = urllib.parse.urlunsplit(split._replace(path=f"{split.path}/revision/main"))
        headers = {key: value for key, value in self.headers.items() if key.lower() not in _HOP_BY_HOP}
        if body:
            headers["Content-Length"] = str(len(body))
        connection = http.client.HTTPConnection("127.0.0.1", self.hub.olah_port, timeout=60)
        try:
            connection.request(self.command, target, body=body or None, headers=headers)
            response = connection.getresponse()
            data = response.read()
            status = response.status
            response_headers = [(k, v) for k, v in response.getheaders() if k.lower() not in _HOP_BY_HOP]
        finally:
            connection.close()
        if status >= 400:
            error = self._missing_entry_error(path)
            if error is not None:
                self.hub.logger.info("olah answered %s for %s: %s", status, self.path, error.message)
                raise error
        self.send_response(status)
        for key, value in response_headers:
            if key.lower() not in ("content-length", "server", "date"):
                self.send_header(key, value)
        length = dict((k.lower(), v) for k, v in response_headers).get("content-length", "0")
        self.send_header("Content-Length", length if self.command == "HEAD" else str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _missing_entry_error(self, path: str) -> HubError | None:
        """The Hub's answer for a missing revision or file of an existing repo (olah answers 401 or 500 there)."""
        match = _RESOLVE.match(path) or _READ_API.match(path)
        if match is None:
            return None
        try:
            _, _, repo_dir = self._repo(match)
        except HubError:
            return None
        revision = urllib.parse.unquote(match.group("rev"))
        commit = self.hub.store.resolve(repo_dir, revision)
        if commit is None:
            return HubError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")
        entry = match.groupdict().get("path")
        if entry and not self.hub.store.has_path(repo_dir, commit, urllib.parse.unquote(entry)):
            return HubError(404, "Entry not found", code="EntryNotFound")
        return None
