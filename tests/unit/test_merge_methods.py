"""Model Stock, task arithmetic, TIES-merging and learned soup: each method's defining
arithmetic against a hand computation on tiny weights, and each run in-process on the tiny
zoo through the same registry as the others."""

import math

import numpy as np
import pytest
import torch

from raysoup.components import partition
from raysoup.errors import RaysoupError
from raysoup.evaluate import VAL
from raysoup.inputs.pool import IngredientPool
from raysoup.methods import METHODS, SoupContext, ValidationJudge
from raysoup.methods.learned_soup import (
    LearnedSoupConfig,
    check_memory,
    learn_mixing_logits,
    mixing_components,
    softmax,
)
from raysoup.methods.model_stock import ModelStockConfig, model_stock_merge
from raysoup.methods.task_arithmetic import TaskArithmeticConfig, task_arithmetic_merge
from raysoup.methods.ties_merging import TiesMergingConfig, ties_merge
from raysoup.mixing import weighted_sum

from ..helpers import MemoryPool, in_process_context, val_evaluator


def t(*values):
    return torch.tensor(values, dtype=torch.float32)


def test_model_stock_ratio_follows_the_angle_between_the_deltas():
    w0 = {
        "orthogonal": t(1.0, 1.0),
        "aligned": t(0.0, 0.0),
        "sixty": t(0.0, 0.0),
        "step": torch.tensor(7),
    }
    w1 = {
        "orthogonal": t(2.0, 1.0),
        "aligned": t(1.0, 1.0),
        "sixty": t(1.0, 0.0),
        "step": torch.tensor(1),
    }
    w2 = {
        "orthogonal": t(1.0, 2.0),
        "aligned": t(2.0, 2.0),
        "sixty": t(0.5, math.sqrt(3) / 2),
        "step": torch.tensor(2),
    }
    merged = model_stock_merge(w0, [w1, w2])
    # cos 0 -> t = 0: the pretrained weights
    torch.testing.assert_close(merged["orthogonal"], t(1.0, 1.0))
    # cos 1 -> t = 2 / 2 = 1: the average
    torch.testing.assert_close(merged["aligned"], t(1.5, 1.5))
    # cos 1/2 -> t = 2 * 0.5 / 1.5 = 2/3 of the average delta (0.75, sqrt(3)/4)
    torch.testing.assert_close(merged["sixty"], t(0.5, math.sqrt(3) / 6))
    assert int(merged["step"]) == 7


def test_model_stock_streams_the_mean_pairwise_cosine_of_n_deltas():
    gen = torch.Generator().manual_seed(0)
    w0 = {"w": torch.randn(5, 3, generator=gen)}
    shared = torch.randn(5, 3, generator=gen)
    fine = [{"w": w0["w"] + shared + 0.7 * torch.randn(5, 3, generator=gen)} for _ in range(4)]
    deltas = [(f["w"] - w0["w"]).flatten().double() for f in fine]
    cosines = [
        float(a @ b / (a.norm() * b.norm())) for i, a in enumerate(deltas) for b in deltas[i + 1 :]
    ]
    cos = sum(cosines) / len(cosines)
    ratio = 4 * cos / (1 + 3 * cos)
    expected = ratio * torch.stack([f["w"] for f in fine]).mean(0) + (1 - ratio) * w0["w"]
    torch.testing.assert_close(model_stock_merge(w0, iter(fine))["w"], expected)


def test_model_stock_needs_two_ingredients():
    with pytest.raises(RaysoupError, match="at least 2 ingredients"):
        model_stock_merge({"w": t(0.0)}, [{"w": t(1.0)}])


def test_task_arithmetic_adds_the_scaled_sum_of_task_vectors():
    w0 = {"w": t(1.0, 2.0), "n": torch.tensor(3)}
    ingredients = [
        {"w": t(2.0, 2.0), "n": torch.tensor(0)},
        {"w": t(1.0, 5.0), "n": torch.tensor(0)},
    ]
    merged = task_arithmetic_merge(w0, ingredients, 0.5)
    # tau = (1, 0) + (0, 3) = (1, 3); w0 + 0.5 tau
    torch.testing.assert_close(merged["w"], t(1.5, 3.5))
    assert int(merged["n"]) == 3


