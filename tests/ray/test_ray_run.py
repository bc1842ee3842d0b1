"""ManifoldMix on a real local Ray (2 CPUs, 4 fake GPUs) with the tiny zoo."""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import ray
import torch
from safetensors.torch import load_file

from raysoup.components import partition
from raysoup.config import load_config
from raysoup.distributed.evaluators import EvaluatorSpec, start_evaluators
from raysoup.distributed.tune_search import TuneSearch
from raysoup.errors import RaysoupError
from raysoup.evaluate import VAL
from raysoup.inputs.pool import IngredientPool
from raysoup.inputs.tasks import eval_set_sources
from raysoup.methods import METHODS, SoupContext, ValidationJudge
from raysoup.mixing import lambdas_to_betas, to_numpy
from raysoup.runner import execute
from raysoup.search import LocalSearch, lerp_mixer

from .. import failing_mixer
from ..helpers import assert_measured, own_cache, val_evaluator, write_config


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=2, num_gpus=4, include_dashboard=False, log_to_driver=False)
    # The test helper module travels by value: workers need not import tests/.
    ray.cloudpickle.register_pickle_by_value(failing_mixer)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def uninterrupted(soup_zoo, tmp_path_factory):
    root = tmp_path_factory.mktemp("runA")
    # native numerics: the evaluators compute with this process's kernels, so the plain loop
    # run here makes the same per-image calls (portable ones would differ in the last bits).
    config = load_config(
        write_config(root / "run.toml", soup_zoo, "out", resources={"numerics": "native"})
    )
    with own_cache(root / "cache"):  # it measures every point, as the resumed run must
        report = execute(config)
    return config, report


@pytest.mark.slow
def test_run_writes_fused_model_beta_history_and_tune_folders(uninterrupted):
    config, report = uninterrupted
    out = config.out
    row = report["methods"]["manifold_mix"]
    assert "twin" in row["ingredients"] and len(row["ingredients"]) >= 2
    assert {"val", "id", "ood", "ood_avg", "evaluations", "wall_s", "history"} <= set(row)
    assert assert_measured(row) > 0
    assert (out / "beta.png").read_bytes()[:4] == b"\x89PNG"
    import pyarrow.parquet as pq

    betas = pq.read_table(out / "beta.parquet").to_pylist()
    assert [b["ingredient"] for b in betas] == row["ingredients"]
    history = json.loads((out / "history.json").read_text())
    assert [s["candidate"] for s in history] == [n for n, _ in report["ranking"][1:]]
    # One Tune experiment folder per optimiser pass, under the run directory.
    passes = sum(len(s["passes"]) for s in history)
    assert passes >= 1 and len(list((out / "tune").glob("pass-*"))) == passes
    fused = load_file(out / "fused.safetensors")
    evaluator = val_evaluator(config.pool.zoo)
    assert evaluator.accuracy(fused) == pytest.approx(row["val"])


@pytest.mark.slow
def test_tune_path_makes_the_same_decisions_as_the_plain_loop(uninterrupted):
    config, report = uninterrupted
    pool = IngredientPool.from_zoo(config.pool.zoo)
    evaluator = val_evaluator(config.pool.zoo)
    judge = ValidationJudge(evaluator.accuracy, rows=len(evaluator.sets[VAL][1]))
    components = partition(list(pool.load(pool.names[0])), config.search.components)
    ranking = [tuple(r) for r in report["ranking"]]
    local = METHODS["manifold_mix"](
        SoupContext(pool, judge, ranking, components, LocalSearch(judge, components)),
        config.method_configs()["manifold_mix"],
    )
    tuned = report["methods"]["manifold_mix"]
    assert local.ingredients == tuned["ingredients"]
    assert json.loads(json.dumps(local.details.history)) == tuned["history"]


