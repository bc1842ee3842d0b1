"""DARE (an option of task arithmetic and TIES), TSV-M and Iso-C: each against a hand-worked
example and an independent numpy transcription of the published formula (the authors'
code for the SVD merges), each streamed over the pool, and each run in-process on the tiny
zoo through the registry with its knobs searched on val."""

import weakref

import numpy as np
import pytest
import torch

from raysoup.errors import RaysoupError
from raysoup.inputs.pool import IngredientPool
from raysoup.methods import METHODS, SoupContext, ValidationJudge
from raysoup.methods.dare import drop_and_rescale, entry_draws
from raysoup.methods.iso_c import IsoCConfig, IsoCtsConfig, common_size, iso_c_delta, iso_cts_delta
from raysoup.methods.merged_delta import delta_mixer
from raysoup.methods.task_arithmetic import (
    TaskArithmeticConfig,
    TaskArithmeticMixer,
    task_arithmetic_merge,
)
from raysoup.methods.ties_merging import TiesMergingConfig, TiesMixer, ties_merge
from raysoup.methods.tsv_merge import TsvMergeConfig, tsv_delta

from ..helpers import MemoryPool, in_process_context, val_evaluator


def t(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def memory_context(pretrained: dict, *ingredients: dict, pool=MemoryPool) -> SoupContext:
    pool = pool({f"ft-{i}": sd for i, sd in enumerate(ingredients)})
    return SoupContext(pool, ValidationJudge(lambda sd: 0.0), [], pretrained=pretrained)


# DARE


def test_dare_drops_entries_with_probability_p_and_rescales_the_rest():
    tau = torch.full((100, 100), 3.0, dtype=torch.float64)
    out = drop_and_rescale(tau, 0.3, seed=0, ingredient=0, key="w")
    kept = out != 0
    assert torch.all(out[kept] == 3.0 / 0.7)
    # 10,000 Bernoulli(0.3) drops: the share is within 5 standard deviations (0.0046) of p,
    # and the mean stays tau's (the rescaling keeps the expectation)
    assert abs(1 - kept.double().mean().item() - 0.3) < 0.023
    assert abs(out.mean().item() - 3.0) < 3.0 * 0.023 / 0.7
    assert drop_and_rescale(tau, 0.0, 0, 0, "w") is tau  # off: tau itself, bit for bit


def test_dare_masks_are_seeded_per_ingredient_and_key_and_nested_in_p():
    tau = torch.ones(50, 40)
    dropped = {p: drop_and_rescale(tau, p, 7, 1, "w") == 0 for p in (0.2, 0.5)}
    assert torch.all(dropped[0.5][dropped[0.2]]) and dropped[0.5].sum() > dropped[0.2].sum()
    again = drop_and_rescale(tau, 0.5, 7, 1, "w") == 0
    assert torch.equal(again, dropped[0.5])
    for other in [(8, 1, "w"), (7, 2, "w"), (7, 1, "v")]:
        assert not torch.equal(drop_and_rescale(tau, 0.5, *other) == 0, dropped[0.5])


def test_task_arithmetic_with_dare_sums_the_dropped_and_rescaled_task_vectors():
    w0 = {"w": t(1.0, 2.0, 3.0, 4.0), "n": torch.tensor(3)}
    taus = [t(2.0, -1.0, 0.5, 4.0), t(-1.0, 3.0, 1.0, 2.0)]
    ingredients = [{"w": w0["w"] + tau, "n": torch.tensor(0)} for tau in taus]
    p, scale = 0.5, 0.8
    expected = w0["w"].double()
    for i, tau in enumerate(taus):
        u = entry_draws(tau.shape, 4, i, "w")  # the fixed draws: drop where u < p
        expected = expected + scale * torch.where(u >= p, tau.double() / (1 - p), 0.0)
    merged = task_arithmetic_merge(w0, ingredients, scale, dare=p, dare_seed=4)
    torch.testing.assert_close(merged["w"], expected.float())
    assert int(merged["n"]) == 3
    assert not torch.equal(merged["w"], task_arithmetic_merge(w0, ingredients, scale)["w"])


def test_ties_with_dare_drops_and_rescales_before_trimming():
    w0 = {"a": t(0.5, -1.0, 2.0), "b": t(1.0, 1.0)}
    taus = [
        {"a": t(3.0, -1.0, 0.5), "b": t(2.0, 0.1)},
        {"a": t(-2.0, -2.0, 1.0), "b": t(0.3, -3.0)},
    ]
    ingredients = [{k: w0[k] + tau[k] for k in w0} for tau in taus]
    dared = [
        {k: w0[k] + drop_and_rescale(tau[k], 0.4, 1, i, k) for k in w0}
        for i, tau in enumerate(taus)
    ]
    merged = ties_merge(w0, ingredients, 0.7, 0.6, dare=0.4, dare_seed=1)
    expected = ties_merge(w0, dared, 0.7, 0.6)
    for k in w0:
        torch.testing.assert_close(merged[k], expected[k])


@pytest.mark.parametrize(
    "config, message",
    [
        (
            lambda: TaskArithmeticConfig(dare=1.0),
            r"task_arithmetic.dare = 1.0: expected float, >= 0, < 1",
        ),
        (
            lambda: TiesMergingConfig(search_dare=True, dare_bounds=(0.5, 0.2)),
            (
                r"ties_merging.dare_bounds = \[0.5, 0.2\]: must be \[lower, upper\] with "
                r"0 <= lower < upper <= 0.99"
            ),
        ),
        (
            lambda: TsvMergeConfig(scale_bounds=(1.0, 1.0)),
            r"tsv_merge.scale_bounds = \[1.0, 1.0\]: must be \[lower, upper\] with lower < upper",
        ),
        (lambda: IsoCConfig(budget=0), r"iso_c.budget = 0: expected int, >= 1"),
        (
            lambda: IsoCtsConfig(common_space_fraction=0.0),
            r"iso_cts.common_space_fraction = 0.0: expected float, > 0, <= 1",
        ),
    ],
)
def test_bad_settings_are_refused_by_name(config, message):
    with pytest.raises(RaysoupError, match=message):
        config()


# TSV-M


def numpy_tsv(w0: dict, ingredients: list[dict]) -> dict:
    """The authors' compute_and_sum_svd_mem_reduction, in numpy: r-column factors padded
    with zeros, k = int(r / T); the other tensors (and, here, r < T) averaged."""
    n, out = len(ingredients), {}
    for key, base in w0.items():
        taus = [sd[key].double().numpy() - base.double().numpy() for sd in ingredients]
        r = min(base.shape) if base.dim() == 2 else 0
        k = int(r * (1 / n))
        if k == 0:
            out[key] = sum(taus) / n
            continue
        m, cols = base.shape
        sum_u, sum_s, sum_v = np.zeros((m, r)), np.zeros(r), np.zeros((r, cols))
        for i, tau in enumerate(taus):
            u, s, v = np.linalg.svd(tau, full_matrices=False)
            sum_u[:, i * k : (i + 1) * k], sum_s[i * k : (i + 1) * k] = u[:, :k], s[:k]
            sum_v[i * k : (i + 1) * k] = v[:k]
        u_u, _, v_u = np.linalg.svd(sum_u, full_matrices=False)
        u_v, _, v_v = np.linalg.svd(sum_v, full_matrices=False)
        out[key] = u_u @ v_u @ np.diag(sum_s) @ u_v @ v_v
    return out


def test_tsv_keeps_each_tasks_top_singular_vectors():
    """T = 2, r = 2: one vector each. tau_1 = diag(3, 1) keeps 3 e1 e1^T (its 1 is cut),
    tau_2 = diag(0, 2) keeps 2 e2 e2^T; U = V = [e1 e2] are orthonormal already, so the
    merged matrix is diag(3, 2). The bias is the mean task vector."""
    w0 = {"w": t([1.0, 1.0], [0.0, 2.0]), "b": t(1.0, 1.0), "n": torch.tensor(4)}
    ctx = memory_context(
        w0,
        {"w": w0["w"] + t([3.0, 0.0], [0.0, 1.0]), "b": t(2.0, 0.0), "n": torch.tensor(0)},
        {"w": w0["w"] + t([0.0, 0.0], [0.0, 2.0]), "b": t(4.0, 2.0), "n": torch.tensor(0)},
    )
    delta = tsv_delta(ctx)
    torch.testing.assert_close(
        delta["w"], torch.tensor([[3.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    )
    torch.testing.assert_close(delta["b"], torch.tensor([2.0, 0.0], dtype=torch.float64))
    merged = delta_mixer([w0, delta], np.array([0.5]), None)
    torch.testing.assert_close(merged["w"], t([2.5, 1.0], [0.0, 3.0]))
    assert int(merged["n"]) == 4 and "n" not in delta


def test_tsv_orthogonalises_the_tasks_vectors_as_the_authors_code_does():
    """Random 3 x 3, 4 x 6 and 2 x 5 task matrices of T = 3 tasks (k = 1, 1 and 0), and a
    bias: the same merged task vector as the authors' formula with its zero padding."""
    gen = torch.Generator().manual_seed(3)
    shapes = {"w": (3, 3), "v": (4, 6), "thin": (2, 5), "b": (3,)}
    w0 = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
    ingredients = [
        {k: v + torch.randn(v.shape, generator=gen) for k, v in w0.items()} for _ in range(3)
    ]
    delta = tsv_delta(memory_context(w0, *ingredients))
    expected = numpy_tsv(w0, ingredients)
    for key in shapes:
        np.testing.assert_allclose(delta[key].numpy(), expected[key], rtol=1e-10, atol=1e-12)
    # the non-trivial step: U of the kept vectors is not orthonormal, polar() changes it
    assert not np.allclose(
        expected["w"], sum(numpy_svd_top1(sd["w"] - w0["w"]) for sd in ingredients)
    )


def numpy_svd_top1(m: torch.Tensor) -> np.ndarray:
    u, s, v = np.linalg.svd(m.double().numpy())
    return s[0] * np.outer(u[:, 0], v[0])


# Iso-C


def numpy_iso_c(w0: dict, ingredients: list[dict]) -> dict:
    """The authors' iso_c, in numpy: the sum of the task matrices with its singular values
    replaced by their mean; the other tensors averaged."""
    out = {}
    for key, base in w0.items():
        taus = [sd[key].double().numpy() - base.double().numpy() for sd in ingredients]
        total = sum(taus)
        if base.dim() != 2:
            out[key] = total / len(taus)
            continue
        u, s, v = np.linalg.svd(total, full_matrices=False)
        out[key] = u @ np.diag(np.full_like(s, s.mean())) @ v
    return out


def test_iso_c_flattens_the_spectrum_of_the_summed_task_matrices():
    """tau_1 + tau_2 = [[0, 2], [1, 0]]: singular values 2 and 1 (mean 1.5), U V^T the swap
    [[0, 1], [1, 0]]: the merged matrix is 1.5 times the swap."""
    w0 = {"w": t([1.0, 0.0], [0.0, 1.0]), "b": t(0.0, 1.0)}
    ctx = memory_context(
        w0,
        {"w": w0["w"] + t([0.0, 2.0], [0.0, 0.0]), "b": t(2.0, 1.0)},
        {"w": w0["w"] + t([0.0, 0.0], [1.0, 0.0]), "b": t(0.0, 3.0)},
    )
    delta = iso_c_delta(ctx)
    torch.testing.assert_close(
        delta["w"], torch.tensor([[0.0, 1.5], [1.5, 0.0]], dtype=torch.float64)
    )
    torch.testing.assert_close(delta["b"], torch.tensor([1.0, 1.0], dtype=torch.float64))


def test_iso_c_matches_the_authors_formula_on_random_matrices():
    gen = torch.Generator().manual_seed(5)
    shapes = {"w": (3, 4), "v": (5, 2), "b": (4,)}
    w0 = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
    ingredients = [
        {k: v + torch.randn(v.shape, generator=gen) for k, v in w0.items()} for _ in range(3)
    ]
    delta, expected = iso_c_delta(memory_context(w0, *ingredients)), numpy_iso_c(w0, ingredients)
    for key in shapes:
        np.testing.assert_allclose(delta[key].numpy(), expected[key], rtol=1e-10, atol=1e-12)
    # isotropic: every singular value of the merged matrices is the same
    s = np.linalg.svd(expected["w"], compute_uv=False)
    np.testing.assert_allclose(s, s.mean())


def numpy_iso_cts(w0: dict, ingredients: list[dict], fraction: float) -> dict:
    """The authors' iso_cts, in numpy: a common subspace from the sum's top singular vectors,
    each task's top vectors of what it leaves, orthogonalised together, a flat spectrum."""
    out, n = {}, len(ingredients)
    for key, base in w0.items():
        taus = [sd[key].double().numpy() - base.double().numpy() for sd in ingredients]
        if base.dim() != 2:
            out[key] = sum(taus) / n
            continue
        r = min(base.shape)
        c = int(r * fraction)
        c = r - round((r - c) / n) * n
        u, s, v = np.linalg.svd(sum(taus), full_matrices=False)
        per_task = int((r - c) / n)
        cu, cs, cv = np.zeros((base.shape[0], r)), np.zeros(r), np.zeros((r, base.shape[1]))
        for i, tau in enumerate(taus):
            u_ts, s_ts, v_ts = np.linalg.svd(tau - u[:, :c] @ u[:, :c].T @ tau, full_matrices=False)
            cu[:, i * per_task : (i + 1) * per_task] = u_ts[:, :per_task]
            cs[i * per_task : (i + 1) * per_task] = s_ts[:per_task]
            cv[i * per_task : (i + 1) * per_task] = v_ts[:per_task]
        cu[:, n * per_task : n * per_task + c], cs[n * per_task : n * per_task + c] = (
            u[:, :c],
            s[:c],
        )
        cv[n * per_task : n * per_task + c] = v[:c]
        uu, _, vu = np.linalg.svd(cu, full_matrices=False)
        uv, _, vv = np.linalg.svd(cv, full_matrices=False)
        out[key] = (uu @ vu) @ np.diag(np.full(r, cs.mean())) @ (uv @ vv)
    return out


def test_iso_cts_matches_the_authors_formula_on_random_matrices():
    """Fraction 0.4 of r = 5 and 4 with T = 3 tasks: common c = 2 and 1, one task-specific
    vector per task (the sizes worked by hand below)."""
    assert (common_size(5, 3, 0.4), common_size(4, 3, 0.4)) == (2, 1)
    gen = torch.Generator().manual_seed(11)
    shapes = {"w": (6, 5), "v": (4, 7), "b": (5,)}
    w0 = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
    ingredients = [
        {k: v + torch.randn(v.shape, generator=gen) for k, v in w0.items()} for _ in range(3)
    ]
    delta = iso_cts_delta(memory_context(w0, *ingredients), 0.4)
    expected = numpy_iso_cts(w0, ingredients, 0.4)
    for key in shapes:
        np.testing.assert_allclose(delta[key].numpy(), expected[key], rtol=1e-10, atol=1e-12)
    # at fraction 1 every vector is common: Iso-C
    whole = iso_cts_delta(memory_context(w0, *ingredients), 1.0)
    iso = iso_c_delta(memory_context(w0, *ingredients))
    assert not np.allclose(delta["w"].numpy(), iso["w"].numpy())
    for key in shapes:
        torch.testing.assert_close(whole[key], iso[key])


def test_iso_cts_common_size_never_rounds_past_the_rank():
    # r = 3, T = 2, f = 0.1: (3 - 0) / 2 rounds to 2, 2 x 2 > 3, so one vector less per task
    assert common_size(3, 2, 0.1) == 1
    assert common_size(2, 4, 0.8) == 2 and common_size(768, 8, 0.8) == 616


class WatchedPool(MemoryPool):
    """Records, at each load, how many earlier loads still have a tensor alive."""

    def __init__(self, ingredients):
        super().__init__(ingredients)
        self.alive, self.refs = [], []

    def load(self, name):  # CPython frees a dropped ingredient at once (no cycles)
        self.alive.append(sum(r() is not None for r in self.refs))
        sd = super().load(name)
        self.refs.append(weakref.ref(next(iter(sd.values()))))
        return sd


@pytest.mark.parametrize(
    "delta, reads", [(tsv_delta, 4), (iso_c_delta, 4), (lambda ctx: iso_cts_delta(ctx, 0.5), 8)]
)
def test_the_svd_merges_read_one_ingredient_at_a_time(delta, reads):
    w0 = {"w": torch.zeros(4, 4), "b": torch.zeros(4)}
    ingredients = [{"w": torch.randn(4, 4), "b": torch.randn(4)} for _ in range(4)]
    ctx = memory_context(w0, *ingredients, pool=WatchedPool)
    delta(ctx)
    assert ctx.pool.alive == [0] * reads


# Through the registry, on the tiny zoo, knobs searched on val


@pytest.fixture(scope="module")
def context(tiny_zoo):
    return in_process_context(tiny_zoo)


@pytest.mark.parametrize(
    "name, config, bounds",
    [
        ("tsv_merge", TsvMergeConfig(budget=4), {"alpha": (0.0, 2.0)}),
        ("iso_c", IsoCConfig(budget=4), {"alpha": (0.0, 2.0)}),
        ("iso_cts", IsoCtsConfig(budget=4), {"alpha": (0.0, 2.0)}),
        (
            "task_arithmetic",
            TaskArithmeticConfig(budget=4, search_dare=True, dare=0.3),
            {"lambda": (0.0, 1.0), "dare": (0.0, 0.9)},
        ),
        (
            "ties_merging",
            TiesMergingConfig(budget=4, search_dare=True, dare=0.3),
            {"lambda": (0.0, 2.0), "density": (0.05, 1.0), "dare": (0.0, 0.9)},
        ),
    ],
)
def test_each_new_method_runs_behind_the_registry(context, name, config, bounds):
    before = context.judge.evaluations
    result = METHODS[name](context, config=config)
    details = result.details
    assert result.ingredients == context.pool.names and not result.ranked
    assert result.evaluations == len(details.trace) == context.judge.evaluations - before == 4
    assert details.val_accuracy == max(details.trace)
    assert set(details.knobs) == set(bounds)
    assert all(bounds[k][0] <= v <= bounds[k][1] for k, v in details.knobs.items())
    # the returned weights are the method's merge at the chosen knobs
    models = [context.pool.load(n) for n in context.pool.names]
    x = np.array(list(details.knobs.values()))

    def stored(delta):  # the merged task vector goes to the search in the weights' float32
        return {k: d.float() for k, d in delta(context).items()}

    expected = {
        "tsv_merge": lambda: delta_mixer([context.pretrained, stored(tsv_delta)], x, None),
        "iso_c": lambda: delta_mixer([context.pretrained, stored(iso_c_delta)], x, None),
        "iso_cts": lambda: delta_mixer(
            [context.pretrained, stored(lambda ctx: iso_cts_delta(ctx, 0.8))], x, None
        ),
        "task_arithmetic": lambda: TaskArithmeticMixer()([context.pretrained, *models], x, None),
        "ties_merging": lambda: TiesMixer()([context.pretrained, *models], x, None),
    }[name]()
    assert all(torch.equal(result.state_dict[k], expected[k]) for k in expected)
    assert all(torch.isfinite(v).all() for v in result.state_dict.values() if v.is_floating_point())


# Fisher merging


def test_fisher_merging_weighs_each_parameter_by_the_ingredients_fisher():
    """w = sum_i F_i w_i / sum_i F_i per entry, F floored: (3 * 1 + 1 * 3) / 4 = 1.5; where
    no Fisher reaches the floor, the plain mean 4. A float buffer (no Fisher) is averaged,
    a non-float tensor keeps ingredient 0's value."""
    fishers = {"ft-0": {"w": np.array([3.0, 0.0])}, "ft-1": {"w": np.array([1.0, 0.0])}}
    pool = MemoryPool(
        {
            "ft-0": {"w": t(1.0, 2.0), "buf": t(2.0), "n": torch.tensor(5)},
            "ft-1": {"w": t(3.0, 6.0), "buf": t(4.0), "n": torch.tensor(9)},
        }
    )
    seen = []

    def fisher(fn, sd, config):
        name = "ft-0" if float(sd["w"][0]) == 1.0 else "ft-1"
        seen.append(name)
        return fishers[name]

    ctx = SoupContext(pool, ValidationJudge(lambda sd: 0.0), [], statistic=fisher)
    result = METHODS["fisher_merging"](ctx)
    torch.testing.assert_close(result.state_dict["w"], t(1.5, 4.0))
    torch.testing.assert_close(result.state_dict["buf"], t(3.0))
    assert int(result.state_dict["n"]) == 5 and seen == ["ft-0", "ft-1"]
    assert result.evaluations == 2 and not result.ranked


def test_fisher_is_the_mean_squared_per_image_gradient_of_the_sampled_label(tiny_zoo):
    """fisher_sum's vectorised per-image gradients against one backward pass per image, with
    the labels drawn as its convention says (seeded, from the model's own prediction)."""
    from raysoup.evaluate import VAL, Evaluator
    from raysoup.inputs.data import EvalSet
    from raysoup.methods.fisher_merging import FisherMergingConfig, fisher_sum

    full = val_evaluator(tiny_zoo)
    images, labels, class_map = full.sets[VAL]
    pool = IngredientPool.from_zoo(tiny_zoo)
    evaluator = Evaluator(
        pool.spec, [EvalSet(VAL, images[:12].numpy(), labels[:12].numpy(), class_map)]
    )
    sd = pool.load(pool.names[0])
    config = FisherMergingConfig(batch_size=5, seed=2)
    total, rows = fisher_sum(evaluator, VAL, sd, config, stream=1)
    assert rows == 12
    model, x = evaluator.model, evaluator.sets[VAL][0]
    generator = torch.Generator().manual_seed(2 * 1_000_003 + 1)
    expected = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in model.named_parameters()}
    for batch in torch.arange(12).split(5):
        with torch.no_grad():
            probs = torch.softmax(evaluator.project(model(x[batch]), class_map), dim=-1)
        drawn = torch.multinomial(probs.float(), 1, generator=generator)[:, 0]
        for row, label in zip(batch, drawn):
            model.zero_grad()
            log_p = torch.log_softmax(evaluator.project(model(x[row : row + 1]), class_map), -1)
            log_p[0, label].backward()
            for k, p in model.named_parameters():
                expected[k] += p.grad.double().square()
    assert set(total) == set(expected)
    for k, value in expected.items():
        np.testing.assert_allclose(total[k], value.numpy(), rtol=1e-4, atol=1e-10)


def test_fisher_merging_runs_behind_the_registry(context, tiny_zoo):
    from raysoup.evaluate import VAL
    from raysoup.methods.fisher_merging import fisher_sum

    evaluator = val_evaluator(tiny_zoo)

    def fisher(fn, sd, config):
        assert fn is fisher_sum
        total, rows = fn(evaluator, VAL, sd, config, 0)
        return {k: v / rows for k, v in total.items()}

    ctx = SoupContext(context.pool, context.judge, context.ranking, statistic=fisher)
    result = METHODS["fisher_merging"](ctx)
    assert result.evaluations == len(context.pool) and result.ingredients == context.pool.names
    assert set(result.state_dict) == set(context.pool.load(context.pool.names[0]))
    assert all(torch.isfinite(v).all() for v in result.state_dict.values() if v.is_floating_point())
    assert 0.0 < context.judge(result.state_dict) <= 1.0
