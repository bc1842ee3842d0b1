"""ManifoldMixMS as a registered method: the algorithm (algorithm.py, read like the paper's
algorithm box), its step checkpoint and per-step metrics, its line of the plan, and its
files (outputs.py)."""

from __future__ import annotations

import logging

from ..base import MethodResult, SoupContext, register
from .algorithm import ManifoldMixConfig, MixState, manifold_mix, phase1, try_candidate
from .outputs import write_outputs

logger = logging.getLogger(__name__)

__all__ = ["ManifoldMixConfig", "MixState", "phase1", "run_manifold_mix", "try_candidate"]


def plan(config: ManifoldMixConfig, n: int, m: int) -> str:
    passes = 3 if config.later_passes else 1
    budget = m * config.evals_per_component
    most = (n - 1) * (1 + passes * budget) + (
        n * m * config.phase2_evals_per_weight if config.phase2 else 0
    )
    return (
        f"{config.optimizer}, {budget} evaluations per pass ({m} components x "
        f"{config.evals_per_component}); at most {most} evaluations after the ranking "
        f"(each of {n - 1} candidates: a promise test and up to {passes} pass(es))"
        + (", phase 2 included" if config.phase2 else "")
    )


@register("manifold_mix", config=ManifoldMixConfig, plan=plan, resumable=True, write=write_outputs)
def run_manifold_mix(ctx: SoupContext, config: ManifoldMixConfig) -> MethodResult:
    """manifold_mix() continued from the context's step checkpoint, if it holds a step,
    saving one after every candidate."""
    checkpoint, state = ctx.checkpoint, None
    saved = checkpoint.load() if checkpoint is not None else None
    if saved is not None:
        summary, accumulator = saved
        state = MixState(accumulator=accumulator, **summary)
        logger.info(
            f"[manifold_mix] resuming after step {state.next_candidate - 1}: "
            f"{len(state.accepted)} ingredient(s), val {100 * state.accuracy:.2f}"
        )

    def on_step(state: MixState) -> None:
        if checkpoint is not None:
            # The accumulator changes only when a candidate is accepted.
            checkpoint.save(state.summary(), state.accumulator, version=len(state.accepted))
        if ctx.track is not None:
            step = state.history[-1]
            ctx.track(
                state.next_candidate - 1,
                {
                    "candidate": step["candidate"],
                    "promise_accuracy": step["promise_accuracy"],
                    **{
                        f"pass{i + 1}_accuracy": p["accuracy"] for i, p in enumerate(step["passes"])
                    },
                    "accepted": float(step["accepted"]),
                    "evaluations": state.evaluations,
                    "best_so_far": state.accuracy,
                    "ingredients": len(state.accepted),
                },
            )

    return manifold_mix(ctx, config, state, on_step)