@pytest.mark.slow
def test_resume_after_killing_the_run_gives_the_identical_result(uninterrupted, soup_zoo, tmp_path):
    config_a, report_a = uninterrupted
    path = write_config(
        tmp_path / "run.toml", soup_zoo, "out", resources={"numerics": "native"}
    )  # as the uninterrupted run
    # Its own cache, and the resumed run another, fresh one: the steps after the
    # checkpoint are measured again, not read back from the uninterrupted run's points.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAYSOUP_CACHE": str(tmp_path / "cache-a")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "raysoup.cli", "run", str(path)],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    state = tmp_path / "out" / "driver" / "manifold_mix" / "state.json"
    deadline = time.time() + 300
    while not state.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole process group: driver and its Ray
    proc.wait()
    assert state.exists(), "the run never checkpointed a step"
    assert not (tmp_path / "out" / "report.json").exists()
    done = json.loads(state.read_text())["state"]["next_candidate"] - 1  # steps checkpointed
    with own_cache(tmp_path / "cache-b"):
        report_b = execute(load_config(path), resume=True)
    a, b = report_a["methods"]["manifold_mix"], report_b["methods"]["manifold_mix"]
    assert a["ingredients"] == b["ingredients"] and a["history"] == b["history"]
    # The recovery happened: it resumed after the checkpointed steps, and measured the rest.
    log = (tmp_path / "out" / "raysoup.log").read_text()
    assert f"[manifold_mix] resuming after step {done}:" in log and report_b["config"]["resumed"]
    assert assert_measured(b, after_step=done) > 0
    fused_a = load_file(config_a.out / "fused.safetensors")
    fused_b = load_file(tmp_path / "out" / "fused.safetensors")
    for k in fused_a:
        assert torch.equal(fused_a[k], fused_b[k]), k


@pytest.mark.slow
def test_a_run_with_baselines_resumes_manifold_mix_from_its_checkpoint(soup_zoo, tmp_path):
    """An interrupted `methods = [greedy_soup, manifold_mix]` run: --resume reruns the
    baseline and continues ManifoldMix after its last saved step instead of starting over."""
    from raysoup.checkpoint import StepCheckpoint, save_ranking
    from raysoup.methods.manifold_mix import MixState
    from raysoup.numerics import describe

    path = write_config(tmp_path / "run.toml", soup_zoo, "out")
    path.write_text("methods = ['greedy_soup', 'manifold_mix']\n" + path.read_text())
    config = load_config(path)
    pool = IngredientPool.from_zoo(soup_zoo)
    ranking = SoupContext.rank(pool, ValidationJudge(val_evaluator(soup_zoo).accuracy)).ranking
    best, acc = ranking[0]
    # A checkpoint after the last candidate: every step done, the best ingredient alone
    # (a fresh run accepts "twin", the exact copy of the best).
    domain = describe(config.resources.numerics, threads=1)  # 0.5 CPU: one thread
    save_ranking(config.out / "driver", ranking, config.fingerprint(), domain)
    state = MixState(pool.load(best), [best], acc, next_candidate=len(ranking))
    StepCheckpoint(config.out / "driver" / "manifold_mix", config.fingerprint(), domain).save(
        state.summary(), state.accumulator, version=1
    )
    with pytest.raises(RaysoupError, match="unfinished run; continue it with --resume"):
        execute(config)
    report = execute(config, resume=True)
    mix = report["methods"]["manifold_mix"]
    assert mix["ingredients"] == [best] and mix["history"] == []
    assert report["methods"]["greedy_soup"]["evaluations"] >= len(pool)
    assert report["config"]["resumed"] is True


def twin_step(report: dict) -> dict:
    """The step that tries the exact copy of the accumulator (soup_zoo's twin, ranked right
    after its original): every point of every pass is the same model."""
    (first, acc0), (second, acc1) = report["ranking"][:2]
    assert "twin" in (first, second) and acc0 == acc1, report["ranking"]
    step = report["methods"]["manifold_mix"]["history"][0]
    assert step["candidate"] == second and step["accepted"]
    assert all(set(p["trace"]) == {step["promise_accuracy"]} for p in step["passes"])
    return step


def without_traces(history: list[dict]) -> list[dict]:
    return [
        {**s, "passes": [{k: v for k, v in p.items() if k != "trace"} for p in s["passes"]]}
        for s in history
    ]


