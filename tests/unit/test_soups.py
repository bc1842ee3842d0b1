"""Evaluator and baselines on a real tiny zoo."""

import json
import shutil

import pytest
import torch

from raysoup.evaluate import VAL, Evaluator, load_eval_sets
from raysoup.inputs.pool import Ingredient, IngredientPool
from raysoup.inputs.tasks import eval_set_sources
from raysoup.methods import METHODS, SoupContext, ValidationJudge
from raysoup.methods.baselines import GreedySoupConfig
from raysoup.mixing import average

from ..helpers import MemoryPool


@pytest.fixture(scope="module")
def evaluator(tiny_zoo):
    pool = IngredientPool.from_zoo(tiny_zoo)
    return Evaluator(
        pool.spec, load_eval_sets(eval_set_sources(tiny_zoo), pool.spec.num_classes), batch_size=128
    )


@pytest.fixture(scope="module")
def ctx(tiny_zoo, evaluator):
    pool = IngredientPool.from_zoo(tiny_zoo)
    return SoupContext.rank(pool, ValidationJudge(lambda sd: evaluator.accuracy(sd, VAL)))


def test_evaluator_matches_a_plain_forward_pass_and_reuses_its_model(tiny_zoo, evaluator):
    pool = IngredientPool.from_zoo(tiny_zoo)
    sd = pool.load(pool.names[0])
    model = evaluator.model
    acc = evaluator.accuracy(sd, "id")
    assert evaluator.model is model
    images, labels, _ = evaluator.sets["id"]
    with torch.no_grad():
        manual = (model(images).argmax(1) == labels).float().mean().item()
    assert acc == pytest.approx(manual)
    other = pool.load(pool.names[1])
    evaluator.accuracy(other, "id")
    assert torch.equal(model.classification_head.weight, other["classification_head.weight"])
    assert evaluator.accuracy(sd, "id") == acc  # deterministic


def test_report_has_every_set(tiny_zoo, evaluator):
    pool = IngredientPool.from_zoo(tiny_zoo)
    row = evaluator.report(pool.load(pool.names[0]))
    assert set(row) == {"val", "id", "ood", "ood_avg"}
    assert len(row["ood"]) >= 5
    assert row["ood_avg"] == pytest.approx(sum(row["ood"].values()) / len(row["ood"]))


def test_zoo_manifest_records_what_it_built(tiny_zoo):
    manifest = json.loads((tiny_zoo / "manifest.json").read_text())
    assert len(manifest["ingredients"]) == 4
    for ing in manifest["ingredients"]:
        assert (tiny_zoo / ing["file"]).suffix == ".safetensors"
        assert len(ing["sha256"]) == 64 and 0 <= ing["val_acc"] <= 1
        assert {"lr", "weight_decay", "label_smoothing", "epochs", "augment", "seed"} <= set(
            ing["hyperparameters"]
        )
    lrs = {ing["hyperparameters"]["lr"] for ing in manifest["ingredients"]}
    assert len(lrs) == 4  # drawn at random per ingredient


def test_ranking_is_sorted_by_val(ctx):
    accs = [a for _, a in ctx.ranking]
    assert accs == sorted(accs, reverse=True)


def test_best_individual_is_the_top_of_the_ranking(ctx):
    result = METHODS["best_individual"](ctx)
    assert result.ingredients == [ctx.ranking[0][0]]


def test_uniform_soup_is_the_plain_average(ctx):
    result = METHODS["uniform_soup"](ctx)
    expected = average(ctx.pool.load(n) for n in ctx.pool.names)
    assert all(torch.equal(result.state_dict[k], expected[k]) for k in expected)
    assert result.ingredients == ctx.pool.names and not result.ranked


def test_greedy_soup_accepts_only_what_does_not_hurt_val(ctx, evaluator):
    result = METHODS["greedy_soup"](ctx)
    assert result.ingredients[0] == ctx.ranking[0][0]
    assert result.evaluations == len(ctx.ranking) - 1
    assert evaluator.accuracy(result.state_dict, VAL) >= ctx.ranking[0][1]


