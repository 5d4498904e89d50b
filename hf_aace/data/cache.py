"""The on-disk cache of decoded datasets: one safetensors file per dataset and preparation, written atomically."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import constants as hub_constants
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from transformers.utils import logging

logger = logging.get_logger(__name__)

# Bump when the decoded tensors or the statistics would change for the same inputs; old cache files are then ignored.
_CACHE_FORMAT = 1


@dataclass(frozen=True)
class DecodedCache:
    """The cache file of one decoded dataset.

    Attributes:
        path: the safetensors file holding the tensors, with the class names and the key in its metadata.
        key: everything the decoded tensors depend on; the file name holds its digest.
    """

    path: Path
    key: dict[str, Any]

    @classmethod
    def locate(cls, cache_dir: str | os.PathLike | None, dataset_id: str, **key: Any) -> DecodedCache:
        """The cache file of `dataset_id` decoded with the settings in `key` (JSON-serialisable values).

        Args:
            cache_dir: the cache directory; None: `$HF_HOME/hf_aace`.
            dataset_id: the dataset's id, readable at the start of the file name.
            **key: the inputs and settings the decoded tensors depend on.
        """
        key = {"format": _CACHE_FORMAT, **key}
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
        root = Path(cache_dir) if cache_dir is not None else Path(hub_constants.HF_HOME) / "hf_aace"
        stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in dataset_id)[-60:]
        return cls(root / f"{stem}-{digest}.safetensors", key)

    def read(self) -> tuple[dict[str, torch.Tensor], list[str]] | None:
        """The cached tensors and class names, or None when the file is missing or unreadable (then with a warning)."""
        if not self.path.exists():
            return None
        try:
            with safe_open(self.path, framework="pt") as cache:
                label_names = json.loads(cache.metadata()["label_names"])
                tensors = {name: cache.get_tensor(name) for name in cache.keys()}
        except (SafetensorError, OSError, ValueError, KeyError) as error:
            # A run killed while writing, a full disk or a bad copy: decoding again replaces the file.
            logger.warning(f"The decoded-dataset cache {self.path} is unreadable ({error}); decoding again.")
            return None
        return tensors, label_names

    def write(self, tensors: dict[str, torch.Tensor], label_names: list[str]) -> None:
        """Stores the tensors and class names, replacing the file in one step."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        metadata = {"label_names": json.dumps(label_names), "key": json.dumps(self.key, sort_keys=True)}
        save_file(tensors, temporary, metadata=metadata)
        # Atomic rename: concurrent processes (one per GPU) never read a half-written file.
        os.replace(temporary, self.path)
