"""Arrays by content key, as files under one folder: the judgement cache (per-image
correctness of whole models) and the point cache (validation accuracy of mixing points).
numpy only, so that Tune's trial processes can read it without importing torch."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


class KeyedArrays:
    def __init__(self, root: Path | str):
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.npy"

    def get(self, key: str) -> np.ndarray | None:
        try:
            return np.load(self._path(key), allow_pickle=False)
        except (OSError, ValueError):  # absent, or a torn file: compute again
            return None

    def put(self, key: str, value: np.ndarray) -> None:
        """Atomically; a folder this node cannot write only costs the caching."""
        path = self._path(key)
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npy")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(tmp, value)
            tmp.replace(path)
        except OSError:
            pass
