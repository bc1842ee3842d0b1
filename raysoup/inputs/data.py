"""Evaluation data: the Arrow storage of evaluation sets.

Every evaluation set is stored once as Arrow IPC (uint8 images + int64 labels): one file,
or a folder of shards with a dataset.json (written by `raysoup prepare`), so no evaluation
ever decodes or re-augments an image. A text set holds a `text` (string) or a pre-tokenised
`input_ids` (list<int>) column instead of `image`, tokenised in the evaluator.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc

from ..errors import RaysoupError
from . import storage

logger = logging.getLogger(__name__)


class DataError(RaysoupError):
    """Bad or missing data; the message names the offending file."""


ClassMap = tuple[tuple[int, ...], ...]


TEXT_COLUMNS = ("text", "input_ids")
# A set's rows: uint8 images (N, C, H, W), or a text set's column {"text": ...} or
# {"input_ids": ...} (object arrays, one string or token list per row).
Inputs = np.ndarray | dict[str, np.ndarray]


def take(inputs: Inputs, rows) -> Inputs:
    return inputs[rows] if not isinstance(inputs, dict) else {k: v[rows] for k, v in inputs.items()}


def _concat(parts: list[Inputs]) -> Inputs:
    if len(parts) == 1:
        return parts[0]
    if not isinstance(parts[0], dict):
        return np.concatenate(parts)
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


@dataclass
class EvalSet:
    name: str
    inputs: Inputs
    labels: np.ndarray  # int64 (N,)
    # class_map[label] = the model's classes that count as that label: the prediction is
    # the label whose classes hold the highest logit (ImageNet-R's 200 of 1000 classes,
    # ObjectNet's classes onto ImageNet's). None: labels are the model's classes.
    class_map: ClassMap | None = None
    sha256: str | None = None  # the manifest's content fingerprint, when it records one

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def images(self) -> np.ndarray:
        if isinstance(self.inputs, dict):
            raise DataError(f"evaluation set {self.name!r} holds text, not images")
        return self.inputs


@dataclass(frozen=True)
class EvalSetSource:
    """Where an evaluation set lives (a path or URI: an Arrow file or a prepared folder)
    and how its labels meet the model's classes."""

    location: str
    class_map: ClassMap | None = None
    sha256: str | None = None  # the content fingerprint the manifest recorded


def content_sha256(eval_set: EvalSet) -> str:
    """The set's fingerprint: its images' shape and bytes (a text set: its column's name
    and rows) and its labels (not the Arrow file's bytes, which may change with the pyarrow
    version)."""
    if isinstance(eval_set.inputs, dict):
        ((column, values),) = eval_set.inputs.items()
        h = hashlib.sha256(
            json.dumps(
                [column, [v if isinstance(v, str) else np.asarray(v).tolist() for v in values]]
            ).encode()
        )
    else:
        h = hashlib.sha256(str(eval_set.images.shape).encode())
        h.update(np.ascontiguousarray(eval_set.images).tobytes())
    h.update(np.ascontiguousarray(eval_set.labels, dtype=np.int64).tobytes())
    return h.hexdigest()


def write_eval_set(eval_set: EvalSet, path: Path) -> None:
    labels = pa.array(eval_set.labels, type=pa.int64())
    if isinstance(eval_set.inputs, dict):
        ((column, values),) = eval_set.inputs.items()
        kind = pa.string() if column == "text" else pa.list_(pa.int64())
        table = pa.table(
            {
                column: pa.array(
                    [v if isinstance(v, str) else np.asarray(v).tolist() for v in values], kind
                ),
                "label": labels,
            }
        )
        table = table.replace_schema_metadata({"name": eval_set.name})
    else:
        _n, *shape = eval_set.images.shape
        flat = pa.array(eval_set.images.reshape(-1), type=pa.uint8())
        images = pa.FixedSizeListArray.from_arrays(flat, int(np.prod(shape)))
        table = pa.table({"image": images, "label": labels})
        table = table.replace_schema_metadata(
            {"name": eval_set.name, "shape": ",".join(map(str, shape))}
        )
    with (
        storage.atomic(path) as tmp,
        pa.OSFile(str(tmp), "wb") as sink,
        pa.ipc.new_file(sink, table.schema) as writer,
    ):
        writer.write_table(table)


