"""What the SVD merges (TSV-M, Iso-C, Iso-CTS) share: they build one merged task vector,
streamed over the pool, then choose its global scale alpha on val with the run's search, as
task arithmetic chooses lambda: w = w_0 + alpha * delta."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Annotated

import numpy as np
import torch
from pydantic import Field

from ..components import Components
from ..mixing import StateDict
from ..typed import section_config
from .base import KnobSearch, MethodResult, ScaleBounds, SoupContext, tune_knobs


def is_matrix(tensor: torch.Tensor) -> bool:
    """The tensors the SVD merges treat as task matrices: every 2-D float weight (linear
    layers, embeddings, the head); the rest are averaged."""
    return tensor.is_floating_point() and tensor.dim() == 2


def task_vectors(ctx: SoupContext) -> Iterator[tuple[int, str, torch.Tensor]]:
    """(i, key, tau_i[key]) with tau_i = w_i - w_0 in float64, for every float tensor of
    every ingredient in pool order: one ingredient read and resident at a time, one of its
    tensors in float64."""
    w0 = ctx.pretrained
    for i, name in enumerate(ctx.pool.names):
        sd = ctx.pool.load(name)
        for key, base in w0.items():
            if base.is_floating_point():
                yield i, key, sd[key].double() - base.double()
        del sd


def polar(m: torch.Tensor) -> torch.Tensor:
    """The orthogonal factor of m (U V^T of its thin SVD U S V^T): the nearest matrix with
    orthonormal columns (or rows) in Frobenius norm, the Procrustes solution."""
    u, _, vh = torch.linalg.svd(m, full_matrices=False)
    return u @ vh


def delta_mixer(models: Sequence[StateDict], x: np.ndarray, components: Components) -> StateDict:
    """models = [pretrained, delta]; x = [alpha]: w_0 + alpha * delta in float64, non-float
    tensors w_0's."""
    w0, delta = models
    alpha = float(x[0])
    return {
        k: (v.double() + alpha * delta[k].double()).to(v.dtype) if k in delta else v.clone()
        for k, v in w0.items()
    }


@section_config
class ScaleSearch(KnobSearch):
    """alpha starts at `start` and is searched within `scale_bounds`."""

    scale_bounds: Annotated[ScaleBounds, Field(description="alpha's range")] = (0.0, 2.0)
    start: Annotated[float, Field(description="alpha's start")] = 1.0


def tune_scale(
    ctx: SoupContext, delta: dict[str, torch.Tensor], config: ScaleSearch
) -> MethodResult:
    """w_0 + alpha * delta at the alpha the search finds on val; delta is stored in w_0's
    dtypes for the object store."""
    w0 = ctx.pretrained
    delta = {k: d.to(w0[k].dtype) for k, d in delta.items()}
    lo, hi = config.scale_bounds
    merged, record = tune_knobs(
        ctx,
        [w0, delta],
        delta_mixer,
        ["alpha"],
        [min(hi, max(lo, config.start))],
        [lo],
        [hi],
        config,
    )
    return MethodResult(
        merged, list(ctx.pool.names), len(record.trace), ranked=False, details=record
    )
