"""`LocalHub`: olah and the front server on 127.0.0.1, and the one hub a test process shares."""

from __future__ import annotations

import atexit
import hashlib
import http.client
import json
import logging
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path
from types import TracebackType
from typing import Any

import uvicorn

from .app import create_app
from .environment import DEFAULT_USER, HubSettings, ensure_environment, free_port
from .store import GitStore, wants_lfs

READINESS_PROBE = "/api/models/hf-aace-local/readiness-probe/revision/main"

_shared_hub: LocalHub | None = None
_shared_lock = threading.Lock()


def shared_hub() -> LocalHub:
    """Returns this process's `LocalHub`, started on the first call and stopped when the interpreter exits.

    Lets a session fixture in `conftest.py` and a test module's own fixture share one hub on the configured port.
    """
    global _shared_hub
    with _shared_lock:
        if _shared_hub is None:
            _shared_hub = LocalHub(ensure_environment()).start()
        return _shared_hub


class LocalHub:
    """Olah and the front server, on 127.0.0.1, serving the repositories under `settings.mirrors`.

    Use as a context manager, or `start()` / `stop()`. Any non-empty bearer token is accepted for writes unless
    `token` is given; requests without one get 401.

    Args:
        settings: From `configure_environment`.
        token: The only token to accept for writes (and whoami); None accepts any non-empty token.
        user: Name `whoami` returns, and the namespace of repos created without an organization.
        start_timeout: Seconds to wait for each server to answer.
    """

    def __init__(
        self, settings: HubSettings, token: str | None = None, user: str = DEFAULT_USER, start_timeout: float = 20.0
    ):
        self.settings = settings
        self.token = token
        self.user = user
        self.start_timeout = start_timeout
        self.store = GitStore(settings.mirrors, settings.root / "lfs-store")
        self.olah_port: int | None = None
        self._olah: subprocess.Popen | None = None
        self._olah_output: Any = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.logger = logging.getLogger(f"local_hub.{settings.port}")

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
        """Starts olah and the front server and waits until both answer; returns self."""
        if self._server is not None:
            raise RuntimeError("LocalHub is already running.")
        self.settings.logs.mkdir(parents=True, exist_ok=True)
        self._setup_logging()
        try:
            self._start_olah()
            self._start_front_server()
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
            self._server.should_exit = True  # uvicorn checks it every 0.1 s, then closes its connections
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=10)
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

    def _start_front_server(self) -> None:
        """Serves the front application with uvicorn in a daemon thread; returns once it accepts connections.

        Uvicorn installs signal handlers only in the main thread, so the process's Ctrl-C handling is untouched.
        """
        config = uvicorn.Config(
            create_app(self),
            host="127.0.0.1",
            port=self.settings.port,
            lifespan="off",
            access_log=False,  # the application logs every request to front.log
            log_config=None,  # leave the process's logging configuration alone
            log_level="warning",
            timeout_graceful_shutdown=5,
        )
        server = self._server = uvicorn.Server(config)
        failure: list[BaseException] = []

        def serve() -> None:
            try:
                server.run()
            except BaseException as error:  # uvicorn logs why it cannot serve (e.g. the port is taken), then exits
                failure.append(error.__context__ or error)

        self._thread = threading.Thread(target=serve, name=f"local-hub-{self.settings.port}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + self.start_timeout
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                reason = f": {failure[0]}" if failure else ""
                raise RuntimeError(f"the front server did not start on port {self.settings.port}{reason}")
            time.sleep(0.01)

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