def read_eval_set(
    source: EvalSetSource | str | Path,
    num_classes: int | None = None,
) -> EvalSet:
    """An Arrow file or a prepared folder of shards, from a local path or a URI.

    With a class map, rows whose label has no model class are left out (counted in the log).
    """
    source = source if isinstance(source, EvalSetSource) else EvalSetSource(str(source))
    name, parts = _open_parts(source.location)
    labels = np.concatenate([p.labels for p in parts])
    keep = _rows_kept(labels, source, num_classes)
    inputs = _concat([p.inputs for p in parts])
    if keep is None:
        return EvalSet(name, inputs, labels)
    if not keep.all():
        rows = "rows" if isinstance(inputs, dict) else "images"
        logger.info(
            f"[data] {name}: {int((~keep).sum())} of {len(keep)} {rows} have classes "
            f"without a model counterpart; left out"
        )
    return EvalSet(name, take(inputs, keep), labels[keep], source.class_map)


def verify_eval_set(source: EvalSetSource, name: str) -> None:
    """Refuse a set whose content is not what the manifest recorded."""
    if source.sha256 is None:
        return
    got = content_sha256(read_eval_set(EvalSetSource(source.location)))
    if got != source.sha256:
        raise DataError(
            f"evaluation set {name!r} ({source.location}): content sha256 {got[:16]}... does "
            f"not match the manifest's {source.sha256[:16]}...; restore it, or skip the check "
            f"with `pool.verify_sha256 = false` (raysoup demo --no-verify)"
        )


def set_inputs(source: EvalSetSource) -> tuple[int, ...] | str:
    """What a set holds, from its schema: its image shape, or its text column's name."""
    return _labels_and_shape(_part_locations(source.location)[1][:1])[1]


def check_eval_set(
    source: EvalSetSource,
    num_classes: int,
    image_shape: tuple[int, ...] | str | None = None,
    name: str = "",
    min_classes: int = 1,
) -> int:
    """Rows the set would give, from its labels and schema alone (images stay unread on
    local files): the up-front check of a run. With `image_shape`, the set's images must
    have it (channels, height, width), or, given "text", the set must be a text set; its
    kept rows must span `min_classes` classes (a validation set of one class cannot tell
    models apart)."""
    labels, shape = _labels_and_shape(_part_locations(source.location)[1])
    what = f"evaluation set {name or source.location!r}"
    if image_shape is not None and isinstance(shape, str) != (image_shape == "text"):
        raise DataError(
            f"{what} holds "
            + (
                f"text (column {shape!r}), the model takes images"
                if isinstance(shape, str)
                else "images, the model takes text"
            )
        )
    if isinstance(image_shape, tuple) and tuple(shape) != tuple(image_shape):
        raise DataError(
            f"{what}: images are {'x'.join(map(str, shape))} (channels x height x "
            f"width), the model takes {'x'.join(map(str, image_shape))}; prepare "
            f"it for this model"
        )
    keep = _rows_kept(labels, source, num_classes)
    kept = labels if keep is None else labels[keep]
    if len(np.unique(kept)) < min_classes:
        raise DataError(
            f"{what}: its {len(kept)} rows hold {len(np.unique(kept))} class(es); "
            f"it needs at least {min_classes} to rank and select models"
        )
    return len(kept)


def _labels_and_shape(parts: list[str]) -> tuple[np.ndarray, tuple[int, ...] | str]:
    """Every row's label over a set's Arrow files (images unread) and the first file's
    image shape (a text set: its column's name)."""
    labels, shape = [], None
    for path in parts:
        with _open_batches(path) as (reader, part_shape):
            labels += [
                reader.get_batch(i).column("label").to_numpy()
                for i in range(reader.num_record_batches)
            ]
            shape = shape or part_shape
    return np.concatenate(labels), shape


