"""RegMean (Jin et al. 2023, arXiv 2212.09849, "Dataless Knowledge Fusion by Merging Weights
of Language Models"): merge every linear layer by the weights that best reproduce, on each
ingredient's own inputs, that ingredient's outputs; average everything else.

For a linear layer y = x W (W: in x out, the paper's layout), with X_i the inputs ingredient
i's layer sees and G_i = X_i^T X_i, the merged W minimises sum_i ||X_i W - X_i W_i||^2:
    W = (sum_i G~_i)^-1 sum_i G~_i W_i,   G~_i = alpha G_i + (1 - alpha) diag(G_i)
(alpha: the paper's reduce_non_diagonal_ratio; alpha = 1 is the exact least-squares merge,
alpha = 0 a per-input-feature weighted average). torch's nn.Linear stores W^T (out x in,
y = x W^T), so here:
    W_torch = ((sum_i G~_i)^+ sum_i G~_i W_torch,i^T)^T
with ^+ the pseudo-inverse (the inverse wherever sum_i G~_i is invertible; where it is not,
the least-squares solution of least norm). alpha is chosen on val by the run's search
(Tune + nevergrad on the evaluator pool); the Gram matrices are computed once and every
evaluation only solves again.

Conventions picked here: the layers merged are every nn.Linear whose forward runs (its
input taken by a forward hook) and the input projection of every self-attention
nn.MultiheadAttention (in_proj_weight, whose input is the attention's query = key = value;
open_clip's ViT); an attention's out_proj (its weight is read by the attention's own
kernel, not called), convolutions (the patch embedding), open_clip's `proj` matrix, biases,
norms and every other float tensor are averaged, as FusionBench and the authors' code
average biases and non-linear weights; non-float tensors keep ingredient 0's values.
X_i stacks every position of every validation image (tokens included); G_i is divided by
the number of images (the same for every ingredient, so the merge is unchanged). The Grams
are computed on the evaluators, each over its validation shard, summed in the driver: one
forward pass over val per ingredient, counted as one evaluation each. Streamed: one
ingredient and its Grams are resident at a time, beside the running mean and the three
running sums of regmean_solve, which the search's evaluators hold too."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, ClassVar

import numpy as np
import torch
from pydantic import Field
from torch import nn

from ..components import Components
from ..errors import RaysoupError
from ..mixing import StateDict
from ..typed import Interval, section_config
from .base import KnobSearch, MethodResult, SoupContext, register, tune_knobs


@section_config
class RegMeanConfig(KnobSearch):
    """alpha starts at `start` and is searched within `alpha_bounds` on val."""

    SECTION: ClassVar[str] = "regmean"
    SUMMARY: ClassVar[str] = (
        "linear layers merged to reproduce each ingredient's outputs on "
        "its own val inputs (Gram matrices, on the evaluators)"
    )
    alpha_bounds: Annotated[
        Interval(0.0, 1.0), Field(description=("alpha's range (the Grams' off-diagonal scale)"))
    ] = (0.0, 1.0)
    start: Annotated[float, Field(description="alpha's start")] = 0.5
    batch_size: Annotated[
        int, Field(ge=1, description=("images per forward pass of the Gram pass"))
    ] = 256


def gram_sum(
    evaluator, set_name: str, state_dict: StateDict, config: RegMeanConfig, stream: int = 0
) -> tuple[dict[str, np.ndarray], int]:
    """X^T X of the inputs of every merged linear weight (by its state-dict key), summed
    over the `set_name` rows the evaluator holds, and the number of rows (`stream`: the
    shard, unused: nothing is sampled)."""
    from ..families import take_rows

    model = evaluator.model
    evaluator.load(state_dict)
    inputs, labels, _ = evaluator.sets[set_name]  # the labels are not read
    rows = len(labels)
    grams: dict[str, torch.Tensor] = {}

    def add(key: str, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).double()
        gram = x.T @ x
        grams[key] = gram if key not in grams else grams[key] + gram

    def linear_hook(key):
        return lambda module, args: add(key, args[0])

    def attention_hook(key):
        def hook(module, args, kwargs):
            names = ("query", "key", "value")[len(args) :]
            q, k, v = (*args, *(kwargs.get(n) for n in names))[:3]
            if q is k and k is v:  # self-attention: in_proj_weight sees x
                add(key, q)

        return hook

    hooks = []
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, nn.MultiheadAttention) and module.in_proj_weight is not None:
            hooks.append(
                module.register_forward_pre_hook(
                    attention_hook(prefix + "in_proj_weight"), with_kwargs=True
                )
            )
        elif isinstance(module, nn.Linear):
            hooks.append(module.register_forward_pre_hook(linear_hook(prefix + "weight")))
    try:
        with torch.inference_mode():
            for start in range(0, rows, config.batch_size):
                evaluator.logits(take_rows(inputs, slice(start, start + config.batch_size)))
    finally:
        for hook in hooks:
            hook.remove()
    keys = set(state_dict)
    return {k: g.cpu().numpy() for k, g in grams.items() if k in keys}, rows


def regmean_solve(
    gram: torch.Tensor, gram_w: torch.Tensor, diag_w: torch.Tensor, alpha: float
) -> torch.Tensor:
    """W (out x in) = ((alpha S + (1 - alpha) diag(S))^+ (alpha A + (1 - alpha) B))^T with
    S = sum_i G_i, A = sum_i G_i W_i^T, B = sum_i diag(G_i) W_i^T (float64)."""
    lhs = alpha * gram + (1 - alpha) * torch.diag(gram.diagonal())
    return (torch.linalg.pinv(lhs, hermitian=True) @ (alpha * gram_w + (1 - alpha) * diag_w)).T


def regmean_mixer(models: Sequence[StateDict], x: np.ndarray, components: Components) -> StateDict:
    """models = [mean, S, A, B]: the average of the ingredients, and regmean_solve's sums
    by weight key; x = [alpha]. The weights with sums are solved, the rest averaged."""
    mean, gram, gram_w, diag_w = models
    merged = dict(mean)
    for key, s in gram.items():
        merged[key] = regmean_solve(
            s.double(), gram_w[key].double(), diag_w[key].double(), float(x[0])
        ).to(mean[key].dtype)
    return merged


@register(
    "regmean",
    config=RegMeanConfig,
    plan=lambda config, n, m: (
        f"a Gram pass over val per ingredient ({n}), then "
        f"{config.optimizer}, {config.budget} evaluations"
    ),
)
def regmean(ctx: SoupContext, config: RegMeanConfig = RegMeanConfig()) -> MethodResult:
    if ctx.statistic is None:
        raise RaysoupError("regmean needs the context's statistic (the evaluators)")
    names = ctx.pool.names
    gram: StateDict = {}
    gram_w: StateDict = {}  # sum_i G_i W_i^T
    diag_w: StateDict = {}  # sum_i diag(G_i) W_i^T
    mean: StateDict = {}  # running means of the float tensors; ingredient 0's others
    for i, name in enumerate(names):
        sd = ctx.pool.load(name)
        grams = ctx.statistic(gram_sum, sd, config)
        for key, v in sd.items():
            if key in grams:
                g, w_t = torch.from_numpy(grams[key]), v.double().T
                parts = (g, g @ w_t, g.diagonal()[:, None] * w_t)
                for total, part in zip((gram, gram_w, diag_w), parts):
                    total[key] = part if i == 0 else total[key] + part
            if v.is_floating_point():
                mean[key] = v.double() if i == 0 else mean[key] + (v.double() - mean[key]) / (i + 1)
            elif i == 0:
                mean[key] = v
        dtypes = {k: v.dtype for k, v in sd.items()}
        del sd, grams
    mean = {k: v.to(dtypes[k]) for k, v in mean.items()}
    lo, hi = config.alpha_bounds
    merged, details = tune_knobs(
        ctx,
        [mean, gram, gram_w, diag_w],
        regmean_mixer,
        ["alpha"],
        [min(hi, max(lo, config.start))],
        [lo],
        [hi],
        config,
    )
    # One forward pass over val per ingredient (the Grams), then the search's evaluations.
    return MethodResult(
        merged, list(names), len(names) + len(details.trace), ranked=False, details=details
    )
