"""`raysoup prepare --text`: a CSV, JSONL or Parquet file with a text column and a label
column to a text evaluation set (Arrow `text` + `label` shards), read as image sets are.

Labels are ints (class indices), or class names mapped to indices in a recorded order: the
order of `classes` (a list, or a file with one name per line) when given, else sorted.

Output folder:
  shard-00000.arrow    `data.write_eval_set` files of up to `shard_size` rows
  dataset.json         written last: name, source, columns, classes, rows, shards
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..inputs.data import DataError, EvalSet, write_eval_set
from ..inputs.storage import atomic, write_json
from ..inputs.weights import file_sha256

logger = logging.getLogger(__name__)

FORMAT = 1
SUFFIXES = (".csv", ".jsonl", ".json", ".parquet")


def _read(src: Path) -> pa.Table:
    suffix = src.suffix.lower()
    if suffix not in SUFFIXES:
        raise DataError(f"{src}: a text set is read from {', '.join(SUFFIXES)} files")
    try:
        if suffix == ".csv":
            import pyarrow.csv

            return pyarrow.csv.read_csv(src)
        if suffix == ".parquet":
            import pyarrow.parquet

            return pyarrow.parquet.read_table(src)
        import pyarrow.json

        return pyarrow.json.read_json(src)
    except (OSError, pa.ArrowException) as e:
        what = (
            "empty"
            if src.is_file() and src.stat().st_size == 0
            else f"not readable as {suffix[1:]}"
        )
        raise DataError(f"{src}: {what} ({str(e).splitlines()[0]})") from None


def _column(table: pa.Table, name: str, src: Path, role: str) -> pa.ChunkedArray:
    if name not in table.column_names:
        raise DataError(
            f"{src}: no {role} column {name!r} (columns: "
            f"{', '.join(table.column_names) or 'none'}); name it with "
            f"--{role}-column"
        )
    column = table.column(name)
    if column.null_count:
        row = int(pc.index(pc.is_null(column), True).as_py())
        raise DataError(f"{src}: column {name!r} is empty in row {row + 1}")
    return column


def _class_names(classes: Sequence[str] | str | Path) -> list[str]:
    if isinstance(classes, (str, Path)):
        from .zeroshot import read_lines

        return read_lines(classes, "classes")
    return list(classes)


def _labels(
    column: pa.ChunkedArray, name: str, src: Path, classes: list[str] | None
) -> tuple[np.ndarray, list[str] | None]:
    """Class indices and the class names in index order (None: ints given, no names)."""
    if pa.types.is_integer(column.type):
        labels = column.to_numpy().astype(np.int64)
        high = len(classes) if classes is not None else None
        bad = labels[(labels < 0) | ((labels >= high) if high is not None else False)]
        if len(bad):
            raise DataError(
                f"{src}: column {name!r} holds label {int(bad[0])}, outside [0, "
                f"{high if high is not None else 'inf'})"
            )
        return labels, classes
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        raise DataError(
            f"{src}: column {name!r} holds {column.type}; labels are ints or class names"
        )
    names = [str(v) for v in column.to_pylist()]
    order = classes if classes is not None else sorted(set(names))
    index = {c: i for i, c in enumerate(order)}
    unknown = next((n for n in names if n not in index), None)
    if unknown is not None:
        raise DataError(
            f"{src}: column {name!r} holds label {unknown!r}, which is not one of "
            f"the {len(order)} classes given"
        )
    return np.array([index[n] for n in names], dtype=np.int64), order


def prepare_text(
    src: str | Path,
    out: str | Path,
    *,
    text_column: str = "text",
    label_column: str = "label",
    classes: Sequence[str] | str | Path | None = None,
    shard_size: int = 1000,
) -> dict:
    """Write `src` as a text evaluation set in `out` (see the module docstring); returns the
    dataset.json dict."""
    src, out = Path(src), Path(out)
    if shard_size < 1:
        raise DataError(f"--shard-size must be >= 1, got {shard_size}")
    if out.exists() and any(out.iterdir()) and not (out / "dataset.json").is_file():
        raise DataError(f"{out} exists and is not a `raysoup prepare` output: pick another --out")
    class_list = _class_names(classes) if classes is not None else None
    table = _read(src)
    if table.num_rows == 0:
        raise DataError(f"{src}: no rows")
    texts = _column(table, text_column, src, "text")
    if not (pa.types.is_string(texts.type) or pa.types.is_large_string(texts.type)):
        raise DataError(f"{src}: column {text_column!r} holds {texts.type}, not text")
    labels, names = _labels(
        _column(table, label_column, src, "label"), label_column, src, class_list
    )
    texts = np.array(texts.to_pylist(), dtype=object)
    blank = next((i for i, t in enumerate(texts) if not t.strip()), None)
    if blank is not None:
        raise DataError(f"{src}: column {text_column!r} is empty in row {blank + 1}")
    shards = []
    with atomic(out) as tmp:
        tmp.mkdir()
        for i, start in enumerate(range(0, len(labels), shard_size)):
            rows = slice(start, start + shard_size)
            shards.append(f"shard-{i:05d}.arrow")
            write_eval_set(EvalSet(out.name, {"text": texts[rows]}, labels[rows]), tmp / shards[-1])
        info = {
            "format": FORMAT,
            "name": out.resolve().name,
            "source": str(src),
            "sha256": file_sha256(src),
            "inputs": "text",
            "text_column": text_column,
            "label_column": label_column,
            "classes": names,
            "rows": len(labels),
            "shards": shards,
        }
        write_json(tmp / "dataset.json", info)
    logger.info(
        f"[prepare] {len(labels)} texts of {len(np.unique(labels))} classes in "
        f"{len(shards)} shards: {out}"
    )
    return info
