"""Iso-C (Marczak et al. 2025, arXiv 2502.04959, "No Task Left Behind: Isotropic Model
Merging with Common and Task-Specific Subspaces"): per layer, sum the task matrices and
flatten the spectrum of the sum, so that no direction dominates; the result, scaled by
alpha (chosen on val by the run's search), is added to the pretrained weights.

Per 2-D weight, with task matrices Delta_i = W_i - W_0 (r = min(m, n)):
    Delta_TA = sum_i Delta_i = U S V^T (thin SVD),  sigma = (1 / r) sum_j S_jj
    Delta = sigma U V^T,   W = W_0 + alpha Delta
Every other float tensor: Delta = mean_i (w_i - w_0), as the authors' code does.
Conventions: sigma is the mean of all r singular values of the sum, zeros included (the
authors' code); the SVD is computed in float64. Streamed: one ingredient is read at a
time, the running sum is the only other model held.

Iso-CTS (`iso_cts`, the same paper) keeps the top c singular vectors of Delta_TA as a common
subspace and gives each task s more of its own, from what the common subspace leaves of it:
    c = r - T round((r - floor(f r)) / T),  s = (r - c) / T      (f: common_space_fraction)
    Delta_TA = U S V^T;  for each task: Delta_i - U_c U_c^T Delta_i = U_i S_i V_i^T
    U' = polar([U_1[:, :s] ... U_T[:, :s]  U[:, :c]]), V' likewise,
    sigma = mean(S_1[:s] ... S_T[:s]  S[:c]),   Delta = sigma U' V'^T
as the authors' code does (c rounded so that the task-specific part divides by T). It
reads the pool twice (the sum, then each task's residual) and holds U_c of every matrix."""

from __future__ import annotations

from typing import Annotated, ClassVar

import torch
from pydantic import Field

from ..typed import section_config
from .base import MethodResult, SoupContext, register
from .merged_delta import ScaleSearch, is_matrix, polar, task_vectors, tune_scale


def isotropic(m: torch.Tensor) -> torch.Tensor:
    """m with every singular value replaced by their mean: mean(S) U V^T."""
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    return s.mean() * (u @ vh)


def iso_c_delta(ctx: SoupContext) -> dict[str, torch.Tensor]:
    """The Iso-C merged task vector (float64) of the context's pool, streamed."""
    sums: dict[str, torch.Tensor] = {}
    for i, key, d in task_vectors(ctx):
        sums[key] = d if i == 0 else sums[key] + d
    n = len(ctx.pool.names)
    return {
        k: isotropic(total) if is_matrix(ctx.pretrained[k]) else total / n
        for k, total in sums.items()
    }


@section_config
class IsoCConfig(ScaleSearch):
    """alpha starts at 1.0 and is searched within `scale_bounds` (the authors choose it on
    validation data too)."""

    SECTION: ClassVar[str] = "iso_c"
    SUMMARY: ClassVar[str] = (
        "the summed task matrices with a flat spectrum (mean singular value); alpha chosen on val"
    )


@register("iso_c", config=IsoCConfig, needs_pretrained=True)
def iso_c(ctx: SoupContext, config: IsoCConfig = IsoCConfig()) -> MethodResult:
    return tune_scale(ctx, iso_c_delta(ctx), config)


def common_size(r: int, tasks: int, fraction: float) -> int:
    """c: the common subspace's size, rounded so that r - c divides by the task count (the
    authors' rounding; where it rounds past r, one vector less per task)."""
    c = r - round((r - int(r * fraction)) / tasks) * tasks
    return c if c >= 0 else c + tasks


def iso_cts_delta(ctx: SoupContext, fraction: float) -> dict[str, torch.Tensor]:
    """The Iso-CTS merged task vector (float64) of the context's pool, in two streamed
    passes."""
    sums: dict[str, torch.Tensor] = {}
    for i, key, d in task_vectors(ctx):
        sums[key] = d if i == 0 else sums[key] + d
    n = len(ctx.pool.names)
    delta = {k: total / n for k, total in sums.items() if not is_matrix(ctx.pretrained[k])}
    common, own = {}, {}
    for key, total in sums.items():
        if key in delta:
            continue
        r = min(total.shape)
        c = common_size(r, n, fraction)
        u, s, vh = torch.linalg.svd(total, full_matrices=False)
        common[key] = (u[:, :c].clone(), s[:c].clone(), vh[:c].clone())
        own[key] = ((r - c) // n, [])
    del sums
    for _, key, d in task_vectors(ctx):
        if key in own:
            u_c = common[key][0]
            u, s, vh = torch.linalg.svd(d - u_c @ (u_c.T @ d), full_matrices=False)
            k, parts = own[key]
            parts.append((u[:, :k].clone(), s[:k].clone(), vh[:k].clone()))
    for key, (u_c, s_c, vh_c) in common.items():
        parts = own[key][1]
        u = torch.cat([*(p[0] for p in parts), u_c], dim=1)
        s = torch.cat([*(p[1] for p in parts), s_c])
        vh = torch.cat([*(p[2] for p in parts), vh_c], dim=0)
        delta[key] = s.mean() * polar(u) @ polar(vh)
    return delta


@section_config
class IsoCtsConfig(ScaleSearch):
    """alpha as for Iso-C; the common subspace's share of each matrix's rank is fixed (the
    authors' 0.8)."""

    SECTION: ClassVar[str] = "iso_cts"
    SUMMARY: ClassVar[str] = "Iso-C with task-specific subspaces beside a common one"
    common_space_fraction: Annotated[
        float,
        Field(gt=0, le=1, description=("share of each matrix's rank kept as the common subspace")),
    ] = 0.8


@register("iso_cts", config=IsoCtsConfig, needs_pretrained=True)
def iso_cts(ctx: SoupContext, config: IsoCtsConfig = IsoCtsConfig()) -> MethodResult:
    return tune_scale(ctx, iso_cts_delta(ctx, config.common_space_fraction), config)