def shard_rows(n: int, shard: int, shards: int) -> slice:
    """Rows of shard `shard` of `shards` among n: contiguous, sizes differing by at most 1."""
    return slice(n * shard // shards, n * (shard + 1) // shards)


def iter_shard(
    source: EvalSetSource, num_classes: int, shard: int, shards: int, batch_rows: int
) -> Iterator[tuple[Inputs, np.ndarray]]:
    """(inputs, labels) of one shard of a set's rows (after the class map's filtering),
    `batch_rows` at a time, in row order: read from memory-mapped Arrow record batches, so
    only one batch of images is ever copied into memory."""
    parts = _part_locations(source.location)[1]
    labels = _labels_and_shape(parts)[0]
    keep = _rows_kept(labels, source, num_classes)
    kept = np.arange(len(labels)) if keep is None else np.flatnonzero(keep)
    mine = kept[shard_rows(len(kept), shard, shards)]
    offset = 0
    for path in parts:
        with _open_batches(path) as (reader, shape):
            for i in range(reader.num_record_batches):
                batch = reader.get_batch(i)
                rows = mine[(mine >= offset) & (mine < offset + batch.num_rows)] - offset
                offset += batch.num_rows
                for start in range(0, len(rows), batch_rows):
                    taken = batch.take(pa.array(rows[start : start + batch_rows]))
                    yield (
                        _inputs(taken, shape),
                        taken.column("label").to_numpy(zero_copy_only=False),
                    )


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
        raise DataError(
            f"evaluation set {source.location}: no row has a label that the class "
            f"map sends to a model class"
        )
    return keep


def _check_labels(labels: np.ndarray, num_classes: int | None, where: str) -> None:
    high = np.iinfo(labels.dtype).max if num_classes is None else num_classes
    if labels.min() < 0 or labels.max() >= high:
        bad = labels[(labels < 0) | (labels >= high)][0]
        raise DataError(f"evaluation set {where}: label {bad} out of range [0, {num_classes})")


def _part_locations(location: str) -> tuple[str, list[str]]:
    """The set's name and its Arrow files (one file, or a prepared folder's shards)."""
    dataset_json = storage.join(location, "dataset.json")
    if not storage.is_file(dataset_json):
        return Path(location).stem, [location]
    try:
        info = json.loads(storage.read_bytes(dataset_json))
        parts = [storage.within(location, f, f"{dataset_json} shard") for f in info["shards"]]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise DataError(f"cannot read {dataset_json}: {e}") from e
    if not parts:
        raise DataError(f"prepared set {location} has no shards")
    return info.get("name") or Path(location).name, parts


def _open_parts(location: str) -> tuple[str, list[EvalSet]]:
    """The set's name and its Arrow parts, read whole."""
    name, paths = _part_locations(location)
    parts = [_read_arrow(path) for path in paths]
    return (parts[0].name if len(paths) == 1 else name), parts


@contextmanager
def _open_batches(path: str):
    """(record batch reader, image shape) of one Arrow file, checked to be an evaluation set."""
    try:
        with storage.open_random_access(path) as source:
            reader = pa.ipc.open_file(source)
            meta = reader.schema.metadata or {}
            names = set(reader.schema.names)
            text = [c for c in TEXT_COLUMNS if names == {c, "label"}]
            if not text and (b"shape" not in meta or names != {"image", "label"}):
                raise DataError(
                    f"{path} is not a raysoup evaluation set (need columns image, "
                    "label and 'shape' metadata, or text (or input_ids) and label)"
                )
            if sum(reader.get_batch(i).num_rows for i in range(reader.num_record_batches)) == 0:
                raise DataError(f"evaluation set {path} is empty")
            yield (
                reader,
                text[0] if text else tuple(int(s) for s in meta[b"shape"].decode().split(",")),
            )
    except (OSError, pa.ArrowInvalid) as e:
        raise DataError(f"cannot read evaluation set {path}: {e}") from e


def _inputs(table, shape: tuple[int, ...] | str) -> Inputs:
    """A table's (or record batch's) rows: images of `shape`, or its text column."""
    if isinstance(shape, str):
        values = table.column(shape).to_pylist()
        column = np.empty(len(values), dtype=object)
        column[:] = values if shape == "text" else [np.asarray(v, np.int64) for v in values]
        return {shape: column}
    column = table.column("image")
    column = column.combine_chunks() if hasattr(column, "combine_chunks") else column
    images = column.flatten().to_numpy(zero_copy_only=False)
    return images.reshape((table.num_rows, *shape))


def _read_arrow(path: str) -> EvalSet:
    with _open_batches(path) as (reader, shape):
        table = reader.read_all()
        name = (reader.schema.metadata or {}).get(b"name", Path(path).stem.encode()).decode()
    return EvalSet(name, _inputs(table, shape), table.column("label").to_numpy())