@pytest.mark.slow
def test_phase2_racing_and_the_third_pass_rule_through_the_driver(
    soup_zoo, tmp_path, uninterrupted
):
    """Phase 2, racing and a forced third pass composed in one SoupDriver run on Tune,
    checked against the same run with every point scored in full. RandomSearch asks the
    same points whatever it is told, so racing must make the same decisions; it only
    tells stopped points their paired estimate, never above the pass's best so far."""
    method = {
        "optimizer": "RandomSearch",
        "phase2": True,
        "phase2_evals_per_weight": 1,
        "third_pass_gain": 0.0,
        "racing_chunks": 5,
        "racing_confidence": 0.9,
    }
    rows, reports = {}, {}
    for racing in (True, False):
        root = tmp_path / f"racing-{racing}"
        root.mkdir()
        config = load_config(
            write_config(root / "run.toml", soup_zoo, "out", racing=racing, **method)
        )
        with own_cache(root / "cache"):
            reports[racing] = execute(config)
        rows[racing] = reports[racing]["methods"]["manifold_mix"]
        assert assert_measured(rows[racing]) > 0
    raced, full = rows[True], rows[False]
    ranked = len(reports[True]["ranking"])

    # Racing: points were stopped, and nothing it decided differs from the full run.
    assert raced["stopped_evaluations"] > 0 and "stopped_evaluations" not in full
    assert raced["ingredients"] == full["ingredients"] and raced["betas"] == full["betas"]
    assert without_traces(raced["history"]) == without_traces(full["history"])
    assert {k: v for k, v in raced["phase2"].items() if k != "trace"} == {
        k: v for k, v in full["phase2"].items() if k != "trace"
    }
    passes = [p for s in raced["history"] for p in s["passes"]] + [raced["phase2"]]
    reference = [p for s in full["history"] for p in s["passes"]] + [full["phase2"]]
    differing = 0
    for got, expected in zip(passes, reference):
        for i, (a, b) in enumerate(zip(got["trace"], expected["trace"])):
            if a != b:  # a stopped point: told at most the best so far, truly no better
                differing += 1
                assert a <= max(got["trace"][:i]) and b <= max(got["trace"][:i])
    assert 0 < differing <= raced["stopped_evaluations"]
    fused = [
        load_file(tmp_path / f"racing-{r}" / "out" / "fused.safetensors") for r in (True, False)
    ]
    assert all(torch.equal(fused[0][k], fused[1][k]) for k in fused[1])

    # The third-pass rule: with third_pass_gain = 0 a pass 3 follows every accepted step
    # whose pass 2 did not lose; the twin's passes all tie, so it has three. With the
    # default gain (0.3) a tie is too little: the uninterrupted run's twin step has two.
    for step in raced["history"]:
        if step["accepted"]:
            first, second = step["passes"][:2]
            assert len(step["passes"]) == (3 if second["accuracy"] >= first["accuracy"] else 2)
    assert len(twin_step(reports[True])["passes"]) == 3
    _, default_gain = uninterrupted
    assert default_gain["config"]["manifold_mix"]["third_pass_gain"] == 0.3
    assert len(twin_step(default_gain)["passes"]) == 2

    # Phase 2: its budget, its evaluations in the row's, and its verdict applied.
    phase2 = raced["phase2"]
    assert len(raced["ingredients"]) >= 2  # phase 2 runs only on a mix
    assert phase2["evaluations"] == len(raced["ingredients"]) * len(raced["components"])
    assert raced["evaluations"] == (
        sum(s["evaluations"] for s in raced["history"]) + phase2["evaluations"] + ranked
    )
    phase1 = [s["accuracy"] for s in raced["history"] if s["accepted"]][-1]
    assert phase2["kept"] == (phase2["accuracy"] >= phase1)
    assert raced["val_accuracy"] == (phase2["accuracy"] if phase2["kept"] else phase1)
    assert raced["val"] == pytest.approx(raced["val_accuracy"])
    unrolled = lambdas_to_betas(np.array(raced["lambda_rows"]))
    assert np.allclose(raced["betas"], unrolled) != phase2["kept"]
    np.testing.assert_allclose(np.sum(raced["betas"], axis=0), 1.0)


@pytest.fixture(scope="module")
def pair(tiny_zoo):
    pool = IngredientPool.from_zoo(tiny_zoo)
    a, c = pool.load(pool.names[0]), pool.load(pool.names[1])
    return pool, a, c, partition(list(a), "granularity-1")


