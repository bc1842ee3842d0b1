"""`raysoup run` (and `demo`, `bench`): one run path. Validate everything, join or start
Ray, start the evaluator pool, let a SoupDriver actor rank the ingredients and run every
method of the config, judge them all on every evaluation set, write one report.

Data flow: checkpoints (disk) -> SoupDriver actor (sequential state; a resumable method
checkpoints its steps) -> evaluator actors (model + validation shard resident,
report sets streamed; weights from the object store) for every forward pass: the ranking,
the baselines' validation judgements, one Tune run per optimiser pass (trials = mixing
points), and the final judgement of every model on every set -> report (val decides; id
and ood only report).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from .cache import cache_location
from .config import RunConfig
from .console import file_logging
from .distributed.driver import SoupDriver, connect
from .distributed.evaluators import EvaluatorSpec, start_evaluators
from .errors import RaysoupError
from .inputs.pool import read_manifest
from .inputs.tasks import dataset_records
from .methods import METHOD_INFO
from .metrics import Metric
from .numerics import runtime_env
from .preflight import validate_run
from .report import format_table, write_report
from .rundir import RunDir

logger = logging.getLogger(__name__)


def evaluator_spec(config: RunConfig, metric: Metric | None = None) -> EvaluatorSpec:
    """One evaluator per GPU, else per CPU slot; sharded for one trial at a time."""
    r = config.resources
    total = ray.cluster_resources()
    has_gpus = total.get("GPU", 0) >= 1
    gpus = r.gpus_per_evaluator if r.gpus_per_evaluator >= 0 else (1.0 if has_gpus else 0.0)
    count = r.evaluators or max(
        1,
        int(
            total.get("GPU", 0) // gpus if gpus > 0 else total.get("CPU", 1) // r.cpus_per_evaluator
        ),
    )
    need = {"CPU": count * r.cpus_per_evaluator, "GPU": count * gpus}
    short = {k: v for k, v in need.items() if v > total.get(k, 0) + 1e-9}
    if short and not r.wait_for_autoscaler:
        raise RaysoupError(
            f"{count} evaluator(s) need {need['CPU']:g} CPU and {need['GPU']:g} GPU, but the "
            f"cluster has {total.get('CPU', 0):g} CPU and {total.get('GPU', 0):g} GPU; lower "
            f"resources.evaluators / cpus_per_evaluator / gpus_per_evaluator, or set "
            f"resources.wait_for_autoscaler = true on an autoscaling cluster"
        )
    mode = r.evaluation
    if mode == "auto":
        mode = "sharded" if config.search.num_workers == 1 else "whole"
    return EvaluatorSpec(
        count=count,
        mode=mode,
        cpus=r.cpus_per_evaluator,
        gpus=gpus,
        autocast_bf16=r.bf16,
        timeout_s=r.eval_timeout_s,
        numerics=r.numerics,
        metric=metric,
    )


def redraw(run_dir: Path, report: dict) -> list[Path]:
    """`raysoup report`: a finished run's figures drawn again into `run_dir` from its
    report.json (`report`, as read): the scatter plot and each method's own."""
    from .report import draw_scatter

    drawn = [run_dir / "scatter.png"] if draw_scatter(report, run_dir / "scatter.png") else []
    for name, row in report["methods"].items():
        write = METHOD_INFO[name].write if name in METHOD_INFO else None
        if write is not None:
            drawn += [run_dir / f for f in write(run_dir, row, None)]
    return drawn


def execute(
    config: RunConfig, resume: bool = False, address: str | None = None, extra: dict | None = None
) -> dict:
    """The run: every method of `config.methods` on one shared ranking, every forward pass
    on the evaluator actors; the report into config.out. With `resume`, manifold_mix
    continues from its last checkpointed step; the other methods, which checkpoint
    nothing, run again (deterministically)."""
    prepared = validate_run(config, resume)
    run_dir = RunDir.open(config.out, resume)  # a URI `out`: a local staging folder
    config = replace(config, out=run_dir.local)
    prepared = replace(prepared, config=config)
    out, cache = config.out, cache_location(config.cache)
    file_logging(out)
    connect(address)
    evaluators = evaluator_spec(config, prepared.metric)
    logger.info(
        f"[run] {evaluators.count} evaluator(s), {evaluators.mode} evaluation, "
        f"{len(prepared.components)} components, methods {', '.join(config.methods)}"
    )
    actors = start_evaluators(
        prepared.pool.spec,
        prepared.eval_sources,
        prepared.components,
        evaluators,
        config.resources.start_timeout_s,
    )
    # On this node: the driver writes its step checkpoints and Tune folders under `out`,
    # which must be where this process (and a later --resume) can read them.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    console = [
        h
        for h in logging.getLogger("raysoup").handlers
        if getattr(h, "raysoup_tag", "") == "console"
    ]
    driver = SoupDriver.options(
        scheduling_strategy=here, runtime_env=runtime_env(evaluators.numerics)
    ).remote(
        prepared, evaluators, actors, cache, console[0].level if console else logging.INFO, run_dir
    )
    try:
        result = ray.get(driver.run.remote())
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, RaysoupError):  # one clear line, not the remote traceback
            raise e.cause from None
        raise
    finally:
        for actor in [driver, *actors]:
            ray.kill(actor)
    run_dir = result["run_dir"]  # with the record of what the driver uploaded
    manifest = read_manifest(config.pool.zoo)
    report = {
        "methods": result["methods"],
        "ingredients": result["ingredients"],
        "cache": result["cache"],
        "references": result["references"],
        "ranking": result["ranking"],
        "zoo": {
            "dir": str(config.pool.zoo),
            "config": manifest.get("config"),
            "build_seconds": manifest.get("build_seconds"),
        },
        "data": dataset_records(prepared.eval_sources),
        "config": {
            **(extra or {}),
            "source": config.source and str(config.source),
            "resumed": resume,
            "methods": list(config.methods),
            "report_ingredients": config.report_ingredients,
            "metric": config.metric,
            "pool": str(config.pool.zoo),
            "search": config.search.to_dict(),
            **{name: c.to_dict() for name, c in config.method_configs().items()},
            "tracking": config.tracking.to_dict(),
            "evaluators": evaluators.count,
            "evaluation": evaluators.mode,
            "numerics": result["numerics"],
        },
    }
    write_report(out, report, result["correctness"])
    logger.info(format_table(report["methods"], report["references"], config.metric))
    counts = result["cache"]
    logger.info(
        f"[run] from the cache ({cache}): {counts['points_cached']} mixing "
        f"point(s) and {counts['judgements_cached']} of "
        f"{counts['judgements_cached'] + counts['judgements_measured']} judgements "
        f"(model x set); clear it to measure everything again"
    )
    written = [
        "report.json",
        "results.parquet",
        "correctness.parquet",
        "scatter.png",
        *result["written"],
    ]
    written = [f for f in written if (out / f).exists()]
    logger.info(f"[run] wrote {run_dir.remote or out}: " + ", ".join(written))
    run_dir.finish()
    return report
