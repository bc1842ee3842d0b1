import numpy as np
import pytest
import torch

from raysoup.components import partition
from raysoup.inputs.model import build_classifier
from raysoup.mixing import RunningSum, average, lambdas_to_betas, mix, weighted_sum

from ..conftest import TINY_SPEC


def random_state_dicts(n, seed=0):
    torch.manual_seed(seed)
    return [
        {
            k: torch.randn_like(v) if v.is_floating_point() else v
            for k, v in build_classifier(TINY_SPEC).state_dict().items()
        }
        for _ in range(n)
    ]


def test_mix_is_componentwise_lerp():
    a, c = random_state_dicts(2)
    comps = partition(list(a), "granularity-2")
    lams = np.linspace(0.1, 0.9, len(comps))
    out = mix(a, c, lams, comps)
    for lam, keys in zip(lams, comps.keys):
        for k in keys:
            torch.testing.assert_close(out[k], lam * a[k] + (1 - lam) * c[k])


def test_mix_never_writes_into_read_only_buffers():
    a, c = random_state_dicts(2)
    frozen = {}
    for k, v in a.items():  # what a zero-copy object-store view looks like
        arr = v.numpy().copy()
        arr.setflags(write=False)
        frozen[k] = arr
    a_views = {k: torch.from_numpy(v) for k, v in frozen.items()}
    before = {k: v.copy() for k, v in frozen.items()}
    comps = partition(list(a), "granularity-1")
    mix(a_views, c, [0.3] * len(comps), comps)
    average([a_views, c])
    for k, tensor in frozen.items():
        np.testing.assert_array_equal(tensor, before[k])


def test_betas_sum_to_one_and_rebuild_equals_accumulator():
    sds = random_state_dicts(5, seed=1)
    comps = partition(list(sds[0]), "granularity-3")
    rng = np.random.default_rng(0)
    rows = rng.uniform(0.2, 0.95, size=(4, len(comps)))
    acc = sds[0]
    for j, row in enumerate(rows, start=1):
        acc = mix(acc, sds[j], row, comps)
    betas = lambdas_to_betas(rows)
    assert betas.shape == (5, len(comps))
    np.testing.assert_allclose(betas.sum(axis=0), 1.0, atol=1e-12)
    rebuilt = weighted_sum(lambda j: sds[j], betas, comps)
    for k in acc:
        torch.testing.assert_close(rebuilt[k], acc[k], atol=1e-6, rtol=0)


def test_betas_of_running_average_are_uniform():
    rows = np.array([[1 / 2], [2 / 3], [3 / 4]])  # lambda = K/(K+1): the running average
    np.testing.assert_allclose(lambdas_to_betas(rows)[:, 0], [0.25] * 4)


def test_betas_reject_non_matrix():
    with pytest.raises(ValueError):
        lambdas_to_betas(np.array([0.5, 0.5]))


def test_average_and_running_sum_agree():
    sds = random_state_dicts(3, seed=2)
    avg = average(sds)
    running = RunningSum()
    running.add(sds[0])
    running.add(sds[1])
    with_extra = running.mean(extra=sds[2])
    for k in avg:
        manual = (sds[0][k] + sds[1][k] + sds[2][k]) / 3
        torch.testing.assert_close(avg[k], manual)
        torch.testing.assert_close(with_extra[k], manual)
    assert running.count == 2  # mean(extra=...) does not add
