"""The task pool: a manifest's named evaluation sets, and how each set's labels meet the
model's classes.

A manifest entry is a location inside the zoo (an Arrow file or a folder prepared by
`raysoup prepare`), or a table with `file` and at most one of
- `class_subset`: the model classes the set uses (ImageNet-R, -A: 200 of 1000); its labels
  are model classes, and predictions are restricted to the subset;
- `class_map`: {set class: [model classes]} (ObjectNet onto ImageNet); its labels are the
  set's own classes, a set class scores the highest logit of its model classes, and
  images of unmapped set classes are left out.
Classes are given by name (the manifest's `classes` for the model, the prepared set's
dataset.json `classes` for the set) or by index; a subset or map may also be a file in the
zoo (a subset one class per line, a map as JSON).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..families import spec_from_dict
from . import storage
from .data import ClassMap, DataError, EvalSetSource
from .pool import read_manifest


def _inline_or_file(zoo: str, value, what: str):
    """A manifest value given inline, or as a file in the zoo: .json parsed, else one item
    per line."""
    if not isinstance(value, str):
        return value
    try:
        text = storage.read_bytes(storage.within(zoo, value, what)).decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{what} = {value!r}: not UTF-8 text ({e})") from None
    if value.endswith(".json"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{what} = {value!r}: not valid JSON: {e}") from e
    return [line.strip() for line in text.splitlines() if line.strip()]


def model_classes(zoo: str, manifest: dict) -> list[str] | None:
    """The manifest's `classes`: a list of names, or a text file (one per line) in the zoo."""
    return _inline_or_file(zoo, manifest.get("classes"), "manifest.json classes")


def _class_index(value, names: list[str] | None, count: int, what: str) -> int:
    """A class given by index (an int) or by name (a string, looked up in `names`)."""
    if isinstance(value, int) and not isinstance(value, bool):
        if 0 <= value < count:
            return value
        raise DataError(f"{what}: class index {value} out of range [0, {count})")
    if not isinstance(value, str):
        raise DataError(f"{what}: {value!r} is neither a class name nor a class index")
    if names is None:
        raise DataError(
            f"{what}: class {value!r} given by name, but no class names are known "
            f"(add `classes` to the manifest, or prepare the set with "
            f"`raysoup prepare`)"
        )
    if value not in names:
        raise DataError(f"{what}: class {value!r} is not in the class list ({len(names)} classes)")
    return names.index(value)


def _set_classes(location: str, what: str) -> list[str] | None:
    """The class names of a prepared set (its dataset.json), None for a plain Arrow file."""
    dataset_json = storage.join(location, "dataset.json")
    if not storage.is_file(dataset_json):
        return None
    try:
        return json.loads(storage.read_bytes(dataset_json)).get("classes")
    except (json.JSONDecodeError, AttributeError) as e:
        raise DataError(f"{what}: cannot read {dataset_json}: {e}") from e


def _class_subset(subset, classes, num_classes: int, what: str) -> ClassMap:
    if not isinstance(subset, list) or not subset:
        raise DataError(f"{what}: class_subset must be a non-empty list of model classes")
    chosen = {_class_index(c, classes, num_classes, f"{what} class_subset") for c in subset}
    return tuple((c,) if c in chosen else () for c in range(num_classes))


def _class_map(mapping, set_classes, classes, num_classes: int, what: str) -> ClassMap:
    """Keys are the set's class names (from its dataset.json) or, for a plain Arrow file,
    its label indices written as strings (JSON keys are strings)."""
    if not isinstance(mapping, dict) or not mapping:
        raise DataError(
            f"{what}: class_map must be a non-empty table {{set class: [model classes]}}"
        )
    if set_classes is None and not all(str(k).isdigit() for k in mapping):
        raise DataError(
            f"{what}: class_map keys {sorted(mapping)[:3]} are names, but the set "
            f"has no class names (prepare it with `raysoup prepare`, or key the "
            f"map by label index)"
        )
    count = len(set_classes) if set_classes else 1 + max(int(k) for k in mapping)
    groups: list[tuple[int, ...]] = [()] * count
    for key, targets in mapping.items():
        label = _class_index(
            key if set_classes else int(key), set_classes, count, f"{what} class_map"
        )
        if not isinstance(targets, list):
            raise DataError(
                f"{what}: class_map[{key!r}] must be a list of model classes, got {targets!r}"
            )
        groups[label] = tuple(
            _class_index(t, classes, num_classes, f"{what} class_map[{key!r}]") for t in targets
        )
    return tuple(groups)


