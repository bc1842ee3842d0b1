"""The models to merge: a pool of ingredient checkpoints of one architecture.

Ingredients stay on disk and are loaded one at a time, so memory does not grow with the
pool. Loading never executes code: safetensors, or torch.load(weights_only=True).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import torch

from ..errors import RaysoupError
from ..families import family_of, spec_from_dict, state_dict_template
from . import storage
from .weights import CheckpointError, StateDict, file_sha256

CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


def state_dict_sha256(state_dict) -> str:
    """The weights' fingerprint: every key, dtype, shape and byte, in key order."""
    h = hashlib.sha256()
    for key in sorted(state_dict):
        t = state_dict[key].detach().cpu().contiguous()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


HEAD_KEYS = ("classification_head.weight", "classification_head.bias")


def check_state_dict(
    state_dict: StateDict, template: StateDict, source: str, arch: str = ""
) -> None:
    """Same keys, shapes and dtypes as the architecture, and finite weights."""
    configured = f"the configured architecture {arch!r}" if arch else "the configured model"
    missing = sorted(set(template) - set(state_dict))
    extra = sorted(set(state_dict) - set(template))
    if set(missing) == set(HEAD_KEYS) and not extra:
        raise CheckpointError(
            f"{source}: no classification head ({', '.join(HEAD_KEYS)}); an ingredient is a "
            f"whole classifier (a model soups file holds its head). For a bare CLIP "
            f"checkpoint, build a zero-shot head with `raysoup zeroshot`"
        )
    if missing or extra:
        raise CheckpointError(
            f"{source}: keys do not match {configured} "
            f"(missing {missing[:5]}, unexpected {extra[:5]}; "
            f"{len(missing)} missing, {len(extra)} unexpected in all)"
        )
    wrong = [
        (k, tuple(state_dict[k].shape), tuple(ref.shape))
        for k, ref in template.items()
        if state_dict[k].shape != ref.shape
    ]
    if wrong:
        key, got, want = wrong[0]
        raise CheckpointError(
            f"{source}: key {key} has shape {got}, {configured} has {want}"
            + (
                f" ({len(wrong)} keys differ in shape: a checkpoint of another architecture?)"
                if len(wrong) > 1
                else ""
            )
        )
    for key, ref in template.items():
        t = state_dict[key]
        if t.dtype != ref.dtype:
            raise CheckpointError(f"{source}: key {key} has dtype {t.dtype}, expected {ref.dtype}")
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise CheckpointError(f"{source}: key {key} holds NaN or Inf values")