def test_ties_trims_elects_a_sign_and_averages_the_agreeing_entries():
    w0 = {"a": t(1.0, 1.0), "b": t(0.0, 0.0), "n": torch.tensor(5)}
    taus = [(3.0, -1.0, 0.5, 2.0), (-2.0, -2.0, 1.0, 0.1), (1.0, 4.0, -0.2, -3.0)]
    ingredients = [
        {"a": w0["a"] + t(*tau[:2]), "b": t(*tau[2:]), "n": torch.tensor(0)} for tau in taus
    ]
    merged = ties_merge(w0, ingredients, scale=0.5, density=0.5)
    # Keep 2 of 4 per task vector: (3, 0, 0, 2), (-2, -2, 0, 0), (0, 4, 0, -3).
    # Elected signs of the sums (1, 2, 0, -1): +, +, 0, -. Agreeing means: 3, 4, 0, -3.
    torch.testing.assert_close(merged["a"], t(1.0 + 0.5 * 3, 1.0 + 0.5 * 4))
    torch.testing.assert_close(merged["b"], t(0.0, -1.5))
    assert int(merged["n"]) == 5 and list(merged) == ["a", "b", "n"]


def test_ties_at_full_density_and_agreeing_signs_is_the_scaled_mean():
    w0 = {"w": t(0.0, 0.0, 0.0)}
    ingredients = [{"w": t(1.0, 2.0, -1.0)}, {"w": t(3.0, 4.0, -2.0)}]
    torch.testing.assert_close(ties_merge(w0, ingredients, 1.0, 1.0)["w"], t(2.0, 3.0, -1.5))


def test_learned_soup_softmax_columns_sum_to_one_and_zero_logits_are_uniform():
    betas = softmax(np.array([[0.0, 2.0], [0.0, 0.0], [0.0, -1.0]]))
    np.testing.assert_allclose(betas.sum(axis=0), 1.0)
    np.testing.assert_allclose(betas[:, 0], 1 / 3)
    e = np.exp([2.0, 0.0, -1.0])
    np.testing.assert_allclose(betas[:, 1], e / e.sum())


@pytest.fixture(scope="module")
def context(tiny_zoo):
    return in_process_context(tiny_zoo)


def test_learned_soup_lowers_the_validation_loss_of_the_uniform_soup(context, tiny_zoo):
    """Gradient steps move the logits away from the uniform soup (zero logits) towards a
    lower validation loss; the soup is sum_j softmax(logits)_j w_j per component."""
    evaluator = val_evaluator(tiny_zoo)
    pool, components = context.pool, context.components
    models = [pool.load(n) for n in pool.names]
    logits, scale = learn_mixing_logits(
        evaluator, VAL, models, components, LearnedSoupConfig(epochs=3, lr=0.1)
    )
    assert logits.shape == (len(pool), len(components)) and np.isfinite(logits).all()
    assert scale == 1.0  # not learned by default

    def loss(betas):
        evaluator.load(weighted_sum(lambda j: models[j], betas, components))
        images, labels, _ = evaluator.sets[VAL]
        with torch.no_grad():
            return float(torch.nn.functional.cross_entropy(evaluator.model(images), labels))

    assert loss(softmax(logits)) < loss(softmax(np.zeros_like(logits)))


@pytest.mark.parametrize(
    "name, options",
    [
        ("model_stock", {}),
        ("task_arithmetic", {"config": TaskArithmeticConfig(budget=4)}),
        ("ties_merging", {"config": TiesMergingConfig(budget=4)}),
        ("learned_soup", {"config": LearnedSoupConfig(epochs=1)}),
    ],
)
def test_each_method_runs_behind_the_registry(context, name, options):
    judge_before = context.judge.evaluations
    result = METHODS[name](context, **options)
    assert result.ingredients == context.pool.names and not result.ranked
    assert set(result.state_dict) == set(context.pool.load(context.pool.names[0]))
    assert all(torch.isfinite(v).all() for v in result.state_dict.values() if v.is_floating_point())
    if name in ("task_arithmetic", "ties_merging"):
        # Knobs chosen on val by the search, every evaluation counted and traced.
        details = result.details
        assert result.evaluations == len(details.trace) == 4
        assert details.val_accuracy == max(details.trace)
        assert context.judge.evaluations - judge_before == 4
        bounds = {
            "lambda": options["config"].scale_bounds,
            "density": getattr(options["config"], "density_bounds", (0, 1)),
        }
        assert all(bounds[k][0] <= v <= bounds[k][1] for k, v in details.knobs.items())