@pytest.fixture
def tune_search(pair, tiny_zoo, tmp_path):
    """Builds TuneSearches on fresh evaluator actors, killed after the test."""
    pool, _, _, components = pair
    started = []

    def make(mode="sharded", count=2, gpus=0.0, num_workers=1, **options):
        spec = EvaluatorSpec(count=count, mode=mode, cpus=0.25, gpus=gpus, timeout_s=120)
        actors = start_evaluators(pool.spec, eval_set_sources(tiny_zoo), components, spec)
        search = TuneSearch(actors, spec, num_workers, tmp_path / "tune", **options)
        started.extend([*actors, search.resident])
        return search

    yield make
    for actor in started:
        ray.kill(actor)


def test_a_failing_trial_does_not_hang_a_cobyla_search(pair, tune_search):
    _pool, a, c, components = pair
    search = tune_search()
    search.max_failures = 0
    search.set_models([a, c], failing_mixer.FailAboveHalf())
    signal.alarm(240)  # a deadlock fails the test loudly instead of hanging CI
    try:
        result = search.optimise(np.full(len(components), 0.5), 0.25, 0.75, 10, 0, "Cobyla")
    finally:
        signal.alarm(0)
    assert result.evaluations == 10
    assert 0.0 in result.trace and max(result.trace) > 0.0  # penalised, and real scores
    assert result.accuracy == max(result.trace) and np.all(result.x[0] <= 0.5)


def test_a_pass_whose_every_trial_fails_is_an_error_not_a_result(pair, tune_search):
    _pool, a, c, components = pair
    search = tune_search()
    search.max_failures = 0
    search.set_models([a, c], failing_mixer.FailAboveHalf())
    with pytest.raises(RaysoupError, match="every trial of optimiser pass 1 failed"):
        search.optimise(np.full(len(components), 0.7), 0.6, 0.9, 3, 0, "RandomSearch")


def test_a_crashed_evaluator_is_restarted_and_the_search_unchanged(pair, tmp_path, tune_search):
    _pool, a, c, components = pair
    search = tune_search()
    start = np.full(len(components), 0.5)
    search.set_models([a, c], lerp_mixer)
    fault_free = search.optimise(start, 0.25, 0.75, 6, 0, "Cobyla")

    marker = tmp_path / "crash-once"
    marker.touch()
    search.set_models([a, c], failing_mixer.CrashOnce(str(marker)))
    signal.alarm(240)
    try:
        # The lost call is run again on the restarted actor, also outside Tune (a promise test).
        assert search.accuracy(start) == fault_free.trace[0]
        marker.touch()
        crashed = search.optimise(start, 0.25, 0.75, 6, 0, "Cobyla")
    finally:
        signal.alarm(0)
    assert not marker.exists()  # an evaluator process did die mid-search
    assert restarts(search.actors) == 2  # and Ray restarted it, once per crash
    assert crashed.trace == fault_free.trace and np.array_equal(crashed.x, fault_free.x)


def restarts(actors: list) -> int:
    """How many times Ray restarted these actors, from the GCS's actor table."""
    from ray._private.state import actors as actor_table

    return sum(actor_table(a._actor_id.hex())["NumRestarts"] for a in actors)


@pytest.mark.slow
def test_a_restarted_evaluator_with_other_validation_rows_fails_the_identity_check(
    pair, tiny_zoo, tmp_path
):
    """The check above can fail: the same crash, but the evaluator comes back with other
    validation rows (its file was replaced while it ran; a restart reads it again). A
    wrong recovery changes the search, and the identity check sees it."""
    pool, a, c, components = pair
    sources = eval_set_sources(tiny_zoo)
    val = tmp_path / "val.arrow"
    shutil.copy(sources["val"].location, val)
    sources["val"] = dataclasses.replace(sources["val"], location=str(val), sha256=None)
    spec = EvaluatorSpec(count=2, mode="sharded", cpus=0.25, timeout_s=120)
    actors = start_evaluators(pool.spec, sources, components, spec)
    try:
        search = TuneSearch(actors, spec, 1, tmp_path / "tune")
        start = np.full(len(components), 0.5)
        search.set_models([a, c], lerp_mixer)
        fault_free = search.optimise(start, 0.25, 0.75, 6, 0, "Cobyla")
        shutil.copy(sources["id"].location, val)  # what a restarted evaluator will read
        marker = tmp_path / "crash-once"
        marker.touch()
        search.set_models([a, c], failing_mixer.CrashOnce(str(marker)))
        signal.alarm(240)
        try:
            crashed = search.optimise(start, 0.25, 0.75, 6, 0, "Cobyla")
        finally:
            signal.alarm(0)
        assert not marker.exists() and restarts(actors) == 1
        assert crashed.trace != fault_free.trace
    finally:
        for actor in [*actors, search.resident]:
            ray.kill(actor)


