"""`raysoup prepare`: images (a folder per class, or a CSV/Parquet table of path,label) to
preprocessed Arrow shards that `data.read_eval_set` reads as one evaluation set.

Each image goes through open_clip's evaluation preprocessing for the model (resize the
shortest side, centre-crop, RGB) and stops before ToTensor/Normalize: the shards hold uint8
RGB at the model's input resolution, so no evaluation ever decodes or resizes an image.

Output folder:
  plan.json            what is being prepared (items, classes, preprocessing), written first
  shard-00000.arrow    `data.write_eval_set` files of up to `shard_size` images
  shard-00000.json     that shard's row count and skipped images; its presence means done
  dataset.json         written last: its presence means the whole set is ready

With a validation fraction, only a held-out part of each class is written, and
dataset.json lists both parts, so the rest can be fine-tuned on. A rerun with the same plan
redoes only the shards without their .json, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.csv
import pyarrow.parquet
from PIL import Image
from tqdm import tqdm

from ..errors import RaysoupError
from ..inputs.data import DataError, EvalSet, write_eval_set
from ..inputs.model import preprocess_config
from ..inputs.storage import write_json

logger = logging.getLogger(__name__)

FORMAT = 1
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
TABLE_SUFFIXES = (".csv", ".parquet")
SHOW_SKIPPED = 5  # paths named in the warning about unreadable images


class Item(NamedTuple):
    path: str  # as the user knows it: relative to the folder / as written in the table
    file: str  # where to open it
    label: int  # index into the class list


class ClassList(NamedTuple):
    names: list[str]
    origin: str  # for messages: "from classes.txt" / "given"

    def describe(self) -> str:
        return f"{len(self.names)} classes {self.origin}"


@dataclass
class ShardTask:
    """One worker's job; it travels to the worker process by pickle, transform included."""

    name: str
    items: list[Item]
    transform: Callable
    arrow: Path
    record: Path
    strict: bool


def prepare_dataset(
    src: str | Path,
    out: str | Path,
    *,
    arch: str | None = None,
    image_size: int | None = None,
    classes: Sequence[str] | str | Path | None = None,
    val_fraction: float | None = None,
    seed: int = 0,
    workers: int | None = None,
    shard_size: int = 1000,
    strict: bool = False,
) -> dict:
    """Prepare `src` into `out` (see the module docstring); returns the dataset.json dict."""
    src, out = Path(src), Path(out)
    workers = (os.cpu_count() or 1) if workers is None else workers
    _check_settings(arch, image_size, val_fraction, workers, shard_size)
    cfg = preprocess_cfg(arch, image_size)  # an unknown arch fails before any file is read
    if src.is_dir() and out.resolve().is_relative_to(src.resolve()):
        # a rerun would take the output folder for a class
        raise DataError(f"--out {out} is inside the image folder {src}: pick one outside it")
    class_list = _read_classes(classes) if classes is not None else None
    names, items = _collect(src, class_list)
    logger.info(f"[prepare] {len(items)} images of {len(names)} classes in {src}")
    split = split_settings = None
    if val_fraction is not None:
        val, train = split_per_class(items, val_fraction, seed)
        split_settings = {"seed": seed, "fraction": val_fraction}
        split = {
            **split_settings,
            "val": [it.path for it in val],
            "train": [it.path for it in train],
        }
        logger.info(
            f"[prepare] validation split (seed {seed}): {len(val)} of {len(items)} images, "
            f"{val_fraction:g} of each class; only these are written"
        )
        items = val

    _claim(
        out,
        {
            "format": FORMAT,
            "source": str(src.resolve()),
            "classes": names,
            "preprocess": cfg,
            "shard_size": shard_size,
            "strict": strict,
            "split": split_settings,
            "items": [[it.path, it.label] for it in items],
        },
    )
    transform = pil_transform(cfg)
    tasks = [
        ShardTask(
            out.resolve().name,
            items[start : start + shard_size],
            transform,
            *_shard_files(out, i),
            strict,
        )
        for i, start in enumerate(range(0, len(items), shard_size))
    ]
    results = _run(tasks, workers)

    skipped = [s for r in results for s in r["skipped"]]
    rows = sum(r["rows"] for r in results)
    if rows == 0:
        raise DataError(
            f"none of the {len(items)} images in {src} could be read "
            f"(first: {skipped[0]['path']}: {skipped[0]['error']})"
        )
    if skipped:
        _warn_skipped(skipped)
    info = {
        "format": FORMAT,
        "name": out.resolve().name,
        "source": str(src),
        "classes": names,
        "image_size": list(_height_width(cfg["size"])),
        "preprocess": cfg,
        "rows": rows,
        # a shard whose every image was skipped has no file (an empty set is unreadable)
        "shards": [t.arrow.name for t, r in zip(tasks, results) if r["rows"]],
        "skipped": skipped,
        "split": split,
    }
    write_json(out / "dataset.json", info)
    logger.info(f"[prepare] {rows} images in {len(info['shards'])} shards: {out}")
    return info


