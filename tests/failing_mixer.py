"""A mixer that fails for part of the search space: an evaluation that raises."""

from raysoup.search import lerp_mixer


class FailAboveHalf:
    def __call__(self, models, x, components):
        if x[0] > 0.5:
            raise RuntimeError(f"injected evaluation failure at lambda {x[0]:.3f}")
        return lerp_mixer(models, x, components)
