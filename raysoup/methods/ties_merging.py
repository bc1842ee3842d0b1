"""TIES-merging (Yadav et al. 2023, arXiv 2306.01708): trim each task vector to its
largest entries, elect a sign per parameter, average the entries that agree with it, and
add the result, scaled, to the pretrained weights. The scale and the density are chosen on
val by the run's search (Tune + nevergrad on the evaluator pool).

The paper, per parameter p, with task vectors tau_i = w_i - w_0:
    trim:  tau^_i = tau_i with all but its top-k% entries by magnitude set to 0
    elect: gamma^p = sgn(sum_i tau^_i^p)
    merge: A^p = {i : sgn(tau^_i^p) = gamma^p},  tau_m^p = (1 / |A^p|) sum_{i in A^p} tau^_i^p
    w = w_0 + lambda tau_m
It leaves three conventions open, each an option here (docs/methods/task_vectors.md
compares them with mergekit's, FusionBench's and the authors' code): where to trim (`trim`),
how many entries top-k% is (`topk`), and what an exact zero sign sum elects (`zero_sign`).

With `dare` > 0 each task vector is dropped and rescaled first (DARE, raysoup/methods/
dare.py) and TIES then trims, elects and merges the result, as the DARE paper plugs DARE
into TIES; at density 1 that is mergekit's `dare_ties` (random drop instead of the trim)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal

import numpy as np
import torch
from pydantic import Field

from ..components import Components
from ..mixing import StateDict
from ..typed import Interval, section_config
from .base import Budget, KnobSearch, MethodResult, ScaleBounds, SoupContext, register, tune_knobs
from .dare import DareKnobs, drop_and_rescale

Trim = Literal["global", "per_tensor"]
TopK = Literal["round", "floor", "floor_plus_one"]
ZeroSign = Literal["zero", "positive", "majority"]


def keep_count(density: float, size: int, topk: TopK) -> int:
    """Entries of `size` that top-k% keeps, before ties at the cutoff, within [1, size]:
    round(density * size) (half to even), int(density * size), or int(density * size) + 1."""
    k = {
        "round": round(density * size),
        "floor": int(density * size),
        "floor_plus_one": int(density * size) + 1,
    }[topk]
    return max(1, min(size, k))


def trim(tau: torch.Tensor, density: float, topk: TopK) -> torch.Tensor:
    """Each row of `tau` (N x P) with its entries below the k-th largest magnitude set to 0:
    the kept count is keep_count(), plus every entry tied with the last one kept."""
    magnitude = tau.abs()
    keep = keep_count(density, tau.shape[1], topk)
    threshold = magnitude.kthvalue(tau.shape[1] - keep + 1, dim=1, keepdim=True).values
    return torch.where(magnitude >= threshold, tau, torch.zeros_like(tau))


def elect(trimmed: torch.Tensor, zero_sign: ZeroSign) -> torch.Tensor:
    """gamma = sgn(sum_i trimmed_i) per parameter; where the sum is exactly 0: 0 ("zero":
    nothing agrees, the parameter keeps w_0), +1 ("positive"), or the sign of the sum of
    all elected signs ("majority")."""
    total = trimmed.sum(dim=0)
    if zero_sign == "positive":
        return torch.where(total >= 0, 1.0, -1.0).to(total.dtype)
    elected = torch.sign(total)
    if zero_sign == "majority":
        elected[elected == 0] = torch.sign(elected.sum())
    return elected


def ties_merge(
    pretrained: StateDict,
    ingredients: Sequence[StateDict],
    scale: float,
    density: float,
    trim_over: Trim = "global",
    topk: TopK = "round",
    zero_sign: ZeroSign = "zero",
    dare: float = 0.0,
    dare_seed: int = 0,
) -> StateDict:
    """w_0 + lambda * tau_m over every float tensor, the task vectors (DARE_p of them when
    `dare` > 0) flattened into one vector per ingredient; `trim_over` "global" ranks
    magnitudes over that whole vector, "per_tensor" within each tensor. The disjoint mean is
    0 where no entry agrees. Holds N x P floats (the task vectors) at once. Non-float
    tensors keep w_0's values."""
    keys = [k for k, v in pretrained.items() if v.is_floating_point()]
    tau = torch.stack(
        [
            torch.cat(
                [
                    drop_and_rescale(
                        sd[k].flatten().float() - pretrained[k].flatten().float(),
                        dare,
                        dare_seed,
                        i,
                        k,
                    )
                    for k in keys
                ]
            )
            for i, sd in enumerate(ingredients)
        ]
    )
    if trim_over == "global":
        trimmed = trim(tau, density, topk)
    else:
        sizes = [pretrained[k].numel() for k in keys]
        trimmed = torch.cat([trim(part, density, topk) for part in tau.split(sizes, dim=1)], dim=1)
    elected = elect(trimmed, zero_sign)
    agrees = (torch.sign(trimmed) == elected) & (trimmed != 0)
    merged_tau = (trimmed * agrees).sum(dim=0) / agrees.sum(dim=0).clamp(min=1)
    merged: StateDict = {k: v.clone() for k, v in pretrained.items() if not v.is_floating_point()}
    offset = 0
    for key in keys:
        base = pretrained[key]
        part = merged_tau[offset : offset + base.numel()].view_as(base)
        merged[key] = (base.double() + scale * part.double()).to(base.dtype)
        offset += base.numel()
    return {k: merged[k] for k in pretrained}