def _warn_skipped(skipped: list[dict]) -> None:
    shown = ", ".join(s["path"] for s in skipped[:SHOW_SKIPPED])
    more = ", ..." if len(skipped) > SHOW_SKIPPED else ""
    logger.warning(
        f"[prepare] warning: skipped {len(skipped)} unreadable image(s): {shown}{more} "
        f"(all listed in dataset.json)"
    )


def _check_settings(arch, image_size, val_fraction, workers, shard_size) -> None:
    """Refuse bad arguments before any file is read."""
    if (arch is None) == (image_size is None):
        raise DataError(
            "give exactly one of arch (an open_clip model whose preprocessing to "
            f"apply) and image_size; got arch={arch!r}, image_size={image_size!r}"
        )
    checks = [
        (image_size is None or image_size >= 1, "image_size", image_size, "at least 1"),
        (
            val_fraction is None or 0 < val_fraction < 1,
            "val_fraction",
            val_fraction,
            "between 0 and 1 (exclusive)",
        ),
        (workers >= 1, "workers", workers, "at least 1"),
        (shard_size >= 1, "shard_size", shard_size, "at least 1"),
    ]
    for ok, name, value, need in checks:
        if not ok:
            raise DataError(f"{name} = {value!r}: must be {need}")


def _read_classes(classes: Sequence[str] | str | Path) -> ClassList:
    """A list of names, or a text file with one name per line (blank lines ignored)."""
    if isinstance(classes, (str, Path)):
        try:
            lines = Path(classes).read_text().splitlines()
        except OSError as e:
            raise DataError(f"cannot read class list {classes}: {e}") from e
        names, origin = [s.strip() for s in lines if s.strip()], f"from {Path(classes).name}"
    else:
        names, origin = [str(c) for c in classes], "given"
    if not names:
        raise DataError(f"the class list ({origin}) is empty")
    seen = set()
    for name in names:
        if name in seen:
            raise DataError(f"class {name!r} appears twice in the class list ({origin})")
        seen.add(name)
    return ClassList(names, origin)


def _collect(src: Path, class_list: ClassList | None) -> tuple[list[str], list[Item]]:
    """Class names and the items, ordered by class, then path."""
    if src.is_dir():
        names, items = _folder_items(src, class_list)
    elif src.is_file() and src.suffix.lower() in TABLE_SUFFIXES:
        names, items = _table_items(src, class_list)
    elif src.exists():
        raise DataError(
            f"{src}: need an image folder (one sub-folder per class) or a "
            f"{' / '.join(TABLE_SUFFIXES)} table with columns path, label"
        )
    else:
        raise DataError(f"{src} does not exist")
    return names, sorted(items, key=lambda it: (it.label, it.path))


