"""Paired comparisons: hand-computed McNemar p-values, intervals, the stratified OOD average."""

import numpy as np

from raysoup.stats import OOD_AVG, compare, excludes_zero, format_difference, paired


def pair(n: int, a_only: int, b_only: int, both: int) -> tuple[np.ndarray, np.ndarray]:
    """Correctness of two models on n images with the given agreement counts."""
    a, b = np.zeros(n, bool), np.zeros(n, bool)
    a[:both] = b[:both] = True
    a[both : both + a_only] = True
    b[both + a_only : both + a_only + b_only] = True
    return a, b


def test_exact_mcnemar_and_difference_by_hand():
    a, b = pair(1000, a_only=0, b_only=5, both=800)
    c = paired([a], [b])
    assert (c["a_only"], c["b_only"]) == (0, 5)
    assert c["diff"] == -0.005
    assert np.isclose(c["p"], 2 * 0.5**5)  # two-sided binomial: 2 * P(X = 0 | 5, 1/2)
    a, b = pair(1000, a_only=3, b_only=1, both=800)
    # P(X >= 3) + P(X <= 1) for X ~ Bin(4, 1/2) = (4 + 1 + 1 + 4) / 16
    assert np.isclose(paired([a], [b])["p"], 10 / 16)


def test_interval_excludes_zero_only_for_a_real_difference():
    strong = paired(*([x] for x in pair(5000, a_only=150, b_only=30, both=4000)))
    assert strong["lo"] <= strong["diff"] <= strong["hi"]
    assert excludes_zero(strong) and strong["p"] < 1e-10
    balanced = paired(*([x] for x in pair(5000, a_only=40, b_only=40, both=4000)))
    assert balanced["lo"] < 0 < balanced["hi"] and not excludes_zero(balanced)
    assert balanced["p"] == 1.0
    # Seeded: the same call gives the same interval.
    assert paired(*([x] for x in pair(5000, 40, 40, 4000))) == balanced


def test_identical_predictions_give_a_zero_interval():
    a, _ = pair(100, 0, 0, 60)
    assert paired([a], [a]) == {
        "diff": 0.0,
        "lo": 0.0,
        "hi": 0.0,
        "p": 1.0,
        "a_only": 0,
        "b_only": 0,
    }


def test_ood_average_is_the_mean_of_set_differences_and_pools_mcnemar():
    s1 = pair(2000, a_only=100, b_only=20, both=1500)
    s2 = pair(1000, a_only=10, b_only=30, both=700)  # sets of different sizes
    a = {"val": s1[0], "id": s1[0], "blur": s1[0], "noise": s2[0]}
    b = {"val": s1[1], "id": s1[1], "blur": s1[1], "noise": s2[1]}
    out = compare(a, b, ["blur", "noise"])
    assert set(out) == {"val", "id", "blur", "noise", OOD_AVG}
    assert np.isclose(out[OOD_AVG]["diff"], (80 / 2000 - 20 / 1000) / 2)
    assert (out[OOD_AVG]["a_only"], out[OOD_AVG]["b_only"]) == (110, 50)
    assert out[OOD_AVG]["lo"] < out[OOD_AVG]["diff"] < out[OOD_AVG]["hi"]


def test_format_marks_intervals_that_exclude_zero():
    assert (
        format_difference({"diff": 0.0062, "lo": 0.0041, "hi": 0.0083}) == "+0.62 [+0.41, +0.83]*"
    )
    assert format_difference({"diff": 0.0005, "lo": -0.001, "hi": 0.002}) == "+0.05 [-0.10, +0.20] "
    assert format_difference(None) == "-"


def test_racings_bound_is_exact_on_the_whole_set_and_covers_at_its_level():
    """largest_difference: with every image seen it is the observed difference; on random
    samples of a known population it falls below the true difference at most about
    2 alpha of the time (one alpha per count), and it tightens as more is seen."""
    from raysoup.distributed.racing import largest_difference

    assert largest_difference(7, 19, 500, 500, 0.01) == 7 - 19
    rng = np.random.default_rng(0)
    total, alpha = 1000, 0.05
    population = np.array([1] * 20 + [-1] * 35 + [0] * (total - 55))  # difference -15
    misses, bounds = 0, {250: [], 750: []}
    for _ in range(400):
        order = rng.permutation(population)
        for seen, found in bounds.items():
            drawn = order[:seen]
            bound = largest_difference(
                int((drawn == 1).sum()), int((drawn == -1).sum()), seen, total, alpha
            )
            found.append(bound)
            misses += bound < -15
    assert misses / 800 <= 2 * alpha
    assert np.mean(bounds[750]) < np.mean(bounds[250])
