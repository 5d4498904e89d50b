"""The git repositories the local hub serves, and the LFS objects uploaded before their commit.

LFS files are stored as git-lfs pointer files whose content lives in `.git/lfs/objects`, the layout olah reads.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

from .environment import DEFAULT_USER

# Files the front server asks clients to send through LFS whatever their size. `datasets` deletes its temporary
# parquet files before the commit, so they must be uploaded (LFS) during preupload rather than inlined at commit time.
LFS_SUFFIXES = (
    ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".npy", ".npz", ".pkl", ".pickle",
    ".parquet", ".arrow", ".zip", ".gz", ".tar", ".png", ".jpg", ".jpeg", ".webp", ".tfevents",
)  # fmt: skip
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024
REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_REPO_ID = re.compile(rf"^{_NAME}/{_NAME}$")
OID = re.compile(r"^[0-9a-f]{64}$")
_LFS_POINTER = re.compile(rb"^version https://git-lfs\.github\.com/spec/v1\noid sha256:([0-9a-f]{64})\nsize (\d+)\n$")


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


def check_path_in_repo(path: str) -> str:
    """Returns `path` normalised; a 400 error for an empty or absolute path, `..`, a backslash or `.git`."""
    parts = PurePosixPath(path).parts
    if not parts or path.startswith("/") or ".." in parts or "\\" in path or parts[0] == ".git":
        raise HubError(400, f"Invalid path in repo {path!r}.")
    return str(PurePosixPath(path))


def _lfs_pointer(oid: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n".encode()


def wants_lfs(path: str, size: int, sample: bytes = b"") -> bool:
    """The front server's preupload rule: LFS for binary suffixes, files of 10 MiB or more and non-text samples."""
    return path.lower().endswith(LFS_SUFFIXES) or size >= LFS_SIZE_THRESHOLD or b"\x00" in sample


class GitStore:
    """The git repositories olah serves and the LFS objects uploaded before their commit."""

    def __init__(self, mirrors: Path, lfs_store: Path):
        self.mirrors = mirrors
        self.lfs_store = lfs_store
        self.lfs_store.mkdir(parents=True, exist_ok=True)
        # One commit at a time: commits rewrite the working tree of their repository.
        self.lock = threading.Lock()

    def repo_dir(self, repo_type: str, repo_id: str) -> Path:
        if repo_type not in REPO_TYPES.values():
            raise HubError(400, f"Invalid repo type {repo_type!r}: expected one of {sorted(REPO_TYPES.values())}.")
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
                target = repo_dir / check_path_in_repo(path)
                if not target.exists():
                    raise HubError(404, f"A file with this name doesn't exist: {path}", code="EntryNotFound")
            try:
                for path in deletions:
                    target = repo_dir / check_path_in_repo(path)
                    if target.is_dir():
                        shutil.rmtree(target)
                    else:
                        target.unlink()
                for path, content in files.items():
                    self._write(repo_dir / check_path_in_repo(path), content)
                for path, oid in lfs_files.items():
                    size = self.lfs_path(oid).stat().st_size
                    self._write(repo_dir / check_path_in_repo(path), _lfs_pointer(oid, size))
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
