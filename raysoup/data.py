"""Evaluation data: Fashion-MNIST splits, distribution shifts, and Arrow storage.

Every evaluation set is stored once as Arrow IPC (uint8 images + int64 labels): one file,
or a folder of shards with a dataset.json (written by `raysoup prepare`), so no evaluation
ever decodes or re-augments an image.
"""

from __future__ import annotations

import gzip
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc
import torch
from torchvision.transforms import v2

from . import storage
from .errors import RaysoupError

DEFAULT_DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
CLASS_NAMES = ("t-shirt", "trouser", "pullover", "dress", "coat",
               "sandal", "shirt", "sneaker", "bag", "ankle-boot")
# The validation rows are fixed for every zoo: a permutation of the 60k train rows by
# this seed; the last `val_size` rows are held out and never trained on.
SPLIT_SEED = 20230915


class DataError(RaysoupError):
    """Bad or missing data; the message names the offending file."""


ClassMap = tuple[tuple[int, ...], ...]


@dataclass
class EvalSet:
    name: str
    images: np.ndarray  # uint8 (N, C, H, W)
    labels: np.ndarray  # int64 (N,)
    # class_map[label] = the model's classes that count as that label: the prediction is
    # the label whose classes hold the highest logit (ImageNet-R's 200 of 1000 classes,
    # ObjectNet's classes onto ImageNet's). None: labels are the model's classes.
    class_map: ClassMap | None = None

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class EvalSetSource:
    """Where an evaluation set lives (a path or URI: an Arrow file or a prepared folder)
    and how its labels meet the model's classes."""
    location: str
    class_map: ClassMap | None = None


def data_dir() -> Path:
    return Path(os.environ.get("RAYSOUP_DATA_DIR", DEFAULT_DATA_DIR))


def _read_idx(path: Path) -> np.ndarray:
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DataError(f"cannot read Fashion-MNIST file {path}: {e}") from e
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
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
            "to a folder holding the four *-ubyte.gz idx files.")
    arrays = {k: _read_idx(root / n) for k, n in IDX_FILES.items()}
    for split in ("train", "test"):
        arrays[f"{split}_images"] = arrays[f"{split}_images"][:, None]  # (N, 1, 28, 28)
        arrays[f"{split}_labels"] = arrays[f"{split}_labels"].astype(np.int64)
    return arrays


