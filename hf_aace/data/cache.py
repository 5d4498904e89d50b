"""The on-disk cache of decoded datasets: one safetensors file per dataset and preparation, written atomically.

The file is laid out before any tensor is known in full (8-byte header length, JSON header, zero-filled data), so
decoding processes can write their rows straight into it; it replaces the cache entry only once complete. Reading it
back maps the file instead of copying it, so a cache larger than RAM can serve training.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import shutil
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from huggingface_hub import constants as hub_constants
from safetensors import SafetensorError, safe_open
from transformers.utils import logging

logger = logging.get_logger(__name__)

# Bump when the decoded tensors or the statistics would change for the same inputs; old cache files are then ignored.
_CACHE_FORMAT = 1
# The safetensors names of the dtypes the cache holds.
_DTYPE_NAMES = {torch.uint8: "U8", torch.int64: "I64", torch.float64: "F64"}


@dataclass(frozen=True)
class TensorSlot:
    """Where one tensor's bytes lie in a cache file being written; picklable, so worker processes can fill it.

    Attributes:
        path: the file being written.
        offset: the byte offset of the tensor's first element in the file.
        dtype: the tensor's dtype.
        shape: the tensor's shape; rows are its first dimension.
    """

    path: Path
    offset: int
    dtype: torch.dtype
    shape: tuple[int, ...]

    def write_rows(self, start: int, rows: np.ndarray | torch.Tensor) -> None:
        """Writes `rows` (of the slot's dtype and row shape) as the tensor's rows from `start` on.

        The bytes go through the page cache with ordinary writes, not a writable mapping, so writing a file larger
        than RAM does not grow the writer's resident memory.
        """
        rows = rows.numpy() if isinstance(rows, torch.Tensor) else rows
        if rows.dtype != torch.empty(0, dtype=self.dtype).numpy().dtype or tuple(rows.shape[1:]) != self.shape[1:]:
            raise ValueError(
                f"Rows of dtype {rows.dtype} and shape {tuple(rows.shape[1:])} do not fit a tensor of dtype "
                f"{self.dtype} and shape {self.shape}; pass rows of that dtype and row shape."
            )
        if start < 0 or start + len(rows) > self.shape[0]:
            raise ValueError(
                f"Rows {start}..{start + len(rows) - 1} are outside the {self.shape[0]} rows of the tensor; write "
                f"rows 0..{self.shape[0] - 1} only."
            )
        row_bytes = math.prod(self.shape[1:]) * self.dtype.itemsize
        with open(self.path, "r+b") as file:
            file.seek(self.offset + start * row_bytes)
            file.write(np.ascontiguousarray(rows).data)


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

    def load(self) -> tuple[dict[str, torch.Tensor], list[str]]:
        """The cached tensors and class names.

        The tensors are private memory maps of the file (safetensors' own CPU path), not copies: pages are read from
        disk as training touches them and the kernel may drop them again, so the file may be larger than RAM.
        """
        with safe_open(self.path, framework="pt") as cache:
            label_names = json.loads(cache.metadata()["label_names"])
            tensors = {name: cache.get_tensor(name) for name in cache.keys()}
        return tensors, label_names

    def read(self) -> tuple[dict[str, torch.Tensor], list[str]] | None:
        """[`~DecodedCache.load`], or None when the file is missing or unreadable (then with a warning)."""
        if not self.path.exists():
            return None
        try:
            return self.load()
        except (SafetensorError, OSError, ValueError, KeyError) as error:
            # A run killed while writing, a full disk or a bad copy: decoding again replaces the file.
            logger.warning(f"The decoded-dataset cache {self.path} is unreadable ({error}); decoding again.")
            return None

    def write(self, tensors: dict[str, torch.Tensor], label_names: list[str]) -> None:
        """Stores the tensors and class names, replacing the file in one step."""
        specs = {name: (tensor.dtype, tuple(tensor.shape)) for name, tensor in tensors.items()}
        with self.writing(specs, label_names) as slots:
            for name, tensor in tensors.items():
                slots[name].write_rows(0, tensor.contiguous().reshape(-1, *tensor.shape[1:]))

    @contextlib.contextmanager
    def writing(
        self, specs: dict[str, tuple[torch.dtype, tuple[int, ...]]], label_names: list[str]
    ) -> Iterator[dict[str, TensorSlot]]:
        """Lays out a zero-filled safetensors file for tensors of the given dtypes and shapes, to be filled in.

        The file is written under a temporary name in the cache folder and replaces the cache entry in one step when
        the block ends without an error; on an error (or an interrupt) it is removed, so a failed decode leaves
        nothing a later run would read.

        Args:
            specs: the dtype and shape of each tensor, by name.
            label_names: the class names, stored in the metadata.

        Yields:
            A [`TensorSlot`] per tensor name, where its bytes are to be written.
        """
        # The 8-byte dtypes first: every tensor then starts at an offset aligned for its dtype.
        ordered = sorted(specs.items(), key=lambda item: -item[1][0].itemsize)
        header, end = {}, 0
        for name, (dtype, shape) in ordered:
            begin, end = end, end + math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [begin, end]}
        metadata = {"label_names": json.dumps(label_names), "key": json.dumps(self.key, sort_keys=True)}
        encoded = json.dumps({"__metadata__": metadata, **header}, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # safetensors pads the header with spaces so the data is aligned
        data_start = 8 + len(encoded)

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._check_room(data_start + end)
        temporary = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        try:
            with open(temporary, "wb") as file:
                file.write(struct.pack("<Q", len(encoded)) + encoded)
                file.truncate(data_start + end)  # zero-filled without writing the zeros
            yield {
                name: TensorSlot(temporary, data_start + header[name]["data_offsets"][0], dtype, tuple(shape))
                for name, (dtype, shape) in specs.items()
            }
            # Atomic rename: concurrent processes (one per GPU) never read a half-written file.
            os.replace(temporary, self.path)
        finally:
            temporary.unlink(missing_ok=True)

    def _check_room(self, size: int) -> None:
        """Refuses to start a decode whose file cannot fit, and points at temporary files left by killed runs."""
        leftovers = sorted(self.path.parent.glob(f"{self.path.name}.*.tmp"))
        if leftovers:
            logger.warning(
                f"Found {', '.join(str(path) for path in leftovers)}: left by a decode that was killed, or being "
                "written by another process now; delete them once no process is decoding this dataset."
            )
        free = shutil.disk_usage(self.path.parent).free
        if free < size:
            raise OSError(
                errno.ENOSPC,
                f"The decoded dataset needs {size / 2**30:.2f} GiB but {self.path.parent} has {free / 2**30:.2f} GiB "
                "free; free some space or pass cache_dir (scripts: --cache_dir) on a disk with room.",
            )
