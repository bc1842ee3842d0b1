"""AdaMerging, layer-wise (Yang et al. 2024, arXiv 2310.02575, "AdaMerging: Adaptive Model
Merging for Multi-Task Learning"): task arithmetic with a coefficient per ingredient and
layer, learned by gradient descent on the Shannon entropy of the merged model's predictions
on unlabelled images (test-time adaptation; here the validation images, labels unread).

    w_l = w_0,l + sum_i lambda_{i,l} tau_{i,l},   tau_i = w_i - w_0
    min_lambda  (1 / |B|) sum_{x in B} H(softmax(f(x; w))),   H(p) = -sum_c p_c log p_c
Conventions picked here: a "layer" is a float weight tensor (`granularity = "tensor"`, the
default, as the authors' code and FusionBench give each parameter tensor its own
coefficient) or a component of the run's partition ("component"); every lambda starts at
the paper's prior 0.3 (`init`) and is clamped to [0, 1] in the forward pass, as the
authors' code does; Adam (the authors': lr 1e-3 over 500 steps of 16 images per task; the
defaults here, lr 0.01 over 2 passes of 64-image batches, take larger steps for a CPU
budget); the entropy is that of the softmax over the set's labels (after the class map).
Unmixed and non-float tensors keep w_0's values. Runs on one evaluator holding all of val
(gradients need the merged model there) and holds every task vector at once, so the run
checks its memory up front as learned soup's. Its cost: one forward and backward pass over
val per epoch, counted as one evaluation each."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Annotated, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from ..components import Components
from ..errors import RaysoupError
from ..families import take_rows
from ..inputs.pool import IngredientPool
from ..mixing import StateDict
from ..typed import section_config
from .base import MethodResult, SoupContext, register
from .learned_soup import (
    BatchSize,
    MaxMemory,
    Seed,
    check_resident_memory,
    gradient_plan,
    mixing_components,
)

logger = logging.getLogger(__name__)


@section_config
class AdaMergingConfig:
    SECTION: ClassVar[str] = "adamerging"
    SUMMARY: ClassVar[str] = (
        "task arithmetic with a lambda per ingredient and tensor, by Adam "
        "on the entropy of val's predictions (no labels)"
    )
    epochs: Annotated[
        int, Field(ge=1, description=("passes over val's images (forward and backward)"))
    ] = 2
    lr: Annotated[float, Field(gt=0, description="Adam's learning rate on the lambdas")] = 0.01
    batch_size: BatchSize = 64
    init: Annotated[
        float, Field(ge=0, le=1, description=("every lambda's start (the paper's prior)"))
    ] = 0.3
    seed: Seed = 0
    max_memory_gb: MaxMemory = 0.0
    granularity: Annotated[
        Literal["tensor", "component"],
        Field(description=('a lambda per tensor (the paper\'s layer-wise), or "component"')),
    ] = "tensor"

    def to_dict(self) -> dict:
        return asdict(self)


def check_memory(pool: IngredientPool, config: AdaMergingConfig) -> None:
    # Beside learned soup's: the pretrained weights, received and on the device.
    check_resident_memory(pool, config.max_memory_gb, "adamerging", copies=5)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """The mean Shannon entropy (nats) of the rows' softmax."""
    log_p = F.log_softmax(logits, dim=-1)
    return -(log_p.exp() * log_p).sum(dim=-1).mean()


def learn_coefficients(
    evaluator,
    set_name: str,
    models: Sequence[StateDict],
    components: Components,
    config: AdaMergingConfig,
) -> np.ndarray:
    """lambda (ingredients x columns of mixing_components), in [0, 1], learned by Adam on
    the entropy of the merged model's predictions over the `set_name` images `evaluator`
    holds; models = [pretrained, *ingredients]. The labels are never read."""
    device = evaluator.device
    pretrained, *ingredients = models
    columns = mixing_components(components, config, pretrained)
    inputs, labels, class_map = evaluator.sets[set_name]
    rows = len(labels)  # their count only
    taus = {
        key: (
            i,
            torch.stack([sd[key].to(device) - pretrained[key].to(device) for sd in ingredients]),
        )
        for i, keys in enumerate(columns.keys)
        for key in keys
        if pretrained[key].is_floating_point()
    }
    base = {k: v.to(device) for k, v in pretrained.items()}
    raw = torch.full(
        (len(ingredients), len(columns)), config.init, device=device, requires_grad=True
    )
    optimizer = torch.optim.Adam([raw], lr=config.lr)
    order = torch.Generator().manual_seed(config.seed)
    for epoch in range(config.epochs):
        total = 0.0
        for idx in torch.randperm(rows, generator=order).split(config.batch_size):
            idx = idx.to(device)
            lambdas = raw.clamp(0.0, 1.0)
            merged = {
                **base,
                **{
                    key: base[key] + torch.tensordot(lambdas[:, i].to(t.dtype), t, dims=1)
                    for key, (i, t) in taus.items()
                },
            }
            loss = entropy(
                evaluator.project(evaluator.logits(take_rows(inputs, idx), merged), class_map)
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(idx)
        logger.info(
            f"[adamerging] epoch {epoch + 1}/{config.epochs}: val entropy {total / rows:.4f}"
        )
    return raw.detach().clamp(0.0, 1.0).cpu().numpy().astype(np.float64)


def ada_merge(
    pretrained: StateDict,
    load: Callable[[int], Mapping[str, torch.Tensor]],
    lambdas: np.ndarray,
    columns: Components,
) -> StateDict:
    """w_0 + sum_i lambdas[i, c] (w_i - w_0) for the keys of column c, in float64, loading
    ingredient i via load(i) in turn; every other tensor w_0's."""
    merged = {k: v.double() if v.is_floating_point() else v.clone() for k, v in pretrained.items()}
    for i in range(lambdas.shape[0]):
        sd = load(i)
        for c, keys in enumerate(columns.keys):
            for key in keys:
                if pretrained[key].is_floating_point():
                    merged[key] += float(lambdas[i, c]) * (
                        sd[key].double() - pretrained[key].double()
                    )
        del sd
    return {k: v.to(pretrained[k].dtype) for k, v in merged.items()}


@dataclass
class AdaMergingDetails:
    components: list[str]  # what got a coefficient: tensors by key, or components
    lambdas: list[list[float]]  # ingredients x components, each in [0, 1]


@register(
    "adamerging",
    config=AdaMergingConfig,
    needs_pretrained=True,
    check=check_memory,
    plan=gradient_plan,
)
def adamerging(ctx: SoupContext, config: AdaMergingConfig = AdaMergingConfig()) -> MethodResult:
    if ctx.learn is None or ctx.components is None:
        raise RaysoupError("adamerging needs the context's learn and components")
    names = ctx.pool.names
    columns = mixing_components(ctx.components, config, ctx.pretrained)
    lambdas = ctx.learn(
        learn_coefficients, [ctx.pretrained, *(ctx.pool.load(n) for n in names)], config
    )
    merged = ada_merge(ctx.pretrained, lambda i: ctx.pool.load(names[i]), lambdas, columns)
    details = AdaMergingDetails(list(columns.names), lambdas.tolist())
    # Its cost in validation passes: one forward and backward pass over val per epoch.
    return MethodResult(merged, names, config.epochs, ranked=False, details=details)
