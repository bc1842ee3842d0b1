"""TIES-merging (Yadav et al. 2023, arXiv 2306.01708): trim each task vector to its
largest entries, elect a sign per parameter, average the entries that agree with it, and
add the result, scaled, to the pretrained weights. The scale and the density are chosen on
val by the run's search (Tune + nevergrad on the evaluator pool)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, ClassVar

import numpy as np
import torch
from pydantic import Field

from ..components import Components
from ..mixing import StateDict
from .base import KnobSearch, MethodResult, SoupContext, register, tune_knobs


def ties_merge(pretrained: StateDict, ingredients: Sequence[StateDict], scale: float,
               density: float) -> StateDict:
    """w_0 + lambda * tau_m, where, over every float tensor flattened into one task vector
    tau_i = w_i - w_0 per ingredient:
    1. trim: keep the round(density * P) entries of largest magnitude of each tau_i;
    2. elect: gamma = sign(sum_i trimmed tau_i) per parameter;
    3. disjoint mean: tau_m = mean of the trimmed entries whose sign is gamma (0 if none).
    Holds N x P floats (the task vectors) at once. Non-float tensors keep w_0's values."""
    keys = [k for k, v in pretrained.items() if v.is_floating_point()]
    w0 = torch.cat([pretrained[k].flatten().float() for k in keys])
    tau = torch.stack([torch.cat([sd[k].flatten().float() for k in keys]) - w0
                       for sd in ingredients])
    keep = max(1, min(tau.shape[1], int(round(density * tau.shape[1]))))
    magnitude = tau.abs()
    threshold = magnitude.kthvalue(tau.shape[1] - keep + 1, dim=1, keepdim=True).values
    trimmed = torch.where(magnitude >= threshold, tau, torch.zeros_like(tau))
    elected = torch.sign(trimmed.sum(dim=0))
    agrees = (torch.sign(trimmed) == elected) & (trimmed != 0)
    merged_tau = (trimmed * agrees).sum(dim=0) / agrees.sum(dim=0).clamp(min=1)
    merged: StateDict = {k: v.clone() for k, v in pretrained.items()
                         if not v.is_floating_point()}
    offset = 0
    for key in keys:
        base = pretrained[key]
        part = merged_tau[offset:offset + base.numel()].view_as(base)
        merged[key] = (base.double() + scale * part.double()).to(base.dtype)
        offset += base.numel()
    return {k: merged[k] for k in pretrained}


def ties_mixer(models: Sequence[StateDict], x: np.ndarray, components: Components) -> StateDict:
    """models = [pretrained, *ingredients]; x = [lambda, density]."""
    return ties_merge(models[0], models[1:], float(x[0]), float(x[1]))


@dataclass(frozen=True)
class TiesMergingConfig(KnobSearch):
    """The search starts at the paper's defaults (lambda 1, density 0.2)."""
    SECTION: ClassVar[str] = "ties_merging"
    budget: Annotated[int, Field(ge=1)] = 20
    scale_bounds: tuple[float, float] = (0.0, 2.0)
    density_bounds: tuple[float, float] = (0.05, 1.0)
    start: tuple[float, float] = (1.0, 0.2)   # (lambda, density)

    def check(self) -> None:
        self.check_bounds("scale_bounds")
        self.check_bounds("density_bounds", 0.0, 1.0)


@register("ties_merging", config=TiesMergingConfig, needs_pretrained=True)
def ties_merging(ctx: SoupContext, config: TiesMergingConfig = TiesMergingConfig()
                 ) -> MethodResult:
    names = ctx.pool.names
    ingredients = [ctx.pool.load(n) for n in names]
    lower = [config.scale_bounds[0], config.density_bounds[0]]
    upper = [config.scale_bounds[1], config.density_bounds[1]]
    start = np.clip(config.start, lower, upper)
    merged, details = tune_knobs(ctx, [ctx.pretrained, *ingredients], ties_mixer,
                                 ["lambda", "density"], start, lower, upper, config)
    return MethodResult(merged, names, len(details.trace), ranked=False, details=details)