def test_object_store_buffers_are_never_written(pair, tune_search):
    _pool, a, c, components = pair
    search = tune_search()
    search.set_models([a, c], lerp_mixer)
    before = [to_numpy(a), to_numpy(c)]
    search.optimise(np.full(len(components), 0.5), 0.25, 0.75, 6, 0, "NGOpt")
    for ref, original in zip(search.refs[:2], before):
        stored = ray.get(ref)
        for k, v in stored.items():
            assert not v.flags.writeable  # zero-copy view: writing would corrupt the store
            np.testing.assert_array_equal(v, original[k])


def test_a_steps_models_are_released_once_the_next_step_has_run(pair, tune_search):
    """Tune pickles a trainable's parameters out of band, which pins what they refer to for
    the driver's lifetime: were the models among them, every step's resident models would
    stay in the object store (0.9 GB a step at ViT-B/32)."""
    _pool, a, c, components = pair
    search = tune_search()
    start = np.full(len(components), 0.5)
    search.set_models([a, c], lerp_mixer)
    first_step = [ref.hex().encode() for ref in search.refs]
    search.optimise(start, 0.25, 0.75, 3, 0, "NGOpt")
    search.set_models([c, a], lerp_mixer)
    search.optimise(start, 0.25, 0.75, 3, 0, "NGOpt")

    def still_referenced() -> list:
        counts = ray._private.worker.global_worker.core_worker.get_all_reference_counts()
        return [ref for ref in first_step if ref in counts]

    deadline = time.monotonic() + 30  # borrowers report their releases asynchronously
    while still_referenced() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert still_referenced() == []


@pytest.mark.parametrize("mode, count", [("whole", 4), ("sharded", 2)])
def test_k_points_in_flight_make_the_plain_loops_decisions(
    pair, tiny_zoo, tune_search, mode, count
):
    """num_workers = 4: the optimiser sees exactly the asks and tells of the plain loop with
    4 workers (batches of 4 asked, then told in ask order), each batch one Tune trial whose
    points run at once: one per evaluator (one fake GPU each), or each over every shard."""
    _pool, a, c, components = pair
    search = tune_search(mode=mode, count=count, gpus=1.0, num_workers=4)
    search.set_models([a, c], lerp_mixer)
    local = LocalSearch(
        ValidationJudge(val_evaluator(tiny_zoo).accuracy), components, num_workers=4
    )
    local.set_models([a, c], lerp_mixer)
    start = np.full(len(components), 0.5)
    tuned = search.optimise(start, 0.25, 0.75, 14, 0, "TwoPointsDE")
    plain = local.optimise(start, 0.25, 0.75, 14, 0, "TwoPointsDE")
    assert tuned.evaluations == 14 and tuned.optimizer == "TwoPointsDE"
    assert tuned.trace == plain.trace and np.array_equal(tuned.x, plain.x)
    assert all(np.array_equal(p, q) for p, q in zip(tuned.points, plain.points))
    trials = list((search.storage_path / "pass-0001").glob("mixing_trial_*"))
    assert len(trials) == 4  # batches of 4, 4, 4 and 2 points
    assert ray.available_resources().get("GPU", 0) == 4 - count  # one fake GPU each


