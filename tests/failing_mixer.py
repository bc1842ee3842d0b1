"""Mixers that fail on purpose, inside the evaluator actors: injected faults."""

import os

from raysoup.search import lerp_mixer


class FailAboveHalf:
    """An evaluation that raises for part of the search space."""

    def __call__(self, models, x, components):
        if x[0] > 0.5:
            raise RuntimeError(f"injected evaluation failure at lambda {x[0]:.3f}")
        return lerp_mixer(models, x, components)


class CrashOnce:
    """Kills the evaluator process mid-evaluation, once: whoever removes the marker dies."""

    def __init__(self, marker: str):
        self.marker = marker

    def __call__(self, models, x, components):
        try:
            os.unlink(self.marker)
        except FileNotFoundError:
            return lerp_mixer(models, x, components)
        os._exit(1)