def test_learned_soup_refuses_a_pool_that_does_not_fit(tiny_zoo):
    pool = IngredientPool.from_zoo(tiny_zoo)
    with pytest.raises(
        RaysoupError,
        match=r"learned_soup holds every ingredient.*GiB.*"
        r"learned_soup.max_memory_gb",
    ):
        check_memory(pool, LearnedSoupConfig(max_memory_gb=1e-6))
    check_memory(pool, LearnedSoupConfig())  # the tiny pool fits this machine


@pytest.mark.parametrize(
    "config, message",
    [
        (lambda: TaskArithmeticConfig(scale_bounds=(1.0, 0.5)), "task_arithmetic.scale_bounds"),
        (lambda: TiesMergingConfig(density_bounds=(0.0, 1.5)), "ties_merging.density_bounds"),
        (lambda: TiesMergingConfig(budget=0), r"ties_merging.budget = 0: expected int, >= 1"),
        (lambda: TaskArithmeticConfig(optimizer="NoSuchOpt"), "unknown nevergrad optimizer"),
        (lambda: LearnedSoupConfig(epochs=0), r"learned_soup.epochs = 0: expected int, >= 1"),
    ],
)
def test_bad_method_settings_are_refused_by_name(config, message):
    with pytest.raises(RaysoupError, match=message):
        config()


# The conventions where mergekit, FusionBench and the authors' code differ
# (docs/methods/): each option on a hand-worked example.


def one_task_vector(tau, **conventions):
    """TIES of a single ingredient w_0 + tau at lambda 1: the trimmed tau itself (its own
    signs are elected, every kept entry agrees)."""
    w0 = {"w": torch.zeros(len(tau))}
    return ties_merge(w0, [{"w": t(*tau)}], 1.0, conventions.pop("density"), **conventions)["w"]


@pytest.mark.parametrize(
    "density, topk, kept",
    [
        (0.3, "round", (5, 4, 0, 0, 0)),  # round(1.5) = 2
        (0.3, "floor", (5, 0, 0, 0, 0)),  # int(1.5) = 1 (mergekit's count)
        (0.3, "floor_plus_one", (5, 4, 0, 0, 0)),  # int(1.5) + 1 = 2 (the authors')
        (0.5, "round", (5, 4, 0, 0, 0)),  # round(2.5) = 2: half to even
        (0.5, "floor", (5, 4, 0, 0, 0)),
        (0.5, "floor_plus_one", (5, 4, 3, 0, 0)),  # int(2.5) + 1 = 3
    ],
)
def test_ties_topk_counts(density, topk, kept):
    torch.testing.assert_close(
        one_task_vector((5.0, 4.0, 3.0, 2.0, 1.0), density=density, topk=topk), t(*kept)
    )


def test_ties_keeps_every_entry_tied_at_the_cutoff():
    # round(0.3 * 5) = 2 entries, the 2nd largest magnitude is 4: -4 and 4 both kept
    torch.testing.assert_close(
        one_task_vector((5.0, -4.0, 4.0, 1.0, 0.5), density=0.3), t(5.0, -4.0, 4.0, 0.0, 0.0)
    )


def test_ties_trims_the_whole_vector_or_each_tensor():
    w0 = {"a": t(0.0, 0.0), "b": t(0.0, 0.0)}
    fine = [{"a": t(4.0, 3.0), "b": t(0.1, -0.2)}]
    whole = ties_merge(w0, fine, 1.0, 0.5)  # 2 of the 4 entries
    per_tensor = ties_merge(w0, fine, 1.0, 0.5, "per_tensor")  # 1 of each tensor's 2
    torch.testing.assert_close([whole["a"], whole["b"]], [t(4.0, 3.0), t(0.0, 0.0)])
    torch.testing.assert_close([per_tensor["a"], per_tensor["b"]], [t(4.0, 0.0), t(0.0, -0.2)])


@pytest.mark.parametrize(
    "zero_sign, first",
    [
        ("zero", 0.0),  # sign sum 0 elects nothing: the parameter keeps w_0
        ("positive", 2.0),  # mergekit: sum >= 0 elects +, the mean of the positive entries
        ("majority", -2.0),  # authors, FusionBench: the sign of the elected signs' sum (-1 - 1)
    ],
)
def test_ties_exact_zero_sign_sum(zero_sign, first):
    w0 = {"w": t(0.0, 0.0, 0.0)}
    fine = [{"w": t(2.0, -1.0, -1.0)}, {"w": t(-2.0, -1.0, -1.0)}]  # sums 0, -2, -2
    merged = ties_merge(w0, fine, 1.0, 1.0, zero_sign=zero_sign)["w"]
    torch.testing.assert_close(merged, t(first, -1.0, -1.0))


