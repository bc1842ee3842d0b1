"""Task arithmetic (Ilharco et al. 2023, arXiv 2212.04089): add the sum of the task vectors
tau_i = w_i - w_0 to the pretrained weights, scaled by lambda; lambda is chosen on val by
the run's search (Tune + nevergrad on the evaluator pool). With `dare` > 0 each task vector
is first dropped and rescaled (DARE, raysoup/methods/dare.py); its p may be searched too."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, ClassVar

import numpy as np
from pydantic import Field

from ..components import Components
from ..mixing import StateDict
from ..typed import section_config
from .base import KnobSearch, MethodResult, ScaleBounds, SoupContext, register, tune_knobs
from .dare import DareKnobs, drop_and_rescale


def task_arithmetic_merge(
    pretrained: StateDict,
    ingredients: Sequence[StateDict],
    scale: float,
    dare: float = 0.0,
    dare_seed: int = 0,
) -> StateDict:
    """w_0 + lambda * sum_i DARE_p(w_i - w_0), in float64 (DARE off at p = 0); non-float
    tensors keep w_0's values."""
    merged: StateDict = {}
    for key, base in pretrained.items():
        if not base.is_floating_point():
            merged[key] = base.clone()
            continue
        w0 = base.double()
        total = sum(
            drop_and_rescale(sd[key].double() - w0, dare, dare_seed, i, key)
            for i, sd in enumerate(ingredients)
        )
        merged[key] = (w0 + scale * total).to(base.dtype)
    return merged


@dataclass(frozen=True)
class TaskArithmeticMixer:
    """models = [pretrained, *ingredients]; x = [lambda], or [lambda, p] when DARE's p is
    searched (else p = `dare`)."""

    dare: float = 0.0
    dare_seed: int = 0

    def __call__(
        self, models: Sequence[StateDict], x: np.ndarray, components: Components
    ) -> StateDict:
        p = float(x[1]) if len(x) > 1 else self.dare
        return task_arithmetic_merge(models[0], models[1:], float(x[0]), p, self.dare_seed)


@section_config
class TaskArithmeticConfig(DareKnobs, KnobSearch):
    """lambda starts at 1/N (the uniform soup) and is searched within `scale_bounds` (the
    paper's grid spans [0, 1]); DARE off by default."""

    SECTION: ClassVar[str] = "task_arithmetic"
    SUMMARY: ClassVar[str] = "w0 + lambda sum_i (w_i - w_0); lambda chosen on val"
    scale_bounds: Annotated[
        ScaleBounds, Field(description=("lambda's range (the search starts at 1/N)"))
    ] = (0.0, 1.0)


@register("task_arithmetic", config=TaskArithmeticConfig, needs_pretrained=True)
def task_arithmetic(
    ctx: SoupContext, config: TaskArithmeticConfig = TaskArithmeticConfig()
) -> MethodResult:
    names = ctx.pool.names
    ingredients = [ctx.pool.load(n) for n in names]
    lo, hi = config.scale_bounds
    knobs, start, lower, upper = config.dare_knob()
    merged, details = tune_knobs(
        ctx,
        [ctx.pretrained, *ingredients],
        TaskArithmeticMixer(config.dare, config.dare_seed),
        ["lambda", *knobs],
        [min(hi, max(lo, 1.0 / len(names))), *start],
        [lo, *lower],
        [hi, *upper],
        config,
    )
    return MethodResult(merged, names, len(details.trace), ranked=False, details=details)