def resolve_class_map(
    entry: dict, location: str, classes: list[str] | None, num_classes: int, what: str
) -> ClassMap | None:
    if "class_subset" in entry and "class_map" in entry:
        raise DataError(f"{what}: give class_subset or class_map, not both")
    set_classes = _set_classes(location, what)
    if "class_map" in entry:
        return _class_map(entry["class_map"], set_classes, classes, num_classes, what)
    # Otherwise the set's labels are model classes: a prepared set must use the same list.
    if set_classes is not None and classes is not None and set_classes != classes:
        raise DataError(
            f"{what}: the set was prepared with another class list "
            f"({len(set_classes)} classes, first {set_classes[:3]}) than the "
            f"manifest's ({len(classes)}, first {classes[:3]}); prepare it with "
            f"--classes, or give a class_map"
        )
    if "class_subset" in entry:
        return _class_subset(entry["class_subset"], classes, num_classes, what)
    return None


def eval_set_sources(zoo: str | Path) -> dict[str, EvalSetSource]:
    """Every evaluation set of the manifest, each inside the zoo, class maps resolved."""
    root = storage.resolve(zoo)
    manifest = read_manifest(root)
    classes = model_classes(root, manifest)
    num_classes = spec_from_dict(manifest["model"], storage.join(root, "manifest.json")).num_classes
    if classes is not None and len(classes) != num_classes:
        raise DataError(
            f"manifest.json: {len(classes)} classes listed, but model.num_classes is {num_classes}"
        )
    known_keys = {"file", "rows", "sha256", "class_subset", "class_map"}
    sources = {}
    for name, entry in manifest["eval_sets"].items():
        what = f"manifest.json eval set {name!r}"
        entry = {"file": entry} if isinstance(entry, str) else entry
        if not isinstance(entry, dict) or "file" not in entry:
            raise DataError(f"{what}: give a location, or a table with `file`")
        extra = sorted(set(entry) - known_keys)
        if extra:
            raise DataError(f"{what}: unknown key(s) {extra}; known: {sorted(known_keys)}")
        location = storage.within(root, entry["file"], f"{what} file")
        entry = {
            k: _inline_or_file(root, v, f"{what} {k}") if k.startswith("class_") else v
            for k, v in entry.items()
        }
        sources[name] = EvalSetSource(
            location,
            resolve_class_map(entry, location, classes, num_classes, what),
            entry.get("sha256"),
        )
    return sources


def dataset_records(sources: dict[str, EvalSetSource]) -> dict[str, dict]:
    """For the report: where each set came from, and for a validation split carved by
    `raysoup prepare`, its seed, fraction and sizes (the file lists stay in dataset.json)."""
    records = {}
    for name, source in sources.items():
        record = {"location": source.location, "class_map": source.class_map is not None}
        dataset_json = storage.join(source.location, "dataset.json")
        if storage.is_file(dataset_json):
            info = json.loads(storage.read_bytes(dataset_json))
            split = info.get("split")
            record.update(
                source=info.get("source"),
                rows=info.get("rows"),
                skipped=len(info.get("skipped", [])),
                split=split
                and {
                    "seed": split["seed"],
                    "fraction": split["fraction"],
                    "val": len(split["val"]),
                    "train": len(split["train"]),
                },
            )
        records[name] = record
    return records
