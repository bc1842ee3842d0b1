"""Model Stock (Jang et al. 2024, arXiv 2403.19522): per layer, pull the average of the
fine-tunes towards the pretrained weights by a ratio set by the angle between their
deltas. No validation search: val only judges the result."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict
from typing import Annotated, ClassVar, Literal

import torch
from pydantic import Field

from ..errors import RaysoupError
from ..mixing import StateDict
from ..typed import section_config
from .base import MethodResult, SoupContext, register


@section_config
class ModelStockConfig:
    """The defaults: mergekit's reading of the paper for N > 2, with t clipped (the demo's
    table comes from them); docs/methods/task_vectors.md compares the peers."""

    SECTION: ClassVar[str] = "model_stock"
    SUMMARY: ClassVar[str] = ""
    clip: Annotated[
        bool,
        Field(
            description=(
                "clip t to [0, 1]: opposed deltas give w_0, never an extrapolation; false: "
                "extrapolate (both peers)"
            )
        ),
    ] = True
    average: Annotated[
        Literal["cosine", "angle"],
        Field(
            description=('mean pairwise cosine, or "angle": cos of the mean angle (FusionBench)')
        ),
    ] = "cosine"

    def to_dict(self) -> dict:
        return asdict(self)


def interpolation_ratio(cos_theta: float, n: int) -> float:
    """t = N cos(theta) / (1 + (N - 1) cos(theta)), the paper's ratio for N fine-tunes."""
    return n * cos_theta / (1.0 + (n - 1) * cos_theta)


def model_stock_merge(
    pretrained: StateDict,
    ingredients: Iterable[StateDict],
    config: ModelStockConfig = ModelStockConfig(),
) -> StateDict:
    """w = t * mean(w_i) + (1 - t) * w_0 per weight tensor, with t = interpolation_ratio of
    cos(theta), over the deltas d_i = w_i - w_0 (flattened; a zero delta counts as cosine
    0 with every other):
    - `average` "cosine": cos(theta) is the mean pairwise cosine (mergekit's reading of the
      paper for N > 2). Streamed, one ingredient resident at a time: with u_i = d_i / |d_i|,
      sum_{i<j} u_i . u_j = (|sum_i u_i|^2 - #nonzero) / 2.
    - "angle": cos(theta) is the cosine of the mean pairwise angle (FusionBench's). Holds
      every ingredient's unit delta at once.
    - `clip`: clip cos(theta), hence t, to [0, 1]; off, a negative cos(theta) gives t < 0
      (both peers extrapolate away from the fine-tunes' average).
    Non-float tensors keep the pretrained values."""
    weight_sum: dict[str, torch.Tensor] = {}
    unit_sum: dict[str, torch.Tensor] = {}
    units: dict[str, list[torch.Tensor]] = {}
    nonzero: dict[str, int] = {}
    n = 0
    for sd in ingredients:
        for key, base in pretrained.items():
            if not base.is_floating_point():
                continue
            w = sd[key].double()
            delta = (w - base.double()).flatten()
            norm = float(delta.norm())
            unit = delta / norm if norm > 0 else torch.zeros_like(delta)
            weight_sum[key] = w if n == 0 else weight_sum[key] + w
            unit_sum[key] = unit if n == 0 else unit_sum[key] + unit
            nonzero[key] = nonzero.get(key, 0) + (norm > 0)
            if config.average == "angle":
                units.setdefault(key, []).append(unit)
        n += 1
    if n < 2:
        raise RaysoupError(f"model_stock needs at least 2 ingredients, the pool has {n}")
    merged: StateDict = {}
    for key, base in pretrained.items():
        if not base.is_floating_point():
            merged[key] = base.clone()
            continue
        if config.average == "cosine":
            pairs = n * (n - 1) / 2
            cos = (float(unit_sum[key].square().sum()) - nonzero[key]) / 2 / pairs
        else:
            u = units[key]
            angles = [
                math.acos(max(-1.0, min(1.0, float(u[i] @ u[j]))))
                for i in range(n)
                for j in range(i + 1, n)
            ]
            cos = math.cos(sum(angles) / len(angles))
        if config.clip:
            cos = min(1.0, max(0.0, cos))
        elif 1.0 + (n - 1) * cos == 0.0:
            raise RaysoupError(
                f"model_stock (clip = false): the deltas of {key!r} cancel "
                f"out (cos(theta) = -1/(N-1)), so t is infinite"
            )
        t = interpolation_ratio(cos, n)
        merged[key] = (t * weight_sum[key] / n + (1.0 - t) * base.double()).to(base.dtype)
    return merged


@register("model_stock", config=ModelStockConfig, needs_pretrained=True)
def model_stock(ctx: SoupContext, config: ModelStockConfig = ModelStockConfig()) -> MethodResult:
    names = ctx.pool.names
    merged = model_stock_merge(ctx.pretrained, (ctx.pool.load(n) for n in names), config)
    return MethodResult(merged, names, 0, ranked=False)
