"""The Fashion-MNIST testbed's data: the idx files, the fixed validation split, the
test-time shifts and the evaluation sets made from them (val, id, one per shift).
"""

from __future__ import annotations

import gzip
import math
import os
from pathlib import Path

import numpy as np
from scipy import ndimage

from ..inputs.data import DataError, EvalSet

DEFAULT_DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
# The validation rows are fixed for every zoo: a permutation of the 60k train rows by
# this seed; the last `val_size` rows are held out and never trained on.
SPLIT_SEED = 20230915


def data_dir() -> Path:
    return Path(os.environ.get("RAYSOUP_DATA_DIR", DEFAULT_DATA_DIR))


def _read_idx(path: Path) -> np.ndarray:
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DataError(f"cannot read Fashion-MNIST file {path}: {e}") from e
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataError(f"truncated idx file {path}: expected {dims}, got {data.size} bytes")
    return data.reshape(dims)


def load_fashion_mnist(root: Path | None = None) -> dict[str, np.ndarray]:
    root = Path(root) if root else data_dir()
    missing = [n for n in IDX_FILES.values() if not (root / n).is_file()]
    if missing:
        raise DataError(
            f"Fashion-MNIST not found in {root} (missing {', '.join(missing)}). "
            "Install it with `apt-get install dataset-fashion-mnist` or set RAYSOUP_DATA_DIR "
            "to a folder holding the four *-ubyte.gz idx files."
        )
    arrays = {k: _read_idx(root / n) for k, n in IDX_FILES.items()}
    for split in ("train", "test"):
        arrays[f"{split}_images"] = arrays[f"{split}_images"][:, None]  # (N, 1, 28, 28)
        arrays[f"{split}_labels"] = arrays[f"{split}_labels"].astype(np.int64)
    return arrays


def train_val_split(n_train: int, val_size: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(SPLIT_SEED).permutation(n_train)
    return np.sort(order[:-val_size]), np.sort(order[-val_size:])


# Test-time shifts, in float64 numpy/scipy with a numpy Generator per set: the same bytes on
# every machine (float32 torch kernels differ across CPUs and thread counts, and a last-bit
# difference can round a pixel the other way), so a shipped zoo can record each set's
# sha256. "elastic" never appears in pretraining augmentation (see image.pretrain_augment):
# a truly unseen shift.
def _noise(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return x + 0.2 * 255 * rng.standard_normal(x.shape)


def _blur(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return ndimage.gaussian_filter(x, sigma=rng.uniform(1.2, 1.6), radius=2)  # 5x5


def _contrast(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    factor = rng.uniform(0.25, 0.35)
    return factor * x + (1 - factor) * x.mean()


def _affine(x: np.ndarray, angle: float, scale: float) -> np.ndarray:
    """Rotate by `angle` degrees and zoom by `scale` about the centre (bilinear, zero fill)."""
    theta = math.radians(angle)
    rotation = (
        np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]]) / scale
    )
    centre = (np.array(x.shape) - 1) / 2.0
    return ndimage.affine_transform(x, rotation, offset=centre - rotation @ centre, order=1)


def _rotate(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return _affine(x, rng.uniform(-40, 40), rng.uniform(0.8, 1.0))


def _elastic(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    alpha, sigma = 40.0, 4.0
    grid = np.indices(x.shape, dtype=np.float64)
    shift = [
        alpha * ndimage.gaussian_filter(rng.uniform(-1, 1, x.shape), sigma, mode="constant")
        for _ in range(2)
    ]
    return ndimage.map_coordinates(x, grid + np.array(shift), order=1)


def _invert(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return 255.0 - x


SHIFTS = {
    "noise": _noise,
    "blur": _blur,
    "contrast": _contrast,
    "rotate": _rotate,
    "elastic": _elastic,
    "invert": _invert,
}
SHIFT_NAMES = tuple(SHIFTS)


def make_shift(images: np.ndarray, shift: str, seed: int) -> np.ndarray:
    """uint8 (N, C, H, W) -> the shifted copy, one image (and channel) at a time."""
    transform, rng = SHIFTS[shift], np.random.default_rng(seed)
    out = np.empty_like(images)
    for index in np.ndindex(images.shape[:2]):
        shifted = transform(images[index].astype(np.float64), rng)
        out[index] = np.rint(np.clip(shifted, 0, 255)).astype(np.uint8)
    return out


def build_eval_sets(
    arrays: dict[str, np.ndarray], val_idx: np.ndarray, test_size: int | None = None
) -> list[EvalSet]:
    """val (held-out train rows), id (official test), and one shifted copy per shift."""
    test_x, test_y = arrays["test_images"], arrays["test_labels"]
    if test_size is not None and test_size < len(test_y):
        keep = np.sort(np.random.default_rng(SPLIT_SEED).permutation(len(test_y))[:test_size])
        test_x, test_y = test_x[keep], test_y[keep]
    sets = [
        EvalSet("val", arrays["train_images"][val_idx], arrays["train_labels"][val_idx]),
        EvalSet("id", test_x, test_y),
    ]
    for i, shift in enumerate(SHIFT_NAMES):
        sets.append(EvalSet(shift, make_shift(test_x, shift, seed=1000 + i), test_y))
    return sets