def read_manifest(zoo: str | Path) -> dict:
    """A zoo's manifest.json: model spec, ingredient files, evaluation set files."""
    location = storage.within(storage.resolve(zoo), "manifest.json", "manifest")
    if not storage.is_file(location):
        raise CheckpointError(
            f"{zoo}: no manifest.json there (build a zoo with `raysoup zoo build --out DIR`)"
        )
    try:
        manifest = json.loads(storage.read_bytes(location).decode("utf-8"))
    except UnicodeDecodeError as e:
        raise CheckpointError(f"zoo manifest {location} is not UTF-8 text ({e})") from None
    except (RaysoupError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read zoo manifest {location}: {e}") from e
    if not isinstance(manifest, dict):
        raise CheckpointError(
            f"zoo manifest {location} must be a JSON object with model, "
            f"ingredients and eval_sets; got a {type(manifest).__name__}"
        )
    missing = [k for k in ("model", "ingredients", "eval_sets") if k not in manifest]
    if missing:
        raise CheckpointError(f"zoo manifest {location} lacks key(s) {missing}")
    return manifest


def ingredient_entries(entries, where: str) -> list[dict]:
    """The manifest's `ingredients` list: each entry an object with a string name and file
    (and optionally a sha256)."""
    if not isinstance(entries, list):
        raise CheckpointError(
            f'{where} ingredients must be a list of {{"name", "file"}} '
            f"objects or a glob pattern, got {type(entries).__name__}"
        )
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not all(
            isinstance(entry.get(k), str) for k in ("name", "file")
        ):
            raise CheckpointError(
                f"{where} ingredients[{i}] = {json.dumps(entry)[:80]}: "
                f'needs "name" and "file" strings'
            )
    return entries


def load_pretrained(zoo: str) -> StateDict | None:
    """The manifest's optional `pretrained` model (e.g. a zero-shot classifier), the
    reference row of a report; None when the manifest has none."""
    entry = read_manifest(zoo).get("pretrained")
    if entry is None:
        return None
    file = entry.get("file") if isinstance(entry, dict) else entry
    if not isinstance(file, str):
        raise CheckpointError(
            f'manifest.json pretrained = {entry!r}: give a file in the zoo, or {{"file": ...}}'
        )
    root = storage.resolve(zoo)
    spec = spec_from_dict(read_manifest(zoo)["model"], storage.join(root, "manifest.json"))
    return family_of(spec).load_ingredient(
        spec, storage.within(root, file, "manifest.json pretrained")
    )


@dataclass(frozen=True)
class Ingredient:
    name: str
    path: str  # a local/shared path or a URI
    sha256: str | None = None  # recorded in the manifest: checked before use


# A save_pretrained folder's weights: what a folder ingredient's recorded sha256 covers.
FOLDER_WEIGHTS = "model.safetensors"


def check_sha256(path: str, expected: str, what: str) -> None:
    """Refuse a file (or a model folder's weights file) whose bytes are not the ones the
    manifest recorded."""
    if not storage.is_uri(path) and Path(path).is_dir():
        path = str(Path(path) / FOLDER_WEIGHTS)
    if not storage.is_file(path):
        raise CheckpointError(f"{what} {path}: no such file")
    if storage.is_uri(path):
        got = hashlib.sha256(storage.read_bytes(path)).hexdigest()
    else:
        got = file_sha256(Path(path))
    if got != expected:
        raise CheckpointError(
            f"{what} {path}: sha256 {got[:16]}... does not match the manifest's "
            f"{expected[:16]}... (the file changed after the zoo was written); restore it, or "
            f"skip the check with `pool.verify_sha256 = false` (raysoup demo --no-verify)"
        )


class IngredientPool:
    """Named ingredient checkpoints of one architecture, loaded lazily from disk."""

    def __init__(self, spec, ingredients: list[Ingredient]):
        if len(ingredients) < 2:
            raise CheckpointError(
                f"need at least 2 ingredients to make a soup, got {len(ingredients)}"
            )
        names = [i.name for i in ingredients]
        if len(set(names)) != len(names):
            raise CheckpointError(f"duplicate ingredient names in {names}")
        self.spec = spec
        self.ingredients = {i.name: i for i in ingredients}

    @classmethod
    def from_zoo(cls, zoo: str | Path) -> IngredientPool:
        """`ingredients` in the manifest: a list of {name, file}, or a glob pattern (e.g.
        "checkpoints/*.pt"; names are the file stems)."""
        zoo = storage.resolve(zoo)
        manifest = read_manifest(zoo)
        where = storage.join(zoo, "manifest.json")
        spec = spec_from_dict(manifest["model"], where)
        entries = manifest["ingredients"]
        if isinstance(entries, str):
            files = storage.glob(zoo, entries, "manifest.json ingredients")
            if not files:
                raise CheckpointError(
                    f"manifest.json ingredients = {entries!r} matches no file in {zoo}"
                )
            entries = [{"name": PurePosixPath(f).stem, "file": f} for f in files]
        entries = ingredient_entries(entries, where)
        return cls(
            spec,
            [
                Ingredient(
                    i["name"],
                    storage.within(zoo, i["file"], f"manifest.json ingredient {i['name']!r} file"),
                    i.get("sha256"),
                )
                for i in entries
            ],
        )

    @property
    def names(self) -> list[str]:
        return list(self.ingredients)

    def __len__(self) -> int:
        return len(self.ingredients)

    def load(self, name: str) -> StateDict:
        return family_of(self.spec).load_ingredient(self.spec, self.ingredients[name].path)

    def validate(self, verify_sha256: bool = True) -> None:
        """Check every ingredient before any evaluation; one resident at a time."""
        family = family_of(self.spec)
        template = state_dict_template(self.spec)
        family.check_pool(self.spec, {i.name: i.path for i in self.ingredients.values()})
        for ingredient in self.ingredients.values():
            if verify_sha256 and ingredient.sha256:
                check_sha256(ingredient.path, ingredient.sha256, "ingredient")
            check_state_dict(
                self.load(ingredient.name),
                template,
                str(ingredient.path),
                family.architecture(self.spec),
            )
