"""Arrays by content key, as files under one folder or URI prefix: the judgement cache
(per-image correctness of whole models) and the point cache (validation accuracy of mixing
points). numpy and pyarrow only, so that Tune's trial processes can read it without
importing torch.

A key names its content, so writers of one key (nodes sharing the cache) write the same
bytes: each write is whole or absent (a local rename; one object PUT on object storage),
and the last one wins harmlessly."""

from __future__ import annotations

import io
import logging
import os
from functools import cached_property
from pathlib import Path

import numpy as np

from .inputs import storage

logger = logging.getLogger(__name__)


class KeyedArrays:
    def __init__(self, root: Path | str):
        self.root = str(root)

    @cached_property
    def _fs(self):
        return storage.filesystem(self.root)  # once: a URI's client is costly to make

    def _path(self, key: str) -> str:
        return storage.join(self.root, f"{key[:2]}/{key}.npy")

    def get(self, key: str) -> np.ndarray | None:
        try:
            if not storage.is_uri(self.root):
                return np.load(self._path(key), allow_pickle=False)
            fs, base = self._fs
            with fs.open_input_stream(f"{base}/{key[:2]}/{key}.npy") as f:
                return np.load(io.BytesIO(f.read()), allow_pickle=False)
        except (OSError, ValueError):  # absent, or a torn file: compute again
            return None

    def put(self, key: str, value: np.ndarray) -> None:
        """Atomically; a location this node cannot write only costs the caching."""
        try:
            if storage.is_uri(self.root):
                buffer = io.BytesIO()
                np.save(buffer, value)
                fs, base = self._fs
                with fs.open_output_stream(f"{base}/{key[:2]}/{key}.npy") as f:
                    f.write(buffer.getvalue())
                return
            path = Path(self._path(key))
            tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npy")
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(tmp, value)
            tmp.replace(path)
        except (OSError, ValueError) as e:  # ValueError: RaysoupError of the URI
            logger.debug(f"[cache] not written to {self.root}: {e}")