def _folder_items(src: Path, class_list: ClassList | None) -> tuple[list[str], list[Item]]:
    # hidden folders (.git, .ipynb_checkpoints) are never classes
    folders = sorted(p for p in src.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DataError(f"{src} has no class folders (need one sub-folder of images per class)")
    names = class_list.names if class_list else [f.name for f in folders]
    index = {name: i for i, name in enumerate(names)}
    items = []
    for folder in folders:
        if folder.name not in index:
            raise DataError(
                f"class folder {folder.name!r} (in {src}) is not in the class list "
                f"({class_list.describe()})"
            )
        files = [p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
        if not files:
            raise DataError(
                f"class folder {folder} has no images "
                f"({' '.join(IMAGE_SUFFIXES)}, searched recursively)"
            )
        items += [Item(p.relative_to(src).as_posix(), str(p), index[folder.name]) for p in files]
    return names, items


def _table_items(table_file: Path, class_list: ClassList | None) -> tuple[list[str], list[Item]]:
    paths, labels = _read_table(table_file)
    integer = pa.types.is_integer(labels.type)
    if integer and class_list is None:
        raise DataError(
            f"{table_file}: integer labels are indices into a class list; give "
            f"the classes (a file with one name per line)"
        )
    labels = labels.to_pylist()
    for i, (path, label) in enumerate(zip(paths, labels)):
        if not path or label is None or label == "":
            raise DataError(f"row {i + 1} of {table_file} has an empty path or label")
    names = class_list.names if class_list else sorted(set(labels))
    index = {name: i for i, name in enumerate(names)}
    root = table_file.parent  # relative paths are relative to the table's folder
    items, rows_of = [], {}
    for i, (path, label) in enumerate(zip(paths, labels)):
        where = f"row {i + 1} of {table_file.name}"
        if integer and not 0 <= label < len(names):
            raise DataError(
                f"label {label} ({where}) is out of range for the class list "
                f"({class_list.describe()})"
            )
        if not integer and label not in index:
            raise DataError(
                f"label {label!r} ({where}) is not in the class list ({class_list.describe()})"
            )
        file = os.path.normpath(root / path)
        if file in rows_of:  # one image, one label: a duplicate is a mistake in the table
            raise DataError(f"image {path} ({where}) is already listed in row {rows_of[file] + 1}")
        rows_of[file] = i
        items.append(Item(path, file, label if integer else index[label]))
    _check_exist(items, table_file, rows_of)
    return names, items


def _read_table(table_file: Path) -> tuple[list[str], pa.Array]:
    try:
        if table_file.suffix.lower() == ".csv":
            # a path column of digits only must stay text
            convert = pyarrow.csv.ConvertOptions(column_types={"path": pa.string()})
            table = pyarrow.csv.read_csv(table_file, convert_options=convert)
        else:
            table = pyarrow.parquet.read_table(table_file)
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"cannot read {table_file}: {e}") from e
    missing = {"path", "label"} - set(table.column_names)
    if missing:
        raise DataError(
            f"{table_file} lacks column(s) {', '.join(sorted(missing))} (has "
            f"{', '.join(table.column_names)}; need path, label)"
        )
    if table.num_rows == 0:
        raise DataError(f"{table_file} has no rows")
    labels = table.column("label").combine_chunks()
    if pa.types.is_dictionary(labels.type):  # pandas writes a categorical column this way
        labels = labels.dictionary_decode()
    if not (
        pa.types.is_integer(labels.type)
        or pa.types.is_string(labels.type)
        or pa.types.is_large_string(labels.type)
    ):
        raise DataError(
            f"{table_file}: label column has type {labels.type}; need class names "
            f"(text) or indices into the class list (integers)"
        )
    return table.column("path").cast(pa.string()).to_pylist(), labels


def _check_exist(items: list[Item], table_file: Path, rows_of: dict[str, int]) -> None:
    missing = [it for it in items if not os.path.isfile(it.file)]
    if missing:
        shown = ", ".join(f"{it.path} (row {rows_of[it.file] + 1})" for it in missing[:3])
        raise DataError(
            f"{len(missing)} image(s) listed in {table_file} do not exist "
            f"(relative paths are from {table_file.parent}): {shown}"
        )


def split_per_class(items: list[Item], fraction: float, seed: int) -> tuple[list[Item], list[Item]]:
    """(val, train): `fraction` of each class held out, rounded half up and at least one,
    so every class is validated. Both keep the items' order."""
    rng = np.random.default_rng(seed)
    by_class = defaultdict(list)
    for item in items:
        by_class[item.label].append(item)
    held = set()
    for label in sorted(by_class):
        members = by_class[label]
        n_val = max(1, int(fraction * len(members) + 0.5))
        held.update(members[i].path for i in rng.permutation(len(members))[:n_val])
    return ([it for it in items if it.path in held], [it for it in items if it.path not in held])


def preprocess_cfg(arch: str | None, image_size: int | None) -> dict:
    """open_clip's preprocessing settings for `arch` (or its defaults at `image_size`), in the
    JSON form that plan.json and dataset.json record."""
    if arch is not None:
        try:
            return preprocess_config(arch)
        except RaysoupError as e:
            raise DataError(str(e)) from None
    from open_clip.transform import PreprocessCfg

    return json.loads(json.dumps(asdict(PreprocessCfg(size=image_size))))


def pil_transform(cfg: dict) -> Callable:
    """open_clip's eval transform for `cfg`, up to (not including) ToTensor: PIL in, PIL out."""
    from open_clip.transform import MaybeToTensor, PreprocessCfg, image_transform_v2
    from torchvision.transforms import Compose

    steps = image_transform_v2(PreprocessCfg(**cfg), is_train=False).transforms
    cut = next(i for i, step in enumerate(steps) if isinstance(step, MaybeToTensor))
    return Compose(steps[:cut])


def _height_width(size: int | list[int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (size[0], size[1])


def _shard_files(out: Path, i: int) -> tuple[Path, Path]:
    return out / f"shard-{i:05d}.arrow", out / f"shard-{i:05d}.json"


def _claim(out: Path, plan: dict) -> None:
    """Write plan.json into a new (or empty) `out`, or check that `out` holds the same plan."""
    plan = json.loads(json.dumps(plan))  # the form it has when read back
    plan_file = out / "plan.json"
    if plan_file.is_file():
        try:
            old = json.loads(plan_file.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise DataError(f"cannot read {plan_file}: {e}; pick another --out") from e
        if old != plan:
            differ = sorted(k for k in plan.keys() | old.keys() if old.get(k) != plan.get(k))
            raise DataError(
                f"{out} holds another preparation (its plan.json differs in "
                f"{', '.join(differ)}): pick another --out, or delete {out}"
            )
        return
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(
            f"{out} exists and is not a `raysoup prepare` output (no plan.json): pick another --out"
        )
    out.mkdir(parents=True, exist_ok=True)
    write_json(plan_file, plan, indent=None)  # compact: it lists every image


def _run(tasks: list[ShardTask], workers: int) -> list[dict]:
    """Each shard's {"rows", "skipped"}, from its .json when done before, else by preparing
    it (in `workers` processes)."""
    results = [_finished(t) for t in tasks]
    todo = [i for i, r in enumerate(results) if r is None]
    if len(todo) < len(tasks):
        logger.info(
            f"[prepare] resuming: {len(tasks) - len(todo)} of {len(tasks)} shards already done"
        )
    if not todo:
        return results
    bar = tqdm(total=sum(len(tasks[i].items) for i in todo), desc="[prepare]", unit="img")
    pool = ProcessPoolExecutor(min(workers, len(todo)))
    try:
        futures = {pool.submit(prepare_shard, tasks[i]): i for i in todo}
        for future in as_completed(futures):
            i = futures[future]
            results[i] = future.result()
            bar.update(len(tasks[i].items))
    finally:
        # on an error (strict mode, Ctrl-C) drop the queued shards instead of preparing them
        pool.shutdown(cancel_futures=True)
        bar.close()
    return results


def _finished(task: ShardTask) -> dict | None:
    if not task.record.is_file():
        return None
    result = json.loads(task.record.read_text())
    return result if result["rows"] == 0 or task.arrow.is_file() else None


def prepare_shard(task: ShardTask) -> dict:
    """Decode, preprocess and write one shard (in a worker process); the .json comes last,
    so it exists only for a complete shard."""
    images, labels, skipped = [], [], []
    for item in task.items:
        try:
            with Image.open(item.file) as img:
                array = np.asarray(task.transform(img), dtype=np.uint8)
        # PIL reports a bad file with many types (OSError, SyntaxError, ValueError,
        # DecompressionBombError): any failure here is an unreadable image
        except Exception as e:  # noqa: BLE001
            if task.strict:
                raise DataError(f"cannot read image {item.file}: {e}") from None
            skipped.append({"path": item.path, "error": f"{type(e).__name__}: {e}"})
            continue
        images.append(array.transpose(2, 0, 1))  # HWC -> CHW
        labels.append(item.label)
    if images:
        write_eval_set(
            EvalSet(task.name, np.stack(images), np.array(labels, dtype=np.int64)), task.arrow
        )
    result = {"rows": len(images), "skipped": skipped}
    write_json(task.record, result)
    return result
