"""RegMean and AdaMerging: each method's defining arithmetic against a hand computation or
an independent closed form on tiny weights, its data pass on the tiny zoo, and each run
in-process through the registry."""

import numpy as np
import pytest
import torch

from raysoup.components import Components, partition
from raysoup.errors import RaysoupError
from raysoup.evaluate import VAL
from raysoup.inputs.pool import IngredientPool
from raysoup.methods import METHODS, SoupContext, ValidationJudge
from raysoup.methods.adamerging import AdaMergingConfig, check_memory, entropy, learn_coefficients
from raysoup.methods.regmean import RegMeanConfig, gram_sum, regmean_solve
from raysoup.search import LocalSearch

from ..helpers import MemoryPool, in_process_context, val_evaluator


def t(*rows):
    return torch.tensor(rows, dtype=torch.float32)


# RegMean


def sums(weights, grams):
    """S, A, B of regmean_solve from torch-layout weights (out x in) and Grams."""
    s = sum(grams)
    a = sum(g @ w.T for g, w in zip(grams, weights))
    b = sum(g.diagonal()[:, None] * w.T for g, w in zip(grams, weights))
    return s, a, b


def test_regmean_at_alpha_1_minimises_the_summed_squared_output_errors():
    """sum_i ||X_i W^T - X_i W_i^T||^2 is least squares on the stacked inputs: W against
    numpy's lstsq of [X_1; X_2; X_3] W^T = [X_1 W_1^T; ...]."""
    rng = np.random.default_rng(0)
    xs = [rng.normal(size=(n, 4)) for n in (7, 5, 9)]
    ws = [rng.normal(size=(3, 4)) for _ in xs]
    expected = np.linalg.lstsq(
        np.vstack(xs), np.vstack([x @ w.T for x, w in zip(xs, ws)]), rcond=None
    )[0].T
    s, a, b = sums([torch.from_numpy(w) for w in ws], [torch.from_numpy(x.T @ x) for x in xs])
    np.testing.assert_allclose(regmean_solve(s, a, b, 1.0).numpy(), expected, atol=1e-10)


def test_regmean_by_hand_at_alpha_1_and_0():
    """W_1 = [1, 2], G_1 = [[3, 1], [1, 1]]; W_2 = [3, 6], G_2 = I.
    alpha = 1: [[4, 1], [1, 2]] w = G_1 W_1^T + G_2 W_2^T = [5, 3] + [3, 6] = [8, 9], so
    w = (1/7) [[2, -1], [-1, 4]] [8, 9] = [1, 4].
    alpha = 0 (diagonals only): per input feature, (3 * 1 + 1 * 3) / 4 = 1.5, (2 + 6) / 2 = 4."""
    s, a, b = sums(
        [
            torch.tensor([[1.0, 2.0]], dtype=torch.float64),
            torch.tensor([[3.0, 6.0]], dtype=torch.float64),
        ],
        [
            torch.tensor([[3.0, 1.0], [1.0, 1.0]], dtype=torch.float64),
            torch.eye(2, dtype=torch.float64),
        ],
    )
    torch.testing.assert_close(
        regmean_solve(s, a, b, 1.0), torch.tensor([[1.0, 4.0]], dtype=torch.float64)
    )
    torch.testing.assert_close(
        regmean_solve(s, a, b, 0.0), torch.tensor([[1.5, 4.0]], dtype=torch.float64)
    )


