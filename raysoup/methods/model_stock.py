"""Model Stock (Jang et al. 2024, arXiv 2403.19522): per layer, pull the average of the
fine-tunes towards the pretrained weights by a ratio set by the angle between their
deltas. No validation search: val only judges the result."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..errors import RaysoupError
from ..mixing import StateDict
from .base import MethodResult, SoupContext, register


def interpolation_ratio(cos_theta: float, n: int) -> float:
    """t = N cos(theta) / (1 + (N - 1) cos(theta)), the paper's ratio for N fine-tunes."""
    return n * cos_theta / (1.0 + (n - 1) * cos_theta)


def model_stock_merge(pretrained: StateDict, ingredients: Iterable[StateDict]) -> StateDict:
    """w = t * mean(w_i) + (1 - t) * w_0 per weight tensor, cos(theta) being the mean
    pairwise cosine of the deltas d_i = w_i - w_0 (as mergekit reads the paper for N > 2),
    clipped to [0, 1] so that opposed deltas give w_0, never an extrapolation. Non-float
    tensors keep the pretrained values.

    Streamed, one ingredient resident at a time: with u_i = d_i / |d_i|,
    sum_{i<j} u_i . u_j = (|sum_i u_i|^2 - N) / 2.
    """
    weight_sum: dict[str, torch.Tensor] = {}
    unit_sum: dict[str, torch.Tensor] = {}
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
        n += 1
    if n < 2:
        raise RaysoupError(f"model_stock needs at least 2 ingredients, the pool has {n}")
    merged: StateDict = {}
    for key, base in pretrained.items():
        if not base.is_floating_point():
            merged[key] = base.clone()
            continue
        pairs = n * (n - 1) / 2
        cos = (float(unit_sum[key].square().sum()) - nonzero[key]) / 2 / pairs
        t = interpolation_ratio(min(1.0, max(0.0, cos)), n)
        merged[key] = (t * weight_sum[key] / n + (1.0 - t) * base.double()).to(base.dtype)
    return merged


@register("model_stock", needs_pretrained=True)
def model_stock(ctx: SoupContext) -> MethodResult:
    names = ctx.pool.names
    merged = model_stock_merge(ctx.pretrained, (ctx.pool.load(n) for n in names))
    return MethodResult(merged, names, 0, ranked=False)
