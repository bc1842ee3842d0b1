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

from . import storage
from .data import ClassMap, DataError, EvalSetSource
from .model import ModelSpec
from .pool import read_manifest


def _inline_or_file(zoo: str, value, what: str):
    """A manifest value given inline, or as a file in the zoo: .json parsed, else one item
    per line."""
    if not isinstance(value, str):
        return value
    text = storage.read_bytes(storage.within(zoo, value, what)).decode()
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
    if isinstance(value, int) and not isinstance(value, bool):
        if 0 <= value < count:
            return value
        raise DataError(f"{what}: class index {value} out of range [0, {count})")
    if names is None:
        raise DataError(f"{what}: class {value!r} given by name, but no class names are known "
                        f"(add `classes` to the manifest, or prepare the set with "
                        f"`raysoup prepare`)")
    if value not in names:
        raise DataError(f"{what}: class {value!r} is not in the class list "
                        f"({len(names)} classes)")
    return names.index(value)


def _set_classes(location: str) -> list[str] | None:
    dataset_json = storage.join(location, "dataset.json")
    if not storage.is_file(dataset_json):
        return None
    return json.loads(storage.read_bytes(dataset_json)).get("classes")


def resolve_class_map(entry: dict, location: str, classes: list[str] | None,
                      num_classes: int, what: str) -> ClassMap | None:
    if "class_subset" in entry and "class_map" in entry:
        raise DataError(f"{what}: give class_subset or class_map, not both")
    if "class_subset" in entry:
        subset = {_class_index(c, classes, num_classes, f"{what} class_subset")
                  for c in entry["class_subset"]}
        if not subset:
            raise DataError(f"{what}: class_subset is empty")
        return tuple((c,) if c in subset else () for c in range(num_classes))
    if "class_map" in entry:
        set_classes = _set_classes(location)
        count = len(set_classes) if set_classes else 1 + max(
            (k for k in (int(k) for k in entry["class_map"] if str(k).isdigit())), default=-1)
        groups: list[tuple[int, ...]] = [()] * count
        for set_class, targets in entry["class_map"].items():
            key = int(set_class) if str(set_class).isdigit() else set_class
            label = _class_index(key, set_classes, count, f"{what} class_map")
            groups[label] = tuple(_class_index(t, classes, num_classes,
                                               f"{what} class_map[{set_class!r}]")
                                  for t in targets)
        return tuple(groups)
    return None


def eval_set_sources(zoo: str | Path) -> dict[str, EvalSetSource]:
    """Every evaluation set of the manifest, each inside the zoo, class maps resolved."""
    root = storage.resolve(zoo)
    manifest = read_manifest(root)
    classes = model_classes(root, manifest)
    num_classes = ModelSpec.from_dict(manifest["model"]).num_classes
    if classes is not None and len(classes) != num_classes:
        raise DataError(f"manifest.json: {len(classes)} classes listed, but model.num_classes "
                        f"is {num_classes}")
    known_keys = {"file", "rows", "class_subset", "class_map"}
    sources = {}
    for name, entry in manifest["eval_sets"].items():
        what = f"manifest.json eval set {name!r}"
        entry = {"file": entry} if isinstance(entry, str) else entry
        extra = sorted(set(entry) - known_keys)
        if extra:
            raise DataError(f"{what}: unknown key(s) {extra}; known: {sorted(known_keys)}")
        location = storage.within(root, entry["file"], f"{what} file")
        entry = {k: _inline_or_file(root, v, f"{what} {k}") if k.startswith("class_") else v
                 for k, v in entry.items()}
        sources[name] = EvalSetSource(location, resolve_class_map(entry, location, classes,
                                                                  num_classes, what))
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
            record.update(source=info.get("source"), rows=info.get("rows"),
                          skipped=len(info.get("skipped", [])), split=split and {
                              "seed": split["seed"], "fraction": split["fraction"],
                              "val": len(split["val"]), "train": len(split["train"])})
        records[name] = record
    return records
