"""`raysoup demo`: build (or reuse) the zoo, run every method, report."""

from __future__ import annotations

import hashlib
import json
import os
import time
from datetime import datetime
from pathlib import Path

from .evaluate import VAL, Evaluator, load_eval_sets
from .errors import RaysoupError
from .methods import METHODS, SoupContext, ValidationJudge
from . import storage
from .pool import IngredientPool, load_state_dict, read_manifest
from .report import format_table, write_report
from .config import PoolConfig, RunConfig
from .methods.manifold_mix import ManifoldMixConfig
from .run import connect, manifold_mix_row, prepare, run_manifold_mix
from .zoo import QUICK_ZOO, ZooConfig, build_zoo, eval_set_files

DEMO_METHODS = ("best_individual", "uniform_soup", "greedy_soup", "manifold_mix")
# The demo's reduced ManifoldMix budget (the reference spends 30 per component per pass).
DEMO_EVALS_PER_COMPONENT = 10
QUICK_EVALS_PER_COMPONENT = 4


def cache_dir() -> Path:
    return Path(os.environ.get("RAYSOUP_CACHE", Path.home() / ".cache" / "raysoup"))


def default_zoo_dir(config: ZooConfig) -> Path:
    digest = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode()).hexdigest()
    return cache_dir() / f"zoo-{digest[:12]}"


def fresh_run_dir(out: Path | None) -> Path:
    if out is None:
        out = Path("runs") / datetime.now().strftime("demo-%Y%m%d-%H%M%S")
    out = Path(out)
    if (out / "report.json").exists():
        raise RaysoupError(f"{out} already holds a report; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    return out


def demo_zoo(quick: bool = False, zoo_dir: Path | None = None, log=print) -> Path:
    """The demo's zoo (the quick one with `quick`), built on first use and cached."""
    config = QUICK_ZOO if quick else ZooConfig()
    zoo_dir = Path(zoo_dir) if zoo_dir else default_zoo_dir(config)
    if (zoo_dir / "manifest.json").is_file():
        log(f"[zoo] using {zoo_dir}")
    else:
        log(f"[zoo] building in {zoo_dir} (cached for later runs)")
        build_zoo(zoo_dir, config, log=log)
    return zoo_dir


def run_demo(out: Path | None = None, quick: bool = False, zoo_dir: Path | None = None,
             log=print) -> dict:
    zoo_dir = demo_zoo(quick, zoo_dir, log)
    budget = QUICK_EVALS_PER_COMPONENT if quick else DEMO_EVALS_PER_COMPONENT
    return run_methods(zoo_dir, fresh_run_dir(out), DEMO_METHODS, {"quick": quick}, log,
                       ManifoldMixConfig(evals_per_component=budget))


def run_methods(zoo_dir: Path, run_dir: Path, methods: tuple[str, ...], config: dict,
                log=print, mix_config: ManifoldMixConfig = ManifoldMixConfig()) -> dict:
    """Validate everything, then run each method and write the report into run_dir.

    The baselines run in this process; manifold_mix runs on Ray (a local cluster unless
    one is already connected), like `raysoup run`.
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise RaysoupError(f"unknown method(s) {unknown}; known: {sorted(METHODS)}")
    manifest = read_manifest(zoo_dir)
    mix_run = None
    if "manifold_mix" in methods:  # its preparation validates the pool too
        mix_run = prepare(RunConfig(PoolConfig(str(zoo_dir)), run_dir, mix_config), resume=False)
        pool = mix_run.pool
    else:
        pool = IngredientPool.from_zoo(zoo_dir)
        pool.validate()
    evaluator = Evaluator(pool.spec, load_eval_sets(eval_set_files(zoo_dir),
                                                    pool.spec.num_classes))
    if VAL not in evaluator.set_names:
        raise RaysoupError(f"zoo {zoo_dir} has no '{VAL}' evaluation set")

    judge = ValidationJudge(lambda sd: evaluator.accuracy(sd, VAL))
    t0 = time.perf_counter()
    ctx = SoupContext.rank(pool, judge)
    ranking_s = time.perf_counter() - t0
    log("[demo] ranking on val: " + ", ".join(f"{n} {100 * a:.2f}" for n, a in ctx.ranking))

    ingredients = {n: {**evaluator.report(pool.load(n)), "ingredients": [n]} for n in pool.names}
    references = {"pretrained": evaluator.report(load_state_dict(
        storage.within(storage.resolve(zoo_dir), manifest["pretrained"]["file"], "pretrained")))}
    rows = {}
    for name in methods:
        t0 = time.perf_counter()
        if name == "manifold_mix":
            connect(None)
            result = run_manifold_mix(mix_run, ranking=ctx.ranking, log=log)
            rows[name] = manifold_mix_row(mix_run, result, evaluator,
                                          time.perf_counter() - t0 + ranking_s, ranked_here=True)
            continue
        result = METHODS[name](ctx)
        wall = time.perf_counter() - t0
        if result.ranked:
            wall += ranking_s
        rows[name] = {**evaluator.report(result.state_dict), "ingredients": result.ingredients,
                      "evaluations": result.evaluations + (len(pool) if result.ranked else 0),
                      "wall_s": round(wall, 2), **result.details}
        log(f"[demo] {name}: val {100 * rows[name]['val']:.2f}, "
            f"{len(result.ingredients)} ingredient(s)")

    report = {"methods": rows, "ingredients": ingredients, "references": references,
              "zoo": {"dir": str(zoo_dir), "config": manifest["config"],
                      "build_seconds": manifest.get("build_seconds")},
              "config": {**config, "manifold_mix": mix_config.to_dict()}}
    write_report(run_dir, report)
    log(format_table(rows))
    log(f"[demo] wrote {run_dir}/report.json, results.parquet, scatter.png" +
        (", beta.parquet, beta.png, history.json, fused.safetensors" if mix_run else ""))
    return report
