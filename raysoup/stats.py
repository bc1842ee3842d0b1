"""How large a difference must be to mean anything: paired comparisons of two models on the
same images.

Both models are judged on the same images, so the comparison is paired: per image, the
difference of correctness (-1, 0 or +1). The interval is a seeded percentile bootstrap over
images (scipy.stats.bootstrap); the p-value is the exact McNemar test (a two-sided binomial
test on the images exactly one of the two gets right). The OOD average is the mean of the
shifted sets' accuracies, so its bootstrap resamples each set on its own (stratified) and
its McNemar test pools their discordant images.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
RESAMPLES = 2000
OOD_AVG = "ood_avg"


def _mean_of_means(*differences: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean([d.mean(axis=axis) for d in differences], axis=0)


def paired(a: Sequence[np.ndarray], b: Sequence[np.ndarray], seed: int = 0) -> dict:
    """acc(a) - acc(b) (the mean over sets of per-set accuracy differences), its bootstrap
    interval, the exact McNemar p-value and the discordant counts; in accuracy units."""
    differences = [np.asarray(x, np.int8) - np.asarray(y, np.int8) for x, y in zip(a, b)]
    a_only = int(sum((d > 0).sum() for d in differences))
    b_only = int(sum((d < 0).sum() for d in differences))
    diff = float(_mean_of_means(*differences))
    if a_only + b_only == 0:  # the same predictions on every image: nothing to resample
        return {"diff": 0.0, "lo": 0.0, "hi": 0.0, "p": 1.0, "a_only": 0, "b_only": 0}
    interval = stats.bootstrap(
        tuple(differences), _mean_of_means, n_resamples=RESAMPLES, confidence_level=CONFIDENCE,
        method="percentile", paired=False, vectorized=True, batch=200,
        random_state=np.random.default_rng(seed)).confidence_interval
    p = stats.binomtest(a_only, a_only + b_only, 0.5).pvalue
    return {"diff": diff, "lo": float(interval.low), "hi": float(interval.high),
            "p": float(p), "a_only": a_only, "b_only": b_only}


def compare(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray], ood_sets: Sequence[str],
            seed: int = 0) -> dict[str, dict]:
    """Per set (the sets both were judged on) and for the OOD average: `paired(a, b)`."""
    out = {name: paired([a[name]], [b[name]], seed) for name in a if name in b}
    shifted = [s for s in ood_sets if s in a and s in b]
    if shifted:
        out[OOD_AVG] = paired([a[s] for s in shifted], [b[s] for s in shifted], seed)
    return out


def excludes_zero(comparison: dict) -> bool:
    return comparison["lo"] > 0 or comparison["hi"] < 0


def format_difference(comparison: dict | None) -> str:
    """'+0.62 [+0.41, +0.83]' in points; '*' marks an interval that excludes zero."""
    if comparison is None:
        return "-"
    text = (f"{100 * comparison['diff']:+.2f} [{100 * comparison['lo']:+.2f}, "
            f"{100 * comparison['hi']:+.2f}]")
    return text + ("*" if excludes_zero(comparison) else " ")