@pytest.mark.parametrize("alpha, weight", [(1.0, (1.0, 4.0)), (0.0, (1.5, 4.0))])
def test_regmean_through_the_registry_solves_linear_weights_and_averages_the_rest(alpha, weight):
    """The hand example above behind the registry: the Grams from the context's statistic
    (one per ingredient), the bias averaged, a non-float tensor ingredient 0's; alpha from
    a one-evaluation search that starts there."""
    pool = MemoryPool(
        {
            "a": {"lin.weight": t([1.0, 2.0]), "lin.bias": t(1.0), "n": torch.tensor(5)},
            "b": {"lin.weight": t([3.0, 6.0]), "lin.bias": t(3.0), "n": torch.tensor(9)},
        }
    )
    grams = {1.0: np.array([[3.0, 1.0], [1.0, 1.0]]), 3.0: np.eye(2)}
    seen = []

    def statistic(fn, sd, config):
        assert fn is gram_sum
        seen.append(float(sd["lin.weight"][0, 0]))
        return {"lin.weight": grams[seen[-1]]}

    judge = ValidationJudge(lambda sd: 0.5)
    components = partition(list(pool.load("a")), "whole-model")
    ctx = SoupContext(
        pool,
        judge,
        [],
        components=components,
        search=LocalSearch(judge, components),
        statistic=statistic,
    )
    result = METHODS["regmean"](ctx, config=RegMeanConfig(budget=1, start=alpha))
    assert seen == [1.0, 3.0] and result.details.knobs == {"alpha": alpha}
    torch.testing.assert_close(result.state_dict["lin.weight"], t(weight))
    torch.testing.assert_close(result.state_dict["lin.bias"], t(2.0))
    assert int(result.state_dict["n"]) == 5
    assert result.evaluations == 2 + 1  # a Gram pass per ingredient, one search evaluation


def test_gram_sum_hooks_every_called_linear_and_self_attention_input(tiny_zoo):
    """The head's Gram is F^T F of the features it is given; every attention's
    in_proj_weight and MLP weight has one, out_proj (read by the attention kernel, never
    called) and the patch convolution have none."""
    evaluator = val_evaluator(tiny_zoo)
    pool = IngredientPool.from_zoo(tiny_zoo)
    sd = pool.load(pool.names[0])
    grams, rows = gram_sum(evaluator, VAL, sd, RegMeanConfig(batch_size=100))
    images = evaluator.sets[VAL][0]
    assert rows == len(images)
    model = evaluator.model
    with torch.no_grad():
        features = model.model.visual(model.preprocess(images))
        if model.spec.normalize_features:
            features = features / features.norm(dim=-1, keepdim=True)
    f = features.double()
    np.testing.assert_allclose(
        grams["classification_head.weight"], (f.T @ f).numpy(), rtol=1e-6, atol=1e-8
    )
    blocks = {k.split(".attn")[0] for k in sd if k.endswith("attn.in_proj_weight")}
    assert blocks and all(
        f"{b}.attn.in_proj_weight" in grams
        and f"{b}.mlp.c_fc.weight" in grams
        and f"{b}.mlp.c_proj.weight" in grams
        for b in blocks
    )
    assert not any("out_proj" in k or "conv" in k for k in grams)
    assert all(g.shape == (sd[k].shape[1],) * 2 for k, g in grams.items())


@pytest.fixture(scope="module")
def context(tiny_zoo):
    return in_process_context(tiny_zoo)


def test_regmean_runs_behind_the_registry(context):
    result = METHODS["regmean"](context, config=RegMeanConfig(budget=3))
    assert result.evaluations == len(context.pool) + 3
    assert 0.0 <= result.details.knobs["alpha"] <= 1.0
    assert set(result.state_dict) == set(context.pool.load(context.pool.names[0]))
    assert 0.0 < context.judge(result.state_dict) <= 1.0


# AdaMerging


class LinearEvaluator:
    """What learn_coefficients uses of an evaluator, for logits = x W^T."""

    device = torch.device("cpu")

    def __init__(self, inputs, labels):
        self.sets = {VAL: (inputs, labels, None)}

    def project(self, logits, class_map):
        return logits

    def logits(self, batch, params):
        return batch @ params["w"].T


def test_one_adam_step_moves_lambda_down_the_entropy_gradient_by_lr():
    """w_0 = 0, tau = [[1], [0]]: the logits of x = 1 are (lambda, 0), whose entropy falls
    as lambda grows past 0; Adam's first step moves lambda by lr against the gradient's
    sign: 0.3 -> 0.3 + lr."""
    evaluator = LinearEvaluator(torch.ones(4, 1), torch.zeros(4, dtype=torch.int64))
    w0, w1 = {"w": torch.zeros(2, 1)}, {"w": t([1.0], [0.0])}
    config = AdaMergingConfig(epochs=1, lr=0.05, batch_size=4)
    lambdas = learn_coefficients(evaluator, VAL, [w0, w1], Components(("all",), (("w",),)), config)
    np.testing.assert_allclose(lambdas, [[0.35]], atol=1e-6)


