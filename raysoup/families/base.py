"""What raysoup needs of a model family, and the registry of families.

A family turns a manifest's `model` entry into a typed spec and, from the spec: the model
skeleton (no weights downloaded), the state-dict layout ingredients are checked against,
the forward pass from a batch of an evaluation set to per-example logits, the component
presets that make sense for its key layout, and how ingredients are read and exported.
``FAMILIES[name]`` holds one instance per family (``raysoup.families.<name>``).
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..components import PRESETS
from ..errors import RaysoupError

StateDict = dict[str, torch.Tensor]
# One batch of an evaluation set as the model takes it: uint8 images (N, C, H, W), or named
# tensors (input_ids, attention_mask, ...) passed as keyword arguments.
Batch = torch.Tensor | dict[str, torch.Tensor]
# What a family's evaluation sets hold: an image shape (channels, height, width) or "text".
Inputs = tuple[int, ...] | str

FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    FAMILIES[family.name] = family
    return family


class Family:
    name: str = ""
    # Component presets by name (granularity-*, per-block, per-layer-type, whole-model).
    presets: Mapping[str, Callable[[str], str]] = PRESETS

    def spec_from_dict(self, entry: dict, where: str):
        raise NotImplementedError

    def build(self, spec, device: str = "cpu") -> nn.Module:
        """The skeleton, randomly initialised (weights come from an ingredient after)."""
        raise NotImplementedError

    def template(self, spec) -> StateDict:
        """Keys, shapes and dtypes every ingredient must have (meta tensors)."""
        with torch.device("meta"):  # shapes only: no memory, no random init
            return self.build(spec, device="meta").state_dict()

    def inputs(self, spec) -> Inputs:
        raise NotImplementedError

    def encode(self, spec, columns) -> Batch:
        """An evaluation set's rows (uint8 images, or a dict of text columns) as tensors on
        the CPU, indexable by row."""
        return torch.from_numpy(np.array(columns))

    def arguments(self, spec, batch: Batch) -> tuple[tuple, dict]:
        """The model's call arguments for a batch on its device."""
        return ((batch,), {}) if isinstance(batch, torch.Tensor) else ((), batch)

    def logits(self, output) -> torch.Tensor:
        return output

    def forward(
        self, spec, model: nn.Module, batch: Batch, params: Mapping[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Per-example logits of `model` on `batch` (with `params` in place of its own
        weights: learned soup's differentiable mix)."""
        args, kwargs = self.arguments(spec, batch)
        if params is None:
            return self.logits(model(*args, **kwargs))
        from torch.func import functional_call

        return self.logits(functional_call(model, dict(params), args, kwargs))

    def example_batch(self, spec) -> Batch:
        """Two rows of zeros of the family's input, for tracing which weights it uses."""
        return torch.zeros(2, *self.inputs(spec), dtype=torch.uint8)

    def load_ingredient(self, spec, path: str) -> StateDict:
        raise NotImplementedError

    def export(self, spec, fused: StateDict, like: str, out: Path) -> Path:
        """`fused` in the format of ingredient file/folder `like`, written to `out`."""
        raise NotImplementedError

    def describe(self, spec) -> str:
        """The model in a plan line."""
        return self.name

    def architecture(self, spec) -> str:
        """The model in a checkpoint error ('' = "the configured model")."""
        return self.describe(spec)

    def check_text(self, spec) -> None:
        """What text sets need (a tokenizer), checked before any cluster work."""
        from ..errors import RaysoupError

        raise RaysoupError(
            f"the {self.name} family takes images; a text evaluation set "
            f'needs a text model (family = "transformers")'
        )

    def check_pool(self, spec, paths: Mapping[str, str]) -> None:
        """Checks across the pool's ingredients before their weights are read."""


def as_float32(state: StateDict) -> StateDict:
    """Mixed in fp32 whatever the files hold (export casts back)."""
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def take_rows(batch: Batch, index) -> Batch:
    return (
        batch[index] if isinstance(batch, torch.Tensor) else {k: v[index] for k, v in batch.items()}
    )


def to_device(batch: Batch, device) -> Batch:
    return (
        torch.as_tensor(batch).to(device)
        if not isinstance(batch, dict)
        else {k: torch.as_tensor(v).to(device) for k, v in batch.items()}
    )


def family_of(spec) -> Family:
    return FAMILIES[spec.family]


def build_model(spec, device: str = "cpu") -> nn.Module:
    from ..inputs.model import check_models_allowed

    check_models_allowed(device)
    return family_of(spec).build(spec, device)


def state_dict_template(spec) -> StateDict:
    return family_of(spec).template(spec)


def spec_from_dict(entry: Any, where: str = "manifest.json"):
    """A manifest's `model` entry as its family's typed spec. Without a `family` key it
    means what it always did: an open_clip architecture if `arch` is given, else the
    testbed's tower."""
    if not isinstance(entry, dict):
        raise RaysoupError(f"{where}: model must be a table of keys, got {entry!r}")
    entry = dict(entry)
    name = entry.pop("family", None)
    if name is None:
        name = "open_clip" if entry.get("arch") else "testbed"
    if name not in FAMILIES:
        close = difflib.get_close_matches(str(name), FAMILIES, n=2)
        raise RaysoupError(
            f"{where}: model.family = {name!r} is not a model family; "
            + (f"did you mean {' or '.join(map(repr, close))}? " if close else "")
            + f"families: {', '.join(sorted(FAMILIES))}"
        )
    return FAMILIES[name].spec_from_dict(entry, where)


def relative_folder(where: str, path: str, key: str) -> str:
    """`path` as given in the manifest `where`, resolved against the manifest's folder; it
    must be a folder."""
    from ..inputs import storage

    folder = storage.within(os.path.dirname(str(where)), path, f"{where}: {key}")
    if not os.path.isdir(folder):
        raise RaysoupError(f"{where}: {key} = {path!r}: no such folder")
    return os.path.abspath(folder)


def export_state_dict_like(fused: StateDict, like: str, out: Path) -> Path:
    """`fused` with the keys, `module.` prefix, dtypes and container (safetensors, or a
    torch.save'd state dict) of the ingredient file `like`; tensors the fused model does not
    hold (a kept text transformer) are the ingredient's own."""
    from safetensors.torch import save_file

    from ..inputs.model import DATA_PARALLEL_PREFIX
    from ..inputs.weights import load_state_dict

    original = load_state_dict(like)
    prefix = (
        DATA_PARALLEL_PREFIX
        if original and all(k.startswith(DATA_PARALLEL_PREFIX) for k in original)
        else ""
    )
    exported = {}
    for key, tensor in original.items():
        ours = key[len(prefix) :]
        exported[key] = fused[ours].to(tensor.dtype) if ours in fused else tensor
    missing = sorted(set(fused) - {k[len(prefix) :] for k in original})
    if missing:
        raise RaysoupError(
            f"ingredient {like} lacks {len(missing)} key(s) of the fused "
            f"model (e.g. {missing[0]}): not the same architecture"
        )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    if str(like).endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in exported.items()}, str(tmp))
    else:
        torch.save(exported, tmp)
    tmp.replace(out)
    return out
