"""TSV-M (Gargiulo et al. 2025, arXiv 2412.00081, "Task Singular Vectors: Reducing Task
Interference in Model Merging"): per layer, keep each task matrix's top singular vectors,
decorrelate the tasks' vectors by orthogonalising them together, and add the result,
scaled by alpha (chosen on val by the run's search), to the pretrained weights.

Per 2-D weight, with task matrices Delta_i = W_i - W_0 (T tasks, r = min(m, n)):
    Delta_i = U_i S_i V_i^T (thin SVD),  k = floor(r / T)
    U = [U_1[:, :k], ..., U_T[:, :k]],  S = diag(S_1[:k], ..., S_T[:k]),
    V = [V_1[:, :k], ..., V_T[:, :k]]
    U_perp = polar(U),  V_perp = polar(V)     (polar(M) = P Q^T of M = P Sigma Q^T)
    Delta = U_perp S V_perp^T,   W = W_0 + alpha Delta
Every other float tensor: Delta = mean_i (w_i - w_0), as the authors' code does.
Conventions: the authors' code places the T k vectors in an r-column matrix padded with
zeros; the padding does not change polar(U)'s first T k columns (when U has full column
rank), so they are left out here. A matrix with r < T (k = 0) has no vector to keep: it is
averaged like the other tensors (the authors' code would give it 0). The SVDs are computed
in float64. Streamed: one ingredient is read at a time; per matrix the T truncated factors
(k (m + n + 1) floats each, at most about two matrices in all) are held until the end."""

from __future__ import annotations

from typing import ClassVar

import torch

from ..typed import section_config
from .base import MethodResult, SoupContext, register
from .merged_delta import ScaleSearch, is_matrix, polar, task_vectors, tune_scale


def tsv_delta(ctx: SoupContext) -> dict[str, torch.Tensor]:
    """The TSV-M merged task vector (float64) of the context's pool, streamed."""
    n = len(ctx.pool.names)
    keep = {k: min(v.shape) // n for k, v in ctx.pretrained.items() if is_matrix(v)}
    factors: dict[str, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
    means: dict[str, torch.Tensor] = {}
    for i, key, d in task_vectors(ctx):
        k = keep.get(key, 0)
        if k > 0:
            u, s, vh = torch.linalg.svd(d, full_matrices=False)
            # copies: a slice would keep the whole factor alive
            factors.setdefault(key, []).append((u[:, :k].clone(), s[:k].clone(), vh[:k].clone()))
        else:  # running mean
            means[key] = d if i == 0 else means[key] + (d - means[key]) / (i + 1)
    delta = dict(means)
    for key, parts in factors.items():
        u = torch.cat([p[0] for p in parts], dim=1)
        s = torch.cat([p[1] for p in parts])
        vh = torch.cat([p[2] for p in parts], dim=0)
        delta[key] = polar(u) @ torch.diag(s) @ polar(vh)
    return delta


@section_config
class TsvMergeConfig(ScaleSearch):
    """alpha starts at the authors' 1.0 and is searched within `scale_bounds`."""

    SECTION: ClassVar[str] = "tsv_merge"
    SUMMARY: ClassVar[str] = (
        "task singular vectors: each task matrix's top 1/N singular "
        "vectors, orthogonalised together; alpha chosen on val"
    )


@register("tsv_merge", config=TsvMergeConfig, needs_pretrained=True)
def tsv_merge(ctx: SoupContext, config: TsvMergeConfig = TsvMergeConfig()) -> MethodResult:
    return tune_scale(ctx, tsv_delta(ctx), config)