def test_entropy_by_hand():
    """Two equal logits: log 2 nats; one certain row: 0."""
    torch.testing.assert_close(
        entropy(torch.tensor([[0.0, 0.0]])), torch.tensor(np.log(2.0), dtype=torch.float32)
    )
    assert float(entropy(torch.tensor([[0.0, -1e4]]))) == pytest.approx(0.0, abs=1e-6)


def test_adamerging_merges_w0_plus_the_learned_lambda_times_each_task_vector():
    """Per tensor: w = w_0 + sum_i lambda_{i, tensor} tau_i with the learner's lambdas
    (a stand-in); a non-float tensor keeps w_0's."""
    w0 = {"x.u": t(1.0), "x.v": t(2.0), "x.n": torch.tensor(7)}
    pool = MemoryPool(
        {
            "a": {"x.u": t(3.0), "x.v": t(6.0), "x.n": torch.tensor(8)},
            "b": {"x.u": t(0.0), "x.v": t(4.0), "x.n": torch.tensor(9)},
        }
    )
    components = partition(list(w0), "whole-model")

    def learn(fn, models, config):
        assert fn is learn_coefficients and len(models) == 3
        return np.array([[0.5, 0.25], [1.0, 0.0]])

    ctx = SoupContext(
        pool, ValidationJudge(lambda sd: 0.0), [], components=components, pretrained=w0, learn=learn
    )
    result = METHODS["adamerging"](ctx)
    assert result.details.components == ["x.u", "x.v"] and result.evaluations == 2
    torch.testing.assert_close(result.state_dict["x.u"], t(1.0))  # 1 + 0.5 * 2 + 1 * -1
    torch.testing.assert_close(result.state_dict["x.v"], t(3.0))  # 2 + 0.25 * 4 + 0 * 2
    assert int(result.state_dict["x.n"]) == 7


def test_adamerging_never_reads_the_labels_and_lowers_the_entropy(context, tiny_zoo):
    """The same lambdas with val's labels shuffled; the merged model's mean entropy on val
    below that of the start (every lambda 0.3)."""
    from raysoup.methods.adamerging import ada_merge
    from raysoup.methods.learned_soup import mixing_components

    evaluator = val_evaluator(tiny_zoo)
    pool, components = context.pool, context.components
    models = [context.pretrained, *(pool.load(n) for n in pool.names)]
    config = AdaMergingConfig(epochs=1, batch_size=100)
    lambdas = learn_coefficients(evaluator, VAL, models, components, config)
    inputs, labels, class_map = evaluator.sets[VAL]
    evaluator.sets[VAL] = (inputs, labels[torch.randperm(len(labels))], class_map)
    np.testing.assert_array_equal(
        learn_coefficients(evaluator, VAL, models, components, config), lambdas
    )
    columns = mixing_components(components, config, context.pretrained)

    def mean_entropy(lam):
        evaluator.load(ada_merge(context.pretrained, lambda i: models[i + 1], lam, columns))
        with torch.no_grad():
            return float(entropy(evaluator.project(evaluator.logits(inputs), class_map)))

    assert mean_entropy(lambdas) < mean_entropy(np.full_like(lambdas, 0.3))
    assert (
        lambdas.shape == (len(pool), len(columns)) and (0 <= lambdas).all() and (lambdas <= 1).all()
    )


def test_adamerging_runs_behind_the_registry(context):
    result = METHODS["adamerging"](context, config=AdaMergingConfig(epochs=1, batch_size=100))
    assert result.evaluations == 1 and not result.ranked
    assert set(result.state_dict) == set(context.pool.load(context.pool.names[0]))
    assert 0.0 < context.judge(result.state_dict) <= 1.0


def test_adamerging_refuses_a_pool_past_its_memory_limit(context):
    with pytest.raises(
        RaysoupError,
        match="adamerging holds every ingredient in one evaluator.*adamerging.max_memory_gb",
    ):
        check_memory(context.pool, AdaMergingConfig(max_memory_gb=1e-6))
    check_memory(context.pool, AdaMergingConfig())