def test_ties_conventions_reach_the_merge_through_the_registry(context):
    config = TiesMergingConfig(
        budget=2, trim="per_tensor", topk="floor_plus_one", zero_sign="positive"
    )
    result = METHODS["ties_merging"](context, config=config)
    knobs = result.details.knobs
    models = [context.pool.load(n) for n in context.pool.names]
    args = (context.pretrained, models, knobs["lambda"], knobs["density"])
    expected = ties_merge(*args, "per_tensor", "floor_plus_one", "positive")
    default = ties_merge(*args)
    assert all(torch.equal(result.state_dict[k], expected[k]) for k in expected)
    assert not all(torch.equal(default[k], expected[k]) for k in expected)


def stock_context(*deltas, w0=(0.0, 0.0)) -> SoupContext:
    pool = MemoryPool({f"ft-{i}": {"w": t(*w0) + t(*d)} for i, d in enumerate(deltas)})
    return SoupContext(pool, ValidationJudge(lambda sd: 0.0), [], pretrained={"w": t(*w0)})


def test_model_stock_clips_or_extrapolates_a_negative_cosine():
    # deltas (1, 0) and (-1, sqrt 3): cos = -1/2, t = 2(-1/2) / (1 - 1/2) = -2
    ctx = stock_context((1.0, 0.0), (-1.0, math.sqrt(3)), w0=(1.0, 1.0))
    clipped = METHODS["model_stock"](ctx).state_dict["w"]
    torch.testing.assert_close(clipped, t(1.0, 1.0))  # t clipped to 0: w_0
    free = METHODS["model_stock"](ctx, config=ModelStockConfig(clip=False)).state_dict["w"]
    # -2 * mean (1, 1 + sqrt(3)/2) + 3 * w_0
    torch.testing.assert_close(free, t(1.0, 1.0 - math.sqrt(3)))


def test_model_stock_averages_cosines_or_angles():
    # pairwise angles 0, 90, 90 degrees: mean cosine 1/3 -> t = 1 / (5/3) = 0.6;
    # mean angle 60 -> cos 1/2 -> t = 1.5 / 2 = 0.75; the mean of the fine-tunes (1, 1/3)
    ctx = stock_context((1.0, 0.0), (2.0, 0.0), (0.0, 1.0))
    cosine = METHODS["model_stock"](ctx).state_dict["w"]
    angle = METHODS["model_stock"](ctx, config=ModelStockConfig(average="angle"))
    torch.testing.assert_close(cosine, t(0.6, 0.2))
    torch.testing.assert_close(angle.state_dict["w"], t(0.75, 0.25))


def test_model_stock_refuses_deltas_that_cancel_out_when_unclipped():
    ctx = stock_context((1.0, 0.0), (-2.0, 0.0))  # cos = -1: t = -2 / 0
    with pytest.raises(RaysoupError, match="'w' cancel out"):
        METHODS["model_stock"](ctx, config=ModelStockConfig(clip=False))


def test_learned_soup_weighs_each_tensor_with_granularity_tensor():
    """Two tensors in one component: "tensor" gives each its own column of logits."""
    pool = MemoryPool(
        {
            "a": {"x.u": t(1.0), "x.v": t(2.0), "x.n": torch.tensor(7)},
            "b": {"x.u": t(3.0), "x.v": t(6.0), "x.n": torch.tensor(9)},
        }
    )
    components = partition(list(pool.load("a")), "whole-model")
    seen = []

    def learn(fn, models, config):  # a stand-in: fixed logits, softmax (1/2, 1/2), (3/4, 1/4)
        seen.append(config.granularity)
        return np.array([[0.0, math.log(3.0)], [0.0, 0.0]]), 1.0

    ctx = SoupContext(pool, ValidationJudge(lambda sd: 0.0), [], components=components, learn=learn)
    result = METHODS["learned_soup"](ctx, config=LearnedSoupConfig(granularity="tensor"))
    assert result.details.components == ["x.u", "x.v"] and seen == ["tensor"]
    torch.testing.assert_close(result.state_dict["x.u"], t(2.0))  # (1 + 3) / 2
    torch.testing.assert_close(result.state_dict["x.v"], t(3.0))  # 3/4 2 + 1/4 6
    assert int(result.state_dict["x.n"]) == 7  # non-float: ingredient 0's