def test_greedy_tie_rule(tiny_zoo, tmp_path, evaluator):
    """A copy of the best ingredient ties on val: >= (paper) adds it, > (code) does not."""
    pool = IngredientPool.from_zoo(tiny_zoo)
    judge = ValidationJudge(lambda sd: evaluator.accuracy(sd, VAL))
    best = SoupContext.rank(pool, judge).ranking[0][0]
    copy = tmp_path / "copy.safetensors"
    shutil.copy(pool.ingredients[best].path, copy)
    twins = IngredientPool(pool.spec, [pool.ingredients[best], Ingredient("copy", copy)])
    ctx = SoupContext.rank(twins, judge)
    accepted = METHODS["greedy_soup"](ctx)
    assert accepted.ingredients == [best, "copy"]
    strict = METHODS["greedy_soup"](ctx, config=GreedySoupConfig(strict=True))
    assert strict.ingredients == [best]
    for result in (accepted, strict):  # both verdicts were a tie, and say so
        assert [step["closeness"] for step in result.details.history] == ["tie"]
        assert result.details.close_decisions == {"tie": 1, "one image": 0}


def test_judgements_are_cached_by_weights_and_set_content(tiny_zoo, tmp_path):
    from raysoup.cache import JudgementCache

    pool = IngredientPool.from_zoo(tiny_zoo)
    sets = load_eval_sets(eval_set_sources(tiny_zoo), pool.spec.num_classes)
    assert all(s.sha256 for s in sets)  # the zoo records every set's fingerprint

    def counted() -> tuple[Evaluator, list]:
        ev = Evaluator(pool.spec, sets, batch_size=128, cache=JudgementCache(tmp_path))
        calls = []
        ev.model.register_forward_hook(lambda *_: calls.append(1))  # real forward passes
        return ev, calls

    first, calls = counted()
    sd = pool.load(pool.names[0])
    hits = first.correctness(sd)
    assert len(calls) > 0
    again, calls = counted()  # a later run: a fresh evaluator, the same cache folder
    assert all((again.correctness(sd)[n] == hits[n]).all() for n in hits)
    assert calls == []
    assert again.accuracy(sd, VAL) == hits[VAL].mean()
    assert calls == []
    other = pool.load(pool.names[1])
    again.accuracy(other, VAL)
    assert len(calls) > 0  # other weights: judged
    calls.clear()
    for torn in tmp_path.rglob("*.npy"):
        torn.write_bytes(b"torn")
    assert (again.correctness(sd)[VAL] == hits[VAL]).all() and len(calls) > 0


# Hand-worked: weights are one number, val accuracy a table of the soups it may meet.
GREEDY_POOL = {"a": 0.0, "b": 1.0, "c": 4.0, "d": 10.0}  # pool order a, b, c, d
GREEDY_VAL = {
    0.0: 0.5,
    1.0: 0.8,
    4.0: 0.8,
    10.0: 0.6,  # b and c tie on val
    2.5: 0.7,
    5.5: 0.85,
    round(11 / 3, 6): 0.8,  # b+c, b+d, b+d+a
    7.0: 0.75,
    2.0: 0.8,
}  # c+d, c+a


@pytest.mark.parametrize(
    "config, ingredients, soup",
    [
        # ranking b, c, d, a: b+c 0.7 no, b+d 0.85 yes, b+d+a 0.8 no
        (GreedySoupConfig(), ["b", "d"], 5.5),
        (GreedySoupConfig(strict=True), ["b", "d"], 5.5),
        # model soups code's order c, b, d, a: c+b 0.7 no, c+d 0.75 no, c+a 0.8 ties c: >= adds it
        (GreedySoupConfig(rank_ties="reverse"), ["c", "a"], 2.0),
        (GreedySoupConfig(rank_ties="reverse", strict=True), ["c"], 4.0),
    ],
)
def test_greedy_rank_ties_and_strict_on_a_hand_worked_pool(config, ingredients, soup):
    pool = MemoryPool(
        {n: {"w": torch.tensor([w], dtype=torch.float64)} for n, w in GREEDY_POOL.items()}
    )
    judge = ValidationJudge(lambda sd: GREEDY_VAL[round(float(sd["w"]), 6)])
    ctx = SoupContext.rank(pool, judge)
    assert [n for n, _ in ctx.ranking] == ["b", "c", "d", "a"]  # the shared ranking
    result = METHODS["greedy_soup"](ctx, config=config)
    assert result.ingredients == ingredients and result.evaluations == 3
    assert float(result.state_dict["w"]) == pytest.approx(soup)