def test_the_pool_judges_every_set_like_one_evaluator_and_survives_a_crash(pair, tiny_zoo):
    """Report sets sharded over the actors and streamed: the same per-image results, in row
    order, as one in-process evaluator of the whole sets; a killed actor is restarted and
    its rows judged again."""
    from raysoup.distributed.evaluators import EvaluatorPool
    from raysoup.evaluate import Evaluator, load_eval_sets

    pool, a, _, components = pair
    sources = eval_set_sources(tiny_zoo)
    spec = EvaluatorSpec(count=3, mode="sharded", cpus=0.25, timeout_s=120)
    actors = start_evaluators(pool.spec, sources, components, spec)
    try:
        judge = EvaluatorPool(actors, spec, pool.spec, sources)  # no cache: every call judges
        whole = Evaluator(pool.spec, load_eval_sets(sources, pool.spec.num_classes))
        expected = whole.correctness(a)
        got = judge.correctness(a)
        assert list(got) == list(expected)
        for name in expected:
            np.testing.assert_array_equal(got[name], expected[name])
        ray.kill(actors[1], no_restart=False)  # dies; Ray restarts it and retries its call
        again = judge.correctness(a, ["val", "blur"])
        np.testing.assert_array_equal(again["blur"], expected["blur"])
        np.testing.assert_array_equal(again["val"], expected["val"])
    finally:
        for actor in actors:
            ray.kill(actor)


