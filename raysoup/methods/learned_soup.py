"""Learned soup (Wortsman et al. 2022, arXiv 2203.05482): mixing weights per ingredient and
component (`granularity = "component"`, the default: ManifoldMix's partition) or per weight
tensor ("tensor", the paper's "learned soup by layer"), softmax-normalised over the
ingredients, learned by Adam on cross-entropy over the validation split through the mixed
model; with `scale`, a scale beta on the output logits is learned with them (the paper's
temperature: it shapes the loss; the soup does not include it). Runs on one evaluator
(gradients need the mixed model there) and holds every ingredient at once."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Annotated, ClassVar, Literal

import numpy as np
import psutil
import torch
import torch.nn.functional as F
from pydantic import Field

from ..components import Components
from ..errors import RaysoupError
from ..families import take_rows
from ..inputs.pool import IngredientPool
from ..mixing import StateDict, weighted_sum
from ..typed import section_config
from .base import MethodResult, SoupContext, register

logger = logging.getLogger(__name__)


# The keys learned soup and AdaMerging share (their gradient pass in one evaluator).
Seed = Annotated[int, Field(ge=0, description="batch order")]
BatchSize = Annotated[int, Field(ge=1, description="validation images per gradient step")]
MaxMemory = Annotated[
    float,
    Field(ge=0, description=("refuse above this estimate; 0: this machine's available memory")),
]


@section_config
class LearnedSoupConfig:
    SECTION: ClassVar[str] = "learned_soup"
    SUMMARY: ClassVar[str] = "softmax mixing weights per ingredient, by Adam on val"
    epochs: Annotated[int, Field(ge=1, description=("passes over val (forward and backward)"))] = 5
    lr: Annotated[float, Field(gt=0, description=("Adam's learning rate on the mixing logits"))] = (
        0.05
    )
    batch_size: BatchSize = 256
    seed: Seed = 0
    max_memory_gb: MaxMemory = 0.0
    granularity: Annotated[
        Literal["component", "tensor"],
        Field(description=('a weight per component, or "tensor" (model soups\' by layer)')),
    ] = "component"
    scale: Annotated[
        bool,
        Field(description=("also learn a scale of the output logits (model soups' temperature)")),
    ] = False

    def to_dict(self) -> dict:
        return asdict(self)


def memory_estimate(pool: IngredientPool, copies: int = 3) -> tuple[int, int]:
    """(bytes a method that learns in one evaluator holds, bytes of one ingredient): every
    ingredient twice (as received and stacked per weight), plus `copies` models' worth
    (learned soup: the mixed weights, their gradients and Adam's state); activations of one
    batch are small next to that."""
    one = sum(v.numel() * v.element_size() for v in pool.load(pool.names[0]).values())
    return one * (2 * len(pool) + copies), one


def check_resident_memory(
    pool: IngredientPool, max_memory_gb: float, method: str, copies: int = 3
) -> None:
    """One clear line before any cluster work where `method` would not fit in one
    evaluator: `max_memory_gb`, or (0) what this machine has available."""
    need, one = memory_estimate(pool, copies)
    limit = max_memory_gb * 2**30 or psutil.virtual_memory().available
    if need > limit:
        where = f"{method}.max_memory_gb" if max_memory_gb else "available on this machine"
        raise RaysoupError(
            f"{method} holds every ingredient in one evaluator: about {need / 2**30:.1f} "
            f"GiB for {len(pool)} ingredients of {one / 2**20:.0f} MiB, more than the "
            f"{limit / 2**30:.1f} GiB {where}; leave it out of `methods` or raise "
            f"{method}.max_memory_gb"
        )


def check_memory(pool: IngredientPool, config: LearnedSoupConfig) -> None:
    check_resident_memory(pool, config.max_memory_gb, "learned_soup")


def mixing_components(
    components: Components, config: LearnedSoupConfig, state_dict: StateDict
) -> Components:
    """What learned soup weighs: `components` as they are, or ("tensor") one component per
    float tensor of them, named by its key; other keys stay unmixed."""
    if config.granularity == "component":
        return components
    keys = [k for group in components.keys for k in group]
    floats = tuple(k for k in keys if state_dict[k].is_floating_point())
    return Components(
        floats,
        tuple((k,) for k in floats),
        (*components.unmixed, *(k for k in keys if k not in floats)),
    )


def learn_mixing_logits(
    evaluator, set_name: str, models: Sequence[StateDict], components, config: LearnedSoupConfig
) -> tuple[np.ndarray, float]:
    """Logits (ingredients x mixing_components) learned by Adam on cross-entropy over the
    `set_name` rows that `evaluator` holds, and the learned logit scale (1 without
    `config.scale`); the mixed weights of component i are sum_j softmax(logits[:, i])_j w_j.
    Unmixed and non-float keys take ingredient 0's."""
    device = evaluator.device
    components = mixing_components(components, config, models[0])
    inputs, labels, class_map = evaluator.sets[set_name]
    stacked = {
        key: (i, torch.stack([sd[key].to(device) for sd in models]))
        for i, keys in enumerate(components.keys)
        for key in keys
        if models[0][key].is_floating_point()
    }
    fixed = {k: v.to(device) for k, v in models[0].items() if k not in stacked}
    logits = torch.zeros(len(models), len(components), device=device, requires_grad=True)
    scale = torch.ones((), device=device, requires_grad=config.scale)
    optimizer = torch.optim.Adam([logits, scale] if config.scale else [logits], lr=config.lr)
    order = torch.Generator().manual_seed(config.seed)
    for epoch in range(config.epochs):
        total = 0.0
        for idx in torch.randperm(len(labels), generator=order).split(config.batch_size):
            idx = idx.to(device)
            weights = torch.softmax(logits, dim=0)
            mixed = {
                key: torch.tensordot(weights[:, i].to(w.dtype), w, dims=1)
                for key, (i, w) in stacked.items()
            }
            out = evaluator.project(
                evaluator.logits(take_rows(inputs, idx), {**mixed, **fixed}), class_map
            )
            if config.scale:
                out = scale * out
            loss = F.cross_entropy(out, labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(idx)
        logger.info(
            f"[learned_soup] epoch {epoch + 1}/{config.epochs}: val loss "
            f"{total / len(labels):.4f}"
            + (f", scale {float(scale.detach()):.4g}" if config.scale else "")
        )
    return logits.detach().cpu().numpy().astype(np.float64), float(scale.detach())


def softmax(logits: np.ndarray) -> np.ndarray:
    """Over the ingredients (axis 0): every component's weights sum to 1."""
    e = np.exp(logits - logits.max(axis=0, keepdims=True))
    return e / e.sum(axis=0, keepdims=True)


@dataclass
class LearnedSoupDetails:
    components: list[str]  # what was weighed: components, or tensors by key
    betas: list[list[float]]  # ingredients x components, columns sum to 1
    scale: float  # the learned logit scale (1: not learned)


def gradient_plan(config, ingredients: int, components: int) -> str:
    return f"{config.epochs} passes over val with gradients, on one evaluator"


@register("learned_soup", config=LearnedSoupConfig, check=check_memory, plan=gradient_plan)
def learned_soup(ctx: SoupContext, config: LearnedSoupConfig = LearnedSoupConfig()) -> MethodResult:
    if ctx.learn is None or ctx.components is None:
        raise RaysoupError("learned_soup needs the context's learn and components")
    names = ctx.pool.names
    models = [ctx.pool.load(n) for n in names]
    components = mixing_components(ctx.components, config, models[0])
    logits, scale = ctx.learn(learn_mixing_logits, models, config)
    del models  # the soup below loads one ingredient at a time
    betas = softmax(logits)
    merged = weighted_sum(lambda j: ctx.pool.load(names[j]), betas, components)
    details = LearnedSoupDetails(list(components.names), betas.tolist(), scale)
    # Its cost in validation passes: one forward and backward pass over val per epoch.
    return MethodResult(merged, names, config.epochs, ranked=False, details=details)