def test_learned_soup_per_tensor_with_a_learned_scale_lowers_the_loss(context, tiny_zoo):
    evaluator = val_evaluator(tiny_zoo)
    pool, components = context.pool, context.components
    models = [pool.load(n) for n in pool.names]
    config = LearnedSoupConfig(epochs=2, lr=0.1, granularity="tensor", scale=True)
    logits, scale = learn_mixing_logits(evaluator, VAL, models, components, config)
    tensors = mixing_components(components, config, models[0])
    assert len(tensors) == sum(v.is_floating_point() for v in models[0].values()) > 3
    assert logits.shape == (len(pool), len(tensors)) and scale != 1.0

    def loss(betas):
        evaluator.load(weighted_sum(lambda j: models[j], betas, tensors))
        images, labels, _ = evaluator.sets[VAL]
        with torch.no_grad():
            return float(torch.nn.functional.cross_entropy(evaluator.model(images), labels))

    assert loss(softmax(logits)) < loss(softmax(np.zeros_like(logits)))


@pytest.mark.parametrize(
    "config, message",
    [
        (
            lambda: TiesMergingConfig(trim="layer"),
            r"ties_merging.trim = \"layer\": expected 'global' \| 'per_tensor'",
        ),
        (
            lambda: ModelStockConfig(average="median"),
            r"model_stock.average = \"median\": expected 'cosine' \| 'angle'",
        ),
        (
            lambda: LearnedSoupConfig(granularity="layer"),
            r"learned_soup.granularity = \"layer\": expected 'component' \| 'tensor'",
        ),
    ],
)
def test_unknown_conventions_are_refused_by_name(config, message):
    with pytest.raises(RaysoupError, match=message):
        config()


def test_model_stock_through_the_registry_is_the_papers_merge_by_hand(context):
    """METHODS["model_stock"] (default settings) on the tiny zoo equals, key by key, the
    paper's rule computed here: the mean pairwise cosine of the deltas, clipped to [0, 1],
    t = N cos / (1 + (N - 1) cos), w = t mean(w_i) + (1 - t) w_0."""
    result = METHODS["model_stock"](context)
    fine = [context.pool.load(n) for n in context.pool.names]
    n = len(fine)
    for key, base in context.pretrained.items():
        if not base.is_floating_point():
            assert torch.equal(result.state_dict[key], base), key
            continue
        deltas = [(f[key].double() - base.double()).flatten() for f in fine]
        cosines = [
            float(a @ b / (a.norm() * b.norm())) if a.norm() * b.norm() > 0 else 0.0
            for i, a in enumerate(deltas)
            for b in deltas[i + 1 :]
        ]
        cos = min(1.0, max(0.0, sum(cosines) / len(cosines)))
        ratio = n * cos / (1 + (n - 1) * cos)
        mean = torch.stack([f[key].double() for f in fine]).mean(0)
        expected = (ratio * mean + (1 - ratio) * base.double()).to(base.dtype)
        torch.testing.assert_close(result.state_dict[key], expected, msg=key)
    assert result.evaluations == 0 and result.ingredients == context.pool.names


def test_learned_soup_through_the_registry_is_the_softmax_mix_of_its_learned_logits(
    context, tiny_zoo
):
    """METHODS["learned_soup"] (default settings but one epoch, for time) equals the soup
    built here from the logits learn_mixing_logits learns on val: per component i,
    sum_j softmax(logits[:, i])_j w_j; non-float keys are ingredient 0's."""
    config = LearnedSoupConfig(epochs=1)
    result = METHODS["learned_soup"](context, config=config)
    models = [context.pool.load(n) for n in context.pool.names]
    components = context.components
    logits, _ = learn_mixing_logits(val_evaluator(tiny_zoo), VAL, models, components, config)
    weights = np.exp(logits) / np.exp(logits).sum(axis=0)
    np.testing.assert_allclose(result.details.betas, weights, rtol=1e-6, atol=1e-9)
    assert not np.allclose(weights, 1 / len(models))  # it learned something: not uniform
    for i, keys in enumerate(components.keys):
        for key in keys:
            if not models[0][key].is_floating_point():
                assert torch.equal(result.state_dict[key], models[0][key]), key
                continue
            expected = sum(weights[j, i] * m[key].double() for j, m in enumerate(models))
            torch.testing.assert_close(
                result.state_dict[key], expected.to(models[0][key].dtype), msg=key
            )
