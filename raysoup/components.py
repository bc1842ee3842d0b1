"""Components ("latent space manifolds"): a partition of state-dict keys into named groups.

Every key belongs to exactly one component. Presets:
- ``granularity-0`` .. ``granularity-3``: the reference's key-depth grouping. Level L keeps
  the first L+1 dot-separated tokens of a key; granularity 3 is level 2 with one component
  per visual resblock. On the model soups ViT-B/32 layout: 2 / 8 / 15 / 26 components.
- ``per-block``: one component per transformer block, everything else by level 2 (a
  family's own block layout: BLOCK_PRESETS, TIMM_PRESETS).
- ``per-layer-type``: one component per kind of layer across blocks (every block's query
  projection together, ...): block indices dropped, then the parameter name.
- ``whole-model``: one component.
- a user spec: ordered (name, regex) rules; a key goes to the first rule it matches.
``drop_unused`` leaves out keys the classifier's forward pass never uses (e.g. a CLIP text
tower): they are not mixed, and the accumulator's values are kept for them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from .errors import RaysoupError

_RESBLOCK = re.compile(r"^(.*\.resblocks\.\d+)\.")
_VISUAL_RESBLOCK = re.compile(r"^(.*visual\.transformer\.resblocks\.\d+)\.")


class ComponentError(RaysoupError):
    pass


@dataclass(frozen=True)
class Components:
    names: tuple[str, ...]
    keys: tuple[tuple[str, ...], ...]  # keys[i] are the state-dict keys of component names[i]
    unmixed: tuple[str, ...] = ()  # keys left out of mixing (accumulator value kept)

    def __len__(self) -> int:
        return len(self.names)

    def to_dict(self) -> dict:
        return {
            "names": list(self.names),
            "keys": [list(k) for k in self.keys],
            "unmixed": list(self.unmixed),
        }


def _depth_prefix(key: str, level: int) -> str:
    tokens = key.split(".")
    return ".".join(tokens[: min(level, len(tokens) - 1) + 1])


def _group(keys: Iterable[str], name_of) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for key in keys:
        groups.setdefault(name_of(key), []).append(key)
    return groups


def _block_or_level(pattern: re.Pattern, level: int):
    def name_of(key: str) -> str:
        m = pattern.match(key)
        return m.group(1) if m else _depth_prefix(key, level)

    return name_of


def _layer_type(key: str) -> str:
    return _depth_prefix(_BLOCK_INDEX.sub("*", key), max(0, len(key.split(".")) - 2))


_BLOCK_INDEX = re.compile(r"(?<=\.)\d+(?=\.)")

PRESETS = {
    "granularity-0": lambda key: _depth_prefix(key, 0),
    "granularity-1": lambda key: _depth_prefix(key, 1),
    "granularity-2": lambda key: _depth_prefix(key, 2),
    "granularity-3": _block_or_level(_VISUAL_RESBLOCK, 2),
    "per-block": _block_or_level(_RESBLOCK, 2),
    "per-layer-type": _layer_type,
    "whole-model": lambda key: "model",
}
# Blocks of Hugging Face and timm layouts (encoder.layer.3., blocks.3., stages.1.blocks.2.,
# h.3., layers.3.): their families' `per-block`.
_ANY_BLOCK = re.compile(r"^((?:.*?\.)?(?:resblocks|layer|layers|blocks|block|h)\.\d+)\.")
BLOCK_PRESETS = {**PRESETS, "per-block": _block_or_level(_ANY_BLOCK, 2)}
# timm's blocks (blocks.3., stages.1.blocks.2., layers.0.blocks.1., ResNet's layer2.1.): the
# innermost block; a stage's own weights (a downsample) are the stage's component, and the
# rest (stem, norm, head) one per top-level module.
_TIMM_BLOCK = re.compile(r"(?:^|\.)(?:(?:blocks|layers|stages)\.\d+|layer\d+\.\d+)(?=\.)")


def _timm_block(key: str) -> str:
    last = None
    for last in _TIMM_BLOCK.finditer(key):
        pass
    return key[: last.end()] if last else _depth_prefix(key, 0)


TIMM_PRESETS = {**PRESETS, "per-block": _timm_block}


def _rules_name_of(rules: Sequence[tuple[str, str]]):
    try:
        compiled = [(name, re.compile(rx)) for name, rx in rules]
    except re.error as e:
        raise ComponentError(f"invalid component regex: {e}") from e

    def name_of(key: str) -> str:
        for name, rx in compiled:
            if rx.search(key):
                return name
        raise ComponentError(f"component spec leaves key {key!r} uncovered")

    return name_of


def partition(
    keys: Sequence[str],
    preset: str | Sequence[tuple[str, str]],
    unused: Iterable[str] = (),
    presets: Mapping = PRESETS,
) -> Components:
    """Split `keys` into components by a preset name (of `presets`: the model family's) or
    ordered (name, regex) rules."""
    if isinstance(preset, str):
        if preset not in presets:
            raise ComponentError(
                f"unknown components preset {preset!r}; "
                f"choose one of {sorted(presets)} or give regex rules"
            )
        name_of = presets[preset]
    else:
        name_of = _rules_name_of(preset)
    unused = set(unused)
    groups = _group((k for k in keys if k not in unused), name_of)
    if not groups:
        raise ComponentError("no keys left to mix")
    return Components(
        tuple(groups),
        tuple(tuple(v) for v in groups.values()),
        tuple(k for k in keys if k in unused),
    )


def check_partition(components: Components, keys: Sequence[str]) -> None:
    """Every key in exactly one component (or explicitly unmixed)."""
    seen: dict[str, str] = {}
    for name, group in zip(components.names, components.keys):
        for key in group:
            if key in seen:
                raise ComponentError(
                    f"key {key!r} is in two components: {seen[key]!r} and {name!r}"
                )
            seen[key] = name
    for key in components.unmixed:
        if key in seen:
            raise ComponentError(f"key {key!r} is both unmixed and in component {seen[key]!r}")
        seen[key] = "<unmixed>"
    uncovered = [k for k in keys if k not in seen]
    if uncovered:
        raise ComponentError(f"components leave keys uncovered: {uncovered[:5]}")
    unknown = [k for k in seen if k not in set(keys)]
    if unknown:
        raise ComponentError(f"components name keys the model does not have: {unknown[:5]}")


def unused_keys(model: torch.nn.Module, example_input, forward=None) -> list[str]:
    """Parameters that receive no gradient from the classifier's forward pass
    (`forward(model, example_input)`, default `model(example_input)`)."""
    model.zero_grad(set_to_none=True)
    (forward(model, example_input) if forward else model(example_input)).sum().backward()
    unused = [name for name, p in model.named_parameters() if p.grad is None]
    model.zero_grad(set_to_none=True)
    return unused
