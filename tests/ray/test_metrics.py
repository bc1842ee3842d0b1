"""The user's metric (raysoup.metrics): scores in [0, 1] per example through the evaluator,
the paired statistics (McNemar only for 0/1 scores), the caches' keys, and bad metrics
refused in one line before any cluster work."""

import json

import numpy as np
import pytest
import torch

from raysoup.cache import set_key
from raysoup.config import load_config
from raysoup.errors import RaysoupError
from raysoup.evaluate import VAL, Evaluator, load_eval_sets
from raysoup.inputs.pool import IngredientPool
from raysoup.inputs.tasks import eval_set_sources
from raysoup.metrics import load_metric
from raysoup.preflight import validate_run
from raysoup.stats import compare, paired

from .. import user_metrics
from ..helpers import write_config


def test_soft_scores_are_the_true_class_probability(tiny_zoo):
    pool = IngredientPool.from_zoo(tiny_zoo)
    sets = load_eval_sets({VAL: eval_set_sources(tiny_zoo)[VAL]}, pool.spec.num_classes)
    weights = pool.load(pool.names[0])
    plain = Evaluator(pool.spec, sets, batch_size=64)
    soft = Evaluator(
        pool.spec,
        sets,
        batch_size=64,
        metric=load_metric("tests.user_metrics:soft", pool.spec.num_classes),
    )
    scores = soft.correctness(weights)[VAL]
    plain.load(weights)
    inputs, labels, _ = plain.sets[VAL]
    with torch.no_grad():
        expected = plain.logits(inputs).softmax(1)[torch.arange(len(labels)), labels]
    np.testing.assert_allclose(scores, expected.numpy(), rtol=1e-6)
    assert scores.dtype == np.float64 and not np.isin(scores, (0, 1)).all()
    assert soft.accuracy(weights) == pytest.approx(scores.mean())
    assert soft.correct(VAL)[0] == pytest.approx(scores.sum())
    # Another metric is another judgement: the cache keys differ, top-1's are as before.
    assert soft.set_keys[VAL] != plain.set_keys[VAL]
    assert plain.set_keys[VAL] == set_key(
        sets[0].sha256, pool.spec, None, False, plain_domain(plain)
    )


def plain_domain(evaluator):
    from raysoup.numerics import describe

    return describe("native", torch.get_num_threads(), str(evaluator.device))


def test_a_binary_metric_keeps_mcnemar_and_soft_scores_get_the_bootstrap_alone():
    rng = np.random.default_rng(0)
    a, b = rng.random(300), rng.random(300) * 0.8
    soft = paired([a], [b])
    assert soft["p"] is None and soft["lo"] <= soft["diff"] <= soft["hi"]
    assert soft["diff"] == pytest.approx(a.mean() - b.mean())
    hits_a, hits_b = a > 0.5, b > 0.5
    as_bool = paired([hits_a], [hits_b])
    as_float = paired([hits_a.astype(np.float64)], [hits_b.astype(np.float64)])
    assert as_bool == as_float and as_bool["p"] is not None  # 0/1 scores: McNemar
    assert compare({"val": a, "x": a}, {"val": b, "x": b}, ["x"])["ood_avg"]["p"] is None


@pytest.mark.parametrize(
    "name, message",
    [
        ("tests.user_metrics", r'write it as "package.module:function"'),
        ("tests.no_such_module:soft", r"cannot import it \(No module named 'tests.no_such_module'"),
        ("tests.user_metrics:nothing", "cannot import it"),
        ("tests.user_metrics:NOT_A_FUNCTION", "is a ndarray, not a function"),
        ("tests.user_metrics:one_per_class", r"returned shape \(8, 10\) for a batch of 8"),
        (
            "tests.user_metrics:logit_of_label",
            (
                r"returned a score of -?\d.* \(scores must lie in "
                r"\[0, 1\]\)"
            ),
        ),
        ("tests.user_metrics:raises", r"fails on a batch of 8 logits \(ValueError: a bug"),
    ],
)
def test_a_bad_metric_is_one_line_before_ray(tiny_zoo, tmp_path, name, message, monkeypatch):
    import ray

    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("ray started"))
    path = write_config(tmp_path / "run.toml", tiny_zoo, "out")
    path.write_text(f'metric = "{name}"\n' + path.read_text())
    with pytest.raises(RaysoupError, match=message) as e:
        validate_run(load_config(path), resume=False)
    assert "\n" not in str(e.value) and str(e.value).startswith(f"{path}: metric ")


def test_racing_refuses_a_soft_metric_and_takes_a_binary_one(tiny_zoo, tmp_path):
    path = write_config(tmp_path / "run.toml", tiny_zoo, "out", racing=True)
    text = path.read_text()
    path.write_text('metric = "tests.user_metrics:soft"\n' + text)
    with pytest.raises(
        RaysoupError,
        match=r"search.racing compares points on right/wrong "
        r"answers; metric = 'tests.user_metrics:soft'",
    ):
        validate_run(load_config(path), resume=False)
    path.write_text('metric = "tests.user_metrics:top2"\n' + text)
    assert validate_run(load_config(path), resume=False).metric.binary


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.cloudpickle.register_pickle_by_value(user_metrics)  # workers need not import tests/
    yield
    ray.shutdown()


def _run(tmp_path, zoo, metric, out, methods):
    from raysoup.runner import execute

    path = write_config(
        tmp_path / f"{out}.toml", zoo, out, components="whole-model", later_passes=False
    )
    path.write_text(f'metric = "{metric}"\nmethods = {json.dumps(methods)}\n' + path.read_text())
    return execute(load_config(path))


@pytest.mark.slow
def test_a_soft_metric_runs_whole_and_reports_the_bootstrap_alone(tiny_zoo, tmp_path, local_ray):
    import pyarrow.parquet as pq

    from raysoup.api import load_report

    report = _run(
        tmp_path,
        tiny_zoo,
        "tests.user_metrics:soft",
        "soft",
        ["manifold_mix", "best_individual", "uniform_soup", "greedy_soup"],
    )
    rows = report["methods"]
    for row in rows.values():
        assert 0 < row["val"] < 1
        for c in row["vs"].values():
            assert all(x["p"] is None for x in c.values())
    table = pq.read_table(tmp_path / "soft/correctness.parquet").to_pylist()
    scores = {(r["name"], r["set"]): np.array(r["score"]) for r in table}
    assert rows["uniform_soup"]["val"] == pytest.approx(scores["uniform_soup", VAL].mean())
    c = rows["uniform_soup"]["vs"]["greedy_soup"]["val"]
    assert c["diff"] == pytest.approx(
        scores["uniform_soup", VAL].mean() - scores["greedy_soup", VAL].mean()
    )
    printed = load_report(tmp_path / "soft").table()
    assert "mean tests.user_metrics:soft scores in %" in printed
    assert "McNemar does not apply" in printed
    # The binary metric: McNemar's p-values, booleans in correctness.parquet.
    report = _run(
        tmp_path,
        tiny_zoo,
        "tests.user_metrics:top2",
        "top2",
        ["best_individual", "uniform_soup", "greedy_soup"],
    )
    assert all(
        x["p"] is not None
        for row in report["methods"].values()
        for c in row["vs"].values()
        for x in c.values()
    )
    assert "correct" in pq.read_table(tmp_path / "top2/correctness.parquet").column_names
    assert "McNemar does not apply" not in load_report(tmp_path / "top2").table()
