"""Fisher merging (Matena & Raffel 2022, arXiv 2111.09832): average the ingredients weighted,
per parameter, by each one's diagonal Fisher information on the validation images.

    F_i = (1 / |val|) sum_x E_{y ~ p_i(y | x)} [ (d log p_i(y | x) / d w)^2 ]   (per entry)
    w = sum_i max(F_i, floor) w_i / sum_i max(F_i, floor)
Conventions picked here: the expectation over y is estimated with one label per image drawn
from the model's own prediction (seeded; the paper's exact expectation costs one backward
pass per class), so val's labels are not read; every ingredient counts equally (the
paper's per-model coefficients are all 1); F_i is floored at `floor` (a parameter no
ingredient's Fisher reaches gets the plain average). The Fisher of each ingredient is
computed on the evaluators, each over its validation shard, and summed in the driver: one
pass over val per ingredient, counted as one evaluation each. Float buffers (no gradient)
are averaged; non-float tensors keep ingredient 0's values. Streamed: one ingredient and
its Fisher are resident at a time, beside the two running sums."""

from __future__ import annotations

import warnings
from dataclasses import asdict
from typing import Annotated, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from ..errors import RaysoupError
from ..mixing import StateDict
from ..typed import section_config
from .base import MethodResult, SoupContext, register


@section_config
class FisherMergingConfig:
    SECTION: ClassVar[str] = "fisher_merging"
    SUMMARY: ClassVar[str] = (
        "the ingredients averaged per parameter, weighted by each one's "
        "diagonal Fisher on val (computed on the evaluators)"
    )
    batch_size: Annotated[
        int,
        Field(
            ge=1,
            description=(
                "images per vectorised per-image gradient (holds this many gradients: this x the "
                "weights in memory)"
            ),
        ),
    ] = 32
    floor: Annotated[
        float, Field(gt=0, description=("each Fisher at least this (all at it: the plain mean)"))
    ] = 1e-6
    seed: Annotated[
        int, Field(ge=0, description=("the labels drawn from each model's prediction"))
    ] = 0

    def to_dict(self) -> dict:
        return asdict(self)


def fisher_sum(
    evaluator, set_name: str, state_dict: StateDict, config: FisherMergingConfig, stream: int = 0
) -> tuple[dict[str, np.ndarray], int]:
    """sum_x (d log p(y_x | x) / d w)^2 over the `set_name` rows the evaluator holds, for
    every float parameter, with y_x drawn from p(. | x) (seeded by `config.seed` and
    `stream`), and the number of rows."""
    from torch.func import grad, vmap

    from ..families import take_rows

    model, device = evaluator.model, evaluator.device
    evaluator.load(state_dict)
    inputs, labels_, class_map = evaluator.sets[set_name]
    rows = len(labels_)
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + stream)

    def log_likelihood(p, row, label):
        one = take_rows(row, None)  # a batch of one: images, or each text column
        log_p = F.log_softmax(
            evaluator.project(evaluator.logits(one, {**p, **buffers}), class_map), dim=-1
        )[0]
        return torch.gather(log_p, 0, label.unsqueeze(0))[0]

    row_grad = grad(log_likelihood)
    batched = vmap(row_grad, in_dims=(None, 0, 0))

    def looped(p, x, labels):  # models with data-dependent control flow (Hugging Face's)
        grads = [row_grad(p, take_rows(x, i), labels[i]) for i in range(len(labels))]
        return {k: torch.stack([g[k] for g in grads]) for k in grads[0]}

    per_row = batched
    total = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in params.items()}
    with warnings.catch_warnings():  # torch's note that attention's vmap rule is a loop
        warnings.filterwarnings("ignore", message="There is a performance drop")
        for batch in torch.arange(rows, device=device).split(config.batch_size):
            x = take_rows(inputs, batch)
            with torch.no_grad():
                probs = (
                    F.softmax(evaluator.project(evaluator.logits(x), class_map), dim=-1)
                    .float()
                    .cpu()
                )
            labels = torch.multinomial(probs, 1, generator=generator)[:, 0].to(device)
            try:
                grads = per_row(params, x, labels)
            except RuntimeError as e:
                if per_row is looped or "vmap" not in str(e):
                    raise
                per_row = looped  # one backward per row from here on
                grads = per_row(params, x, labels)
            for k, g in grads.items():
                total[k] += g.double().square().sum(dim=0)
    return {k: v.cpu().numpy() for k, v in total.items()}, rows


@register(
    "fisher_merging",
    config=FisherMergingConfig,
    plan=lambda config, n, m: f"a Fisher pass over val per ingredient ({n})",
)
def fisher_merging(
    ctx: SoupContext, config: FisherMergingConfig = FisherMergingConfig()
) -> MethodResult:
    if ctx.statistic is None:
        raise RaysoupError("fisher_merging needs the context's statistic (the evaluators)")
    names = ctx.pool.names
    weighted: dict[str, torch.Tensor] = {}
    weights: dict[str, torch.Tensor] = {}
    rest: StateDict = {}  # buffers: averaged; non-float tensors: ingredient 0's
    for i, name in enumerate(names):
        sd = ctx.pool.load(name)
        fisher = ctx.statistic(fisher_sum, sd, config)
        for key, v in sd.items():
            if key in fisher:
                f = torch.from_numpy(fisher[key]).clamp(min=config.floor)
                weighted[key] = f * v.double() if i == 0 else weighted[key] + f * v.double()
                weights[key] = f if i == 0 else weights[key] + f
            elif v.is_floating_point():
                rest[key] = v.double() if i == 0 else rest[key] + (v.double() - rest[key]) / (i + 1)
            elif i == 0:
                rest[key] = v
        dtypes = {k: v.dtype for k, v in sd.items()}
    merged = {
        k: (weighted[k] / weights[k] if k in weighted else rest[k]).to(dtype)
        for k, dtype in dtypes.items()
    }
    return MethodResult(merged, list(names), len(names), ranked=False)