@dataclass(frozen=True)
class TiesMixer:
    """models = [pretrained, *ingredients]; x = [lambda, density], or [lambda, density, p]
    when DARE's p is searched (else p = `dare`); the conventions fixed."""

    trim: Trim = "global"
    topk: TopK = "round"
    zero_sign: ZeroSign = "zero"
    dare: float = 0.0
    dare_seed: int = 0

    def __call__(
        self, models: Sequence[StateDict], x: np.ndarray, components: Components
    ) -> StateDict:
        p = float(x[2]) if len(x) > 2 else self.dare
        return ties_merge(
            models[0],
            models[1:],
            float(x[0]),
            float(x[1]),
            self.trim,
            self.topk,
            self.zero_sign,
            p,
            self.dare_seed,
        )


@section_config
class TiesMergingConfig(DareKnobs, KnobSearch):
    """The search starts at the paper's defaults (lambda 1, density 0.2). The conventions
    default to a global trim to round(density * P) entries (ties at the cutoff kept) and a
    zero sign sum electing nothing (the demo's table comes from them); DARE off."""

    SECTION: ClassVar[str] = "ties_merging"
    SUMMARY: ClassVar[str] = "trim, elect sign, disjoint mean; lambda and density on val"
    budget: Budget = 20
    scale_bounds: Annotated[ScaleBounds, Field(description="lambda's range")] = (0.0, 2.0)
    density_bounds: Annotated[
        Interval(0.0, 1.0),
        Field(description=("share of each task vector kept (after DARE, if on)")),
    ] = (0.05, 1.0)
    start: Annotated[
        tuple[float, float], Field(description=("(lambda, density): the paper's defaults"))
    ] = (1.0, 0.2)
    trim: Annotated[
        Trim,
        Field(
            description=('rank magnitudes over the whole task vector, or "per_tensor" (mergekit)')
        ),
    ] = "global"
    topk: Annotated[
        TopK,
        Field(
            description=(
                'keep round(density P) entries, "floor": int(density P) (mergekit), "floor_plus_one" '
                "(authors); ties kept"
            )
        ),
    ] = "round"
    zero_sign: Annotated[
        ZeroSign,
        Field(
            description=(
                'a zero sign sum elects nothing, "positive" (mergekit) or "majority" (authors, '
                "FusionBench)"
            )
        ),
    ] = "zero"


@register("ties_merging", config=TiesMergingConfig, needs_pretrained=True)
def ties_merging(ctx: SoupContext, config: TiesMergingConfig = TiesMergingConfig()) -> MethodResult:
    names = ctx.pool.names
    ingredients = [ctx.pool.load(n) for n in names]
    knobs, dare_start, dare_lower, dare_upper = config.dare_knob()
    lower = [config.scale_bounds[0], config.density_bounds[0], *dare_lower]
    upper = [config.scale_bounds[1], config.density_bounds[1], *dare_upper]
    start = np.clip([*config.start, *dare_start], lower, upper)
    mixer = TiesMixer(config.trim, config.topk, config.zero_sign, config.dare, config.dare_seed)
    merged, details = tune_knobs(
        ctx,
        [ctx.pretrained, *ingredients],
        mixer,
        ["lambda", "density", *knobs],
        start,
        lower,
        upper,
        config,
    )
    return MethodResult(merged, names, len(details.trace), ranked=False, details=details)
