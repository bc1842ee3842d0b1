"""Task arithmetic (Ilharco et al. 2023, arXiv 2212.04089): add the sum of the task vectors
tau_i = w_i - w_0 to the pretrained weights, scaled by lambda; lambda is chosen on val by
the run's search (Tune + nevergrad on the evaluator pool)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ..components import Components
from ..mixing import StateDict
from .base import KnobSearch, MethodResult, SoupContext, register, tune_knobs


def task_arithmetic_merge(pretrained: StateDict, ingredients: Sequence[StateDict],
                          scale: float) -> StateDict:
    """w_0 + lambda * sum_i (w_i - w_0), in float64; non-float tensors keep w_0's values."""
    merged: StateDict = {}
    for key, base in pretrained.items():
        if not base.is_floating_point():
            merged[key] = base.clone()
            continue
        w0 = base.double()
        total = sum(sd[key].double() - w0 for sd in ingredients)
        merged[key] = (w0 + scale * total).to(base.dtype)
    return merged


def task_arithmetic_mixer(models: Sequence[StateDict], x: np.ndarray,
                          components: Components) -> StateDict:
    """models = [pretrained, *ingredients]; x = [lambda]."""
    return task_arithmetic_merge(models[0], models[1:], float(x[0]))


@dataclass(frozen=True)
class TaskArithmeticConfig(KnobSearch):
    """lambda starts at 1/N (the uniform soup) and is searched within `scale_bounds` (the
    paper's grid spans [0, 1])."""
    SECTION: ClassVar[str] = "task_arithmetic"
    scale_bounds: tuple[float, float] = (0.0, 1.0)

    def check(self) -> None:
        self.check_bounds("scale_bounds")


@register("task_arithmetic", config=TaskArithmeticConfig, needs_pretrained=True)
def task_arithmetic(ctx: SoupContext, config: TaskArithmeticConfig = TaskArithmeticConfig()
                    ) -> MethodResult:
    names = ctx.pool.names
    ingredients = [ctx.pool.load(n) for n in names]
    lo, hi = config.scale_bounds
    start = min(hi, max(lo, 1.0 / len(names)))
    merged, details = tune_knobs(ctx, [ctx.pretrained, *ingredients], task_arithmetic_mixer,
                                 ["lambda"], [start], [lo], [hi], config)
    return MethodResult(merged, names, len(details.trace), ranked=False, details=details)