@pytest.mark.slow
def test_no_model_is_built_outside_the_evaluators(soup_zoo, tmp_path):
    """A whole run with every method, reported ingredients and the pretrained reference,
    in a process where building a model anywhere but in an evaluator actor raises."""
    from raysoup.inputs.model import EVALUATORS_ONLY

    path = write_config(tmp_path / "run.toml", soup_zoo, "out")
    path.write_text(
        f"methods = {sorted(METHODS)}\nreport_ingredients = true\n"
        + path.read_text()
        + "[task_arithmetic]\nbudget = 3\nsearch_dare = true\n"
        "[ties_merging]\nbudget = 3\ndare = 0.2\n[tsv_merge]\nbudget = 3\n"
        "[iso_c]\nbudget = 3\n[iso_cts]\nbudget = 3\n[learned_soup]\nepochs = 1\n"
        "[regmean]\nbudget = 3\n[adamerging]\nepochs = 1\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", EVALUATORS_ONLY: "1"}
    build = (
        "from raysoup.inputs.model import build_classifier, ModelSpec; "
        "build_classifier(ModelSpec())"
    )
    probe = subprocess.run(
        [sys.executable, "-c", build], env=env, capture_output=True, text=True, check=False
    )
    assert probe.returncode != 0 and "outside the evaluator actors" in probe.stderr
    done = subprocess.run(
        [sys.executable, "-m", "raysoup.cli", "run", str(path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert set(report["methods"]) == set(METHODS)
    assert all(
        report["methods"][m]["evaluations"] == 3
        for m in ("task_arithmetic", "ties_merging", "tsv_merge", "iso_c", "iso_cts")
    )
    assert set(report["methods"]["task_arithmetic"]["knobs"]) == {"lambda", "dare"}
    assert report["methods"]["ties_merging"]["config"]["dare"] == 0.2
    assert set(report["methods"]["tsv_merge"]["knobs"]) == {"alpha"}
    # one Fisher pass over val per ingredient, on the evaluators
    assert report["methods"]["fisher_merging"]["evaluations"] == len(report["ranking"])
    assert report["methods"]["learned_soup"]["betas"]
    # RegMean: a Gram pass over val per ingredient, then its search; AdaMerging: 1 epoch
    assert report["methods"]["regmean"]["evaluations"] == len(report["ranking"]) + 3
    assert set(report["methods"]["regmean"]["knobs"]) == {"alpha"}
    assert report["methods"]["adamerging"]["evaluations"] == 1
    assert all(0 <= x <= 1 for row in report["methods"]["adamerging"]["lambdas"] for x in row)
    assert all(
        r["vs"]["best_individual"]["val"]["p"] is not None
        for n, r in report["methods"].items()
        if n != "best_individual"
    )
    assert report["references"]["pretrained"]["ood_avg"] is not None
    assert all(r["id"] is not None for r in report["ingredients"].values())


@pytest.mark.parametrize(
    "resources, message",
    [
        (
            {"eval_timeout_s": 0.001},
            (
                r"judging a model on \['val'\] took longer than "
                r"resources.eval_timeout_s = 0.001 s"
            ),
        ),
        ({"evaluators": 64}, r"64 evaluator\(s\) need 32 CPU and 0 GPU, but the cluster has 2 CPU"),
    ],
)
def test_a_run_the_cluster_cannot_serve_fails_with_one_line(soup_zoo, tmp_path, resources, message):
    """An evaluation slower than the timeout in the ranking (no Tune retry there), and more
    evaluators than the cluster holds. The zoo gets an ingredient no test judged before, so
    its ranking is not in the judgement cache."""
    import shutil

    from raysoup.inputs.weights import load_state_dict, save_state_dict

    zoo = tmp_path / "zoo"
    shutil.copytree(soup_zoo, zoo)
    manifest = json.loads((zoo / "manifest.json").read_text())
    state = load_state_dict(zoo / "ingredients" / "ft-00.safetensors")
    state["classification_head.bias"] = state["classification_head.bias"] + 1e-3
    save_state_dict(state, zoo / "ingredients" / "new.safetensors")
    manifest["ingredients"].append({"name": "new", "file": "ingredients/new.safetensors"})
    (zoo / "manifest.json").write_text(json.dumps(manifest))
    config = load_config(write_config(tmp_path / "run.toml", zoo, "out", resources))
    with pytest.raises(RaysoupError, match=message):
        execute(config)
    assert not (tmp_path / "out" / "report.json").exists()


def test_a_measured_point_is_read_back_not_evaluated_again(pair, tune_search, tmp_path):
    """The promise point is pass 1's start: the pass reads it from the point cache (the
    history still lists it, with the same accuracy), and a rerun of the same pass reads
    every point and makes the same decisions."""
    _pool, a, c, components = pair
    search = tune_search(cache_root=tmp_path / "points", val_key="tiny-val")
    search.set_models([a, c], lerp_mixer)
    start = np.full(len(components), 0.5)
    promise = search.accuracy(start)
    first = search.optimise(start, 0.25, 0.75, 5, 0, "Cobyla")
    assert np.array_equal(first.points[0], start) and first.trace[0] == promise
    assert search.cached_points == 1
    again = search.optimise(start, 0.25, 0.75, 5, 0, "Cobyla")
    assert search.cached_points == 1 + 5
    assert again.trace == first.trace and np.array_equal(again.x, first.x)
    search.set_models([c, a], lerp_mixer)  # other resident models: nothing is reused
    search.accuracy(start)
    assert search.cached_points == 6 and search.cache.scope != ""


def test_racing_stops_hopeless_points_and_keeps_the_pass_best(pair, tiny_zoo, tune_search):
    """RandomSearch asks the same points whatever it is told, so a raced pass and a full
    one see the same points: the same best point and accuracy, every point evaluated to
    the end scored exactly, every stopped one told at most the best so far (and truly no
    better than it), with fewer validation forwards."""
    from raysoup.distributed.racing import Racing

    _pool, a, c, components = pair
    local = LocalSearch(ValidationJudge(val_evaluator(tiny_zoo).accuracy), components)
    local.set_models([a, c], lerp_mixer)
    start = np.full(len(components), 0.5)
    full = tune_search()
    full.set_models([a, c], lerp_mixer)
    expected = full.optimise(start, 0.0, 1.0, 16, 0, "RandomSearch")
    raced = tune_search(racing=Racing(chunks=5, confidence=0.9))
    raced.set_models([a, c], lerp_mixer)
    got = raced.optimise(start, 0.0, 1.0, 16, 0, "RandomSearch")
    assert all(np.array_equal(p, q) for p, q in zip(got.points, expected.points))
    assert np.array_equal(got.x, expected.x) and got.accuracy == expected.accuracy
    assert full.forwards == 16 * full.val_rows == 16 * 500
    assert 0 < raced.stopped_points and raced.forwards < full.forwards
    stopped = [i for i, (p, q) in enumerate(zip(got.trace, expected.trace)) if p != q]
    assert len(stopped) == raced.stopped_points
    for i in stopped:
        best_before = max(got.trace[:i])
        assert got.trace[i] <= best_before and expected.trace[i] <= best_before
    with pytest.raises(RaysoupError, match="racing scores one point at a time"):
        tune_search(num_workers=2, racing=Racing(chunks=5, confidence=0.9))
