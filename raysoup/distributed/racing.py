"""Racing (opt-in): stop evaluating a mixing point once it cannot beat the pass's best.

A raced trial (workers.racing_trial) scores its point on the validation set chunk by chunk,
each chunk a random part of every evaluator's rows, and reports after each chunk how many
of the images seen so far the point gets right and the incumbent (the pass's best point
evaluated in full) wrong, and the reverse. The point's final accuracy beats the
incumbent's only if, over all images, the first count exceeds the second. Seen images are
a random sample of the set, so each count over the whole set has an exact hypergeometric
confidence bound; RacingScheduler stops the trial once the upper bound of the difference
is at most zero. The error level is split over the two bounds and every look (Bonferroni).
A stopped point is told its paired estimate: the incumbent's accuracy plus the difference
per image seen, never above the incumbent's, so it is never the pass's best.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from ray.tune.schedulers import FIFOScheduler, TrialScheduler
from scipy.stats import hypergeom


@dataclass(frozen=True)
class Racing:
    chunks: int
    confidence: float

    @property
    def alpha(self) -> float:
        """The error level of one bound at one look."""
        return (1.0 - self.confidence) / (2 * (self.chunks - 1))


def largest_difference(
    favourable: int, unfavourable: int, seen: int, total: int, alpha: float
) -> int:
    """An upper confidence bound on favourable minus unfavourable images over all `total`
    images, from the counts among `seen` drawn at random without replacement: the largest
    favourable total and the smallest unfavourable total that each keep the observed count
    at least alpha likely."""
    rest = total - seen
    most = np.arange(favourable, favourable + rest + 1)
    most = most[hypergeom.cdf(favourable, total, most, seen) > alpha].max()
    least = np.arange(unfavourable, unfavourable + rest + 1)
    least = least[hypergeom.sf(unfavourable - 1, total, least, seen) > alpha].min()
    return int(most - least)


class RacingScheduler(FIFOScheduler):
    """Stops a raced trial once its point cannot beat the incumbent at the confidence."""

    def __init__(self, racing: Racing):
        super().__init__()
        self.racing = racing

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if (
            "favourable" in result
            and largest_difference(
                result["favourable"],
                result["unfavourable"],
                result["seen"],
                result["total"],
                self.racing.alpha,
            )
            <= 0
        ):
            return TrialScheduler.STOP
        return TrialScheduler.CONTINUE
