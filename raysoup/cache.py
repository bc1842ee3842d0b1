"""Every cache of raysoup: where it lives (this machine's folder, or a shared path or URI),
and arrays by content key as files there: the judgement cache (per-image correctness of
whole models) and the point cache (validation accuracy of mixing points). numpy and
pyarrow only at import, so that Tune's trial processes can read it without importing torch.

A key names its content, so writers of one key (nodes sharing the cache) write the same
bytes: each write is whole or absent (a local rename; one object PUT on object storage),
and the last one wins harmlessly."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from .inputs import storage

logger = logging.getLogger(__name__)


def cache_dir() -> Path:
    """This machine's cache (the demo's zoos): RAYSOUP_CACHE unless that is a URI."""
    env = os.environ.get("RAYSOUP_CACHE", "")
    return Path(env) if env and not storage.is_uri(env) else Path.home() / ".cache" / "raysoup"


def cache_location(configured: str | None = None) -> str:
    """Where judgements and measured points are kept by content: the config's `cache`, else
    RAYSOUP_CACHE, else this machine's cache_dir(). A URI or a shared path is shared by every
    node that reaches it."""
    env = os.environ.get("RAYSOUP_CACHE", "")
    return configured or (env if storage.is_uri(env) else str(cache_dir()))


class KeyedArrays:
    """numpy arrays by key, one .npy file (or object) each under `root`."""

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


class JudgementCache(KeyedArrays):
    """Per-image correctness (or metric scores) by content: the same weights (sha256) on
    the same evaluation set (its fingerprint) by the same kind of evaluator and metric are
    judged once, for every later run. Counts the (model, set) judgements it answered and
    those it had measured."""

    def __init__(self, root):
        super().__init__(root)
        self.cached = self.measured = 0

    def correctness(
        self, state_dict: Mapping, set_keys: Mapping[str, str], sets: list[str], judge
    ) -> dict[str, np.ndarray]:
        """Per set of `sets`: the cached correctness where there is one (sets with a key in
        `set_keys`), else `judge(missing sets)`'s, which is cached."""
        from .inputs.pool import state_dict_sha256  # torch: not for the trial processes

        weights = state_dict_sha256(state_dict) if set_keys else ""
        keys = {
            name: hashlib.sha256(f"{weights}:{set_keys[name]}".encode()).hexdigest()
            for name in sets
            if name in set_keys
        }
        hits = {name: h for name, key in keys.items() if (h := self.get(key)) is not None}
        missing = [name for name in sets if name not in hits]
        self.cached += len(hits)
        self.measured += len(missing)
        if missing:
            hits.update(judge(missing))
            for name in missing:
                if name in keys:
                    self.put(keys[name], hits[name])
        return {name: hits[name] for name in sets}


def set_key(
    sha256: str | None, spec, class_map: dict | None, bf16: bool, domain: str, metric=None
) -> str | None:
    """What decides a set's per-image results besides the weights: the set, the model,
    bf16, the numeric domain of the kernels (raysoup.numerics) and the metric (its name
    and source). None: the set has no recorded fingerprint, so its judgements are not
    cached."""
    if not sha256:
        return None
    key = [sha256, spec.to_dict(), class_map, bf16, domain]
    return hashlib.sha256(
        json.dumps(key + ([metric.identity] if metric else [])).encode()
    ).hexdigest()


@dataclass(frozen=True)
class PointCache:
    """Validation accuracies of mixing points by content: `scope` fixes the resident
    models, the mixer, the validation set and the evaluators' layout, so a point measured
    once (a promise point that is pass 1's start, a rerun of the same step) is read back,
    not evaluated again. The optimiser is told the same value either way."""

    root: str
    scope: str

    def key(self, x: np.ndarray) -> str:
        x = np.ascontiguousarray(np.asarray(x, dtype=np.float64))
        return hashlib.sha256(self.scope.encode() + x.tobytes()).hexdigest()

    @cached_property
    def arrays(self) -> KeyedArrays:  # one per process it travels to: a URI's client is reused
        return KeyedArrays(self.root)

    def get(self, x: np.ndarray) -> float | None:
        hit = self.arrays.get(self.key(x))
        return None if hit is None else float(hit[0])

    def put(self, x: np.ndarray, accuracy: float) -> None:
        self.arrays.put(self.key(x), np.array([accuracy]))
