"""How large a difference must be to mean anything: paired comparisons of two models on the
same images.

Both models are judged on the same images, so the comparison is paired: per image, the
difference of correctness (-1, 0 or +1), or of a metric's scores in [0, 1]. The interval is
a seeded percentile bootstrap over images (scipy.stats.bootstrap); the p-value is the exact
McNemar test (a two-sided binomial test on the images exactly one of the two gets right),
which holds only for scores that are 0 or 1: other scores get the interval alone (p None).
The OOD average is the mean of the shifted sets' accuracies, so its bootstrap resamples
each set on its own (stratified) and its McNemar test pools their discordant images.
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


def is_binary(scores: Sequence[np.ndarray]) -> bool:
    """Right/wrong per image (bool, or scores that are all 0 or 1)."""
    return all(np.asarray(s).dtype == bool or np.isin(s, (0, 1)).all() for s in scores)


def paired(a: Sequence[np.ndarray], b: Sequence[np.ndarray], seed: int = 0) -> dict:
    """acc(a) - acc(b) (the mean over sets of per-set accuracy differences), its bootstrap
    interval, the exact McNemar p-value and the discordant counts; in accuracy units.
    Scores other than 0 and 1: the mean score difference and its interval; p is None and
    the counts are of images where a scores higher (a_only) and lower (b_only)."""
    binary = is_binary([*a, *b])
    kind = np.int8 if binary else np.float64
    differences = [np.asarray(x, kind) - np.asarray(y, kind) for x, y in zip(a, b)]
    a_only = int(sum((d > 0).sum() for d in differences))
    b_only = int(sum((d < 0).sum() for d in differences))
    diff = float(_mean_of_means(*differences))
    if a_only + b_only == 0:  # the same predictions on every image: nothing to resample
        return {
            "diff": 0.0,
            "lo": 0.0,
            "hi": 0.0,
            "p": 1.0 if binary else None,
            "a_only": 0,
            "b_only": 0,
        }
    interval = stats.bootstrap(
        tuple(differences),
        _mean_of_means,
        n_resamples=RESAMPLES,
        confidence_level=CONFIDENCE,
        method="percentile",
        paired=False,
        vectorized=True,
        batch=200,
        random_state=np.random.default_rng(seed),
    ).confidence_interval
    p = float(stats.binomtest(a_only, a_only + b_only, 0.5).pvalue) if binary else None
    return {
        "diff": diff,
        "lo": float(interval.low),
        "hi": float(interval.high),
        "p": p,
        "a_only": a_only,
        "b_only": b_only,
    }


def compare(
    a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray], ood_sets: Sequence[str], seed: int = 0
) -> dict[str, dict]:
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
    text = (
        f"{100 * comparison['diff']:+.2f} [{100 * comparison['lo']:+.2f}, "
        f"{100 * comparison['hi']:+.2f}]"
    )
    return text + ("*" if excludes_zero(comparison) else " ")
