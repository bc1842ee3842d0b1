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
time, the running sum is the only other model held."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import MethodResult, SoupContext, register
from .merged_delta import ScaleSearch, is_matrix, task_vectors, tune_scale


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
    return {k: isotropic(total) if is_matrix(ctx.pretrained[k]) else total / n
            for k, total in sums.items()}


@dataclass(frozen=True)
class IsoCConfig(ScaleSearch):
    """alpha starts at 1.0 and is searched within `scale_bounds` (the authors choose it on
    validation data too)."""
    SECTION: ClassVar[str] = "iso_c"


@register("iso_c", config=IsoCConfig, needs_pretrained=True)
def iso_c(ctx: SoupContext, config: IsoCConfig = IsoCConfig()) -> MethodResult:
    return tune_scale(ctx, iso_c_delta(ctx), config)
