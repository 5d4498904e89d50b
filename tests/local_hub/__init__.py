"""A Hugging Face Hub on 127.0.0.1 for offline tests: downloads served by olah, uploads by a small front server.

The clients (`huggingface_hub`, `transformers`, `datasets`) read `HF_ENDPOINT` once, when they are imported, so the
environment has to be configured first (`configure_environment` or `ensure_environment`, called by `conftest.py` at
import time). `LocalHub` then starts two servers:

* olah (a Hub mirror, run as a subprocess in offline mode) serves the git repositories under `<root>/mirrors` with the
  real download API: `/api/{type}s/{repo}/revision/...`, `tree`, `paths-info`, `/{repo}/resolve/...`.
* the front server (a Starlette application under uvicorn, in a thread) listens on `HF_ENDPOINT`. It implements the
  write API that `create_repo`, `create_commit`, `upload_folder`, `whoami`, `ModelCard.push_to_hub` and transformers'
  `push_to_hub` call, committing into the same git repositories, and forwards every read request to olah. Olah reads
  the git repositories on each request, so a commit is downloadable as soon as it is answered.

Modules: `environment` (settings and client environment), `store` (git repositories and LFS objects), `app` (the
front server's routes), `server` (`LocalHub` and `shared_hub`).
"""

from .environment import (
    DEFAULT_TOKEN,
    DEFAULT_USER,
    HubSettings,
    configure_environment,
    dead_endpoint,
    ensure_environment,
    free_port,
)
from .server import READINESS_PROBE, LocalHub, shared_hub
from .store import LFS_SIZE_THRESHOLD, LFS_SUFFIXES, HubError, wants_lfs

__all__ = [
    "DEFAULT_TOKEN",
    "DEFAULT_USER",
    "LFS_SIZE_THRESHOLD",
    "LFS_SUFFIXES",
    "READINESS_PROBE",
    "HubError",
    "HubSettings",
    "LocalHub",
    "configure_environment",
    "dead_endpoint",
    "ensure_environment",
    "free_port",
    "shared_hub",
    "wants_lfs",
]