def train_val_split(n_train: int, val_size: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(SPLIT_SEED).permutation(n_train)
    return np.sort(order[:-val_size]), np.sort(order[-val_size:])


# Test-time shifts. Each is a torchvision v2 pipeline applied per image with a fixed seed.
# "elastic" never appears in pretraining augmentation (see zoo.pretrain_augment): a truly
# unseen shift.
def _shifts() -> dict[str, v2.Transform]:
    return {
        "noise": v2.Compose([v2.ToDtype(torch.float32, scale=True),
                             v2.GaussianNoise(sigma=0.2, clip=True),
                             v2.ToDtype(torch.uint8, scale=True)]),
        "blur": v2.GaussianBlur(kernel_size=5, sigma=(1.2, 1.6)),
        "contrast": v2.ColorJitter(contrast=(0.25, 0.35)),
        "rotate": v2.RandomAffine(degrees=(-40, 40), scale=(0.8, 1.0)),
        "elastic": v2.ElasticTransform(alpha=40.0, sigma=4.0),
        "invert": v2.RandomInvert(p=1.0),
    }


SHIFT_NAMES = tuple(_shifts())


def make_shift(images: np.ndarray, shift: str, seed: int) -> np.ndarray:
    transform = _shifts()[shift]
    torch.manual_seed(seed)
    src = torch.tensor(images)  # a copy: the input may be a read-only buffer
    out = torch.empty_like(src)
    for i in range(len(src)):
        out[i] = transform(src[i])
    return out.numpy()


def build_eval_sets(arrays: dict[str, np.ndarray], val_idx: np.ndarray,
                    test_size: int | None = None) -> list[EvalSet]:
    """val (held-out train rows), id (official test), and one shifted copy per shift."""
    test_x, test_y = arrays["test_images"], arrays["test_labels"]
    if test_size is not None and test_size < len(test_y):
        keep = np.sort(np.random.default_rng(SPLIT_SEED).permutation(len(test_y))[:test_size])
        test_x, test_y = test_x[keep], test_y[keep]
    sets = [EvalSet("val", arrays["train_images"][val_idx], arrays["train_labels"][val_idx]),
            EvalSet("id", test_x, test_y)]
    for i, shift in enumerate(SHIFT_NAMES):
        sets.append(EvalSet(shift, make_shift(test_x, shift, seed=1000 + i), test_y))
    return sets


def write_eval_set(eval_set: EvalSet, path: Path) -> None:
    n, *shape = eval_set.images.shape
    flat = pa.array(eval_set.images.reshape(-1), type=pa.uint8())
    images = pa.FixedSizeListArray.from_arrays(flat, int(np.prod(shape)))
    table = pa.table({"image": images, "label": pa.array(eval_set.labels, type=pa.int64())})
    table = table.replace_schema_metadata({"name": eval_set.name,
                                           "shape": ",".join(map(str, shape))})
    tmp = path.with_suffix(".tmp")
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    tmp.replace(path)


def read_eval_set(source: EvalSetSource | str | Path, num_classes: int | None = None,
                  log=None) -> EvalSet:
    """An Arrow file or a prepared folder of shards, from a local path or a URI.

    With a class map, rows whose label has no model class are left out (counted in `log`).
    """
    source = source if isinstance(source, EvalSetSource) else EvalSetSource(str(source))
    name, parts = _open_parts(source.location)
    labels = np.concatenate([p.labels for p in parts])
    keep = _rows_kept(labels, source, num_classes)
    images = np.concatenate([p.images for p in parts]) if len(parts) > 1 else parts[0].images
    if keep is None:
        return EvalSet(name, images, labels)
    if log is not None and not keep.all():
        log(f"[data] {name}: {int((~keep).sum())} of {len(keep)} images have classes "
            f"without a model counterpart; left out")
    return EvalSet(name, images[keep], labels[keep], source.class_map)


def check_eval_set(source: EvalSetSource, num_classes: int) -> int:
    """Rows the set would give, from its labels alone (images stay unread on local files):
    the up-front check of a run."""
    _, parts = _open_parts(source.location)
    keep = _rows_kept(np.concatenate([p.labels for p in parts]), source, num_classes)
    return sum(len(p) for p in parts) if keep is None else int(keep.sum())


def _rows_kept(labels: np.ndarray, source: EvalSetSource, num_classes: int | None):
    """None when every row counts (labels checked against the model's classes), else the
    mask of rows whose label the class map sends to some model class."""
    if source.class_map is None:
        _check_labels(labels, num_classes, source.location)
        return None
    _check_labels(labels, None, source.location)
    # Labels past the map's end (a plain Arrow file's map lists only what it maps): unmapped.
    mapped = np.array([len(g) > 0 for g in source.class_map] + [False])
    keep = mapped[np.minimum(labels, len(source.class_map))]
    if not keep.any():
        raise DataError(f"evaluation set {source.location}: no row has a label that the class "
                        f"map sends to a model class")
    return keep


def _check_labels(labels: np.ndarray, num_classes: int | None, where: str) -> None:
    high = np.iinfo(labels.dtype).max if num_classes is None else num_classes
    if labels.min() < 0 or labels.max() >= high:
        bad = labels[(labels < 0) | (labels >= high)][0]
        raise DataError(f"evaluation set {where}: label {bad} out of range [0, {num_classes})")


def _open_parts(location: str) -> tuple[str, list[EvalSet]]:
    """The set's name and its Arrow parts (one file, or a prepared folder's shards)."""
    dataset_json = storage.join(location, "dataset.json")
    if not storage.is_file(dataset_json):
        part = _read_arrow(location)
        return part.name, [part]
    try:
        info = json.loads(storage.read_bytes(dataset_json))
        parts = [_read_arrow(storage.within(location, f, f"{dataset_json} shard"))
                 for f in info["shards"]]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise DataError(f"cannot read {dataset_json}: {e}") from e
    if not parts:
        raise DataError(f"prepared set {location} has no shards")
    return info.get("name") or Path(location).name, parts


def _read_arrow(path: str) -> EvalSet:
    try:
        with storage.open_random_access(path) as source:
            table = pa.ipc.open_file(source).read_all()
    except (OSError, pa.ArrowInvalid, RaysoupError) as e:
        raise DataError(f"cannot read evaluation set {path}: {e}") from e
    meta = table.schema.metadata or {}
    if b"shape" not in meta or set(table.column_names) != {"image", "label"}:
        raise DataError(f"{path} is not a raysoup evaluation set (need columns image, label "
                        "and 'shape' metadata)")
    if table.num_rows == 0:
        raise DataError(f"evaluation set {path} is empty")
    shape = tuple(int(s) for s in meta[b"shape"].decode().split(","))
    images = table.column("image").combine_chunks().flatten().to_numpy()
    labels = table.column("label").to_numpy()
    name = meta.get(b"name", Path(path).stem.encode()).decode()
    return EvalSet(name, images.reshape((table.num_rows, *shape)), labels)
