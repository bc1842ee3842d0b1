"""`raysoup run` (and `demo`, `bench`): one run path. Validate everything, join or start
Ray, start the evaluator pool, let a SoupDriver actor rank the ingredients and run every
method of the config, judge them all on every evaluation set, write one report.

Data flow: checkpoints (disk) -> SoupDriver actor (sequential state, a step checkpoint
after every ManifoldMix candidate) -> evaluator actors (model + validation shard resident,
report sets streamed; weights from the object store) for every forward pass: the ranking,
the baselines' validation judgements, one Tune run per optimiser pass (trials = mixing
points), and the final judgement of every model on every set -> report (val decides; id
and ood only report).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from .cache import cache_location
from .checkpoint import saved_state
from .components import Components, partition, unused_keys
from .config import RunConfig
from .console import file_logging
from .distributed.driver import SoupDriver, connect
from .distributed.evaluators import EvaluatorSpec, start_evaluators
from .errors import RaysoupError
from .evaluate import VAL
from .families import family_of, state_dict_template
from .inputs.data import EvalSetSource, check_eval_set, set_inputs, verify_eval_set
from .inputs.pool import (
    IngredientPool,
    check_state_dict,
    load_pretrained,
    read_manifest,
    save_state_dict,
)
from .inputs.storage import atomic, check_writable, is_file, is_uri, join, write_json
from .inputs.tasks import dataset_records, eval_set_sources
from .methods import METHOD_INFO
from .metrics import Metric, load_metric
from .mixing import from_numpy
from .numerics import runtime_env
from .report import format_table, write_report
from .rundir import RunDir

logger = logging.getLogger(__name__)


@dataclass
class Prepared:
    """Everything checked before any cluster work."""
    config: RunConfig
    pool: IngredientPool
    components: Components
    eval_sources: dict[str, EvalSetSource]
    metric: Metric | None = None  # None: top-1 correctness


def validate_run(config: RunConfig, resume: bool, pool: IngredientPool | None = None
                 ) -> Prepared:
    """`pool`: the config's pool, already loaded and validated (bench: once for all cells)."""
    # Object storage first: an unreachable bucket fails in seconds, before any zoo read.
    for what, location in [("out", str(config.out)), ("cache", cache_location(config.cache))]:
        check_writable(location, what)
    if pool is None:
        pool = IngredientPool.from_zoo(config.pool.zoo)
        pool.validate(config.pool.verify_sha256)
    keys = list(pool.load(pool.names[0]))
    spec, family = pool.spec, family_of(pool.spec)
    unused = []
    if config.method.drop_unused:
        unused = traced_unused_keys(spec)
    components = partition(keys, config.method.components, unused, family.presets)
    eval_sources = eval_set_sources(config.pool.zoo)
    if VAL not in eval_sources:
        raise RaysoupError(f"zoo {config.pool.zoo} has no '{VAL}' evaluation set")
    for name, source in eval_sources.items():  # labels, classes, maps, shapes; images unread
        check_eval_set(source, spec.num_classes, family.inputs(spec), name,
                       min_classes=2 if name == VAL else 1)
        if set_inputs(source) == "text":
            family.check_text(spec)
        if config.pool.verify_sha256:
            verify_eval_set(source, name)
    pretrained = load_pretrained(config.pool.zoo)
    if pretrained is not None:
        check_state_dict(pretrained, state_dict_template(spec),
                         "manifest.json pretrained", family.architecture(spec))
    check_methods(config, pool, pretrained is not None)
    metric = check_metric(config, spec.num_classes)
    out = str(config.out)
    if is_file(join(out, "report.json")) and not resume:
        raise RaysoupError(f"{out} already holds a finished run; choose another `out`")
    if is_file(join(out, "driver/state.json")) and not resume:
        raise RaysoupError(f"{out} holds an unfinished run; continue it with --resume or "
                           f"choose another `out`")
    if resume:
        if "manifold_mix" not in config.methods:
            raise RaysoupError(f"--resume continues manifold_mix's checkpointed steps; this "
                               f"config's methods {list(config.methods)} keep none (run "
                               f"without --resume, into a new `out`)")
        saved_state(join(out, "driver"), config.fingerprint())  # refuses a different config
    return Prepared(config, pool, components, eval_sources, metric)


def check_metric(config: RunConfig, num_classes: int) -> Metric | None:
    """The config's metric, tried on a small batch in this process; racing's paired
    counts need right/wrong scores."""
    if not config.metric:
        return None
    try:
        metric = load_metric(config.metric, num_classes)
    except RaysoupError as e:
        raise RaysoupError(f"{config.source}: {e}" if config.source else str(e)) from None
    if config.method.racing and not metric.binary:
        raise RaysoupError(f"method.racing compares points on right/wrong answers; metric = "
                           f"{config.metric!r} gives scores between 0 and 1 (set racing = "
                           f"false)")
    return metric


def traced_unused_keys(spec) -> list[str]:
    """Weights the family's forward pass never uses, traced on a shapes-only (meta) model."""
    import torch
    family = family_of(spec)
    with torch.device("meta"):
        model = family.build(spec, device="meta")
        try:
            return unused_keys(model, family.example_batch(spec),
                               lambda m, batch: family.forward(spec, m, batch))
        except (RuntimeError, NotImplementedError) as e:
            raise RaysoupError(f"method.drop_unused: the {family.name} model cannot be traced "
                               f"on shapes alone ({str(e).splitlines()[0]}); leave "
                               f"drop_unused = false") from None


def check_methods(config: RunConfig, pool: IngredientPool, has_pretrained: bool) -> None:
    """What each method needs of the pool, before any cluster work."""
    needing = [m for m in config.methods if METHOD_INFO[m].needs_pretrained]
    if needing and not has_pretrained:
        raise RaysoupError(f"methods {', '.join(needing)} need the pretrained weights, but "
                           f"{config.pool.zoo}/manifest.json has no `pretrained` entry")
    for name, method_config in config.method_configs().items():
        if METHOD_INFO[name].check is not None:
            METHOD_INFO[name].check(pool, method_config)


def plan(prepared: Prepared) -> str:
    """What a run of this config would do: `raysoup check` prints it, nothing started."""
    config, pool = prepared.config, prepared.pool
    mm, r = config.method, config.resources
    n, m = len(pool), len(prepared.components)
    budget = m * mm.evals_per_component
    passes = 3 if mm.later_passes else 1
    lines = [(f"pool: {n} ingredients of {family_of(pool.spec).describe(pool.spec)} from "
              f"{config.pool.zoo}; evaluation sets {', '.join(prepared.eval_sources)}"),
             (f"components ({config.method.components}, {m}): "
              f"{', '.join(prepared.components.names)}"),
             f"ranking: {n} validation evaluations, shared by every method"]
    if config.metric:
        lines.insert(2, f"metric: {config.metric}, a score in [0, 1] per example (accuracies "
                        f"are mean scores)")
    for name, method_config in {**{m: None for m in config.methods},
                                **config.method_configs()}.items():
        if name == "manifold_mix":
            most = (n - 1) * (1 + passes * budget) + \
                (n * m * mm.phase2_evals_per_weight if mm.phase2 else 0)
            lines.append(f"manifold_mix: {mm.optimizer}, {budget} evaluations per pass "
                         f"({m} components x {mm.evals_per_component}); at most {most} "
                         f"evaluations after the ranking (each of {n - 1} candidates: a "
                         f"promise test and up to {passes} pass(es))"
                         + (", phase 2 included" if mm.phase2 else ""))
        elif name == "greedy_soup":
            lines.append(f"greedy_soup: {n - 1} evaluations")
        elif hasattr(method_config, "budget"):
            lines.append(f"{name}: " + (f"a Gram pass over val per ingredient ({n}), then "
                                        if name == "regmean" else "")
                         + f"{method_config.optimizer}, {method_config.budget} evaluations")
        elif name in ("learned_soup", "adamerging"):
            lines.append(f"{name}: {method_config.epochs} passes over val with "
                         f"gradients, on one evaluator")
        elif name == "fisher_merging":
            lines.append(f"fisher_merging: a Fisher pass over val per ingredient ({n})")
        else:
            lines.append(f"{name}: no validation search")
    count = r.evaluators or "one per GPU (or per CPU on a CPU-only cluster)"
    gpus = "1 GPU if the cluster has GPUs, else none" if r.gpus_per_evaluator < 0 else \
        f"{r.gpus_per_evaluator:g} GPU"
    mode = r.evaluation if r.evaluation != "auto" else \
        ("sharded" if mm.num_workers == 1 else "whole")
    lines.append(f"evaluators: {count}, each {r.cpus_per_evaluator:g} CPU and {gpus}; "
                 f"{mode} evaluation, {mm.num_workers} point(s) in flight")
    lines.append(f"out: {config.out}" + (" (uploaded from a local staging folder)"
                                         if is_uri(str(config.out)) else ""))
    return "\n".join(lines)


def evaluator_spec(config: RunConfig, metric: Metric | None = None) -> EvaluatorSpec:
    """One evaluator per GPU, else per CPU slot; sharded for one trial at a time."""
    r = config.resources
    total = ray.cluster_resources()
    has_gpus = total.get("GPU", 0) >= 1
    gpus = r.gpus_per_evaluator if r.gpus_per_evaluator >= 0 else (1.0 if has_gpus else 0.0)
    count = r.evaluators or max(1, int(total.get("GPU", 0) // gpus if gpus > 0
                                       else total.get("CPU", 1) // r.cpus_per_evaluator))
    need = {"CPU": count * r.cpus_per_evaluator, "GPU": count * gpus}
    short = {k: v for k, v in need.items() if v > total.get(k, 0) + 1e-9}
    if short and not r.wait_for_autoscaler:
        raise RaysoupError(
            f"{count} evaluator(s) need {need['CPU']:g} CPU and {need['GPU']:g} GPU, but the "
            f"cluster has {total.get('CPU', 0):g} CPU and {total.get('GPU', 0):g} GPU; lower "
            f"resources.evaluators / cpus_per_evaluator / gpus_per_evaluator, or set "
            f"resources.wait_for_autoscaler = true on an autoscaling cluster")
    mode = r.evaluation
    if mode == "auto":
        mode = "sharded" if config.method.num_workers == 1 else "whole"
    return EvaluatorSpec(count=count, mode=mode, cpus=r.cpus_per_evaluator, gpus=gpus,
                         autocast_bf16=r.bf16, timeout_s=r.eval_timeout_s,
                         numerics=r.numerics, metric=metric)


def write_betas(out: Path, betas: np.ndarray, ingredients: list[str], components: list[str]) -> None:
    """beta.parquet (ingredient x component weights) and its heatmap beta.png."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = pa.table({"ingredient": ingredients,
                      **{c: betas[:, i].tolist() for i, c in enumerate(components)}})
    with atomic(out / "beta.parquet") as tmp:
        pq.write_table(table, tmp)
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(components), 1.0 + 0.45 * len(ingredients)))
    im = ax.imshow(betas, cmap="viridis", vmin=0, vmax=max(1e-9, float(betas.max())),
                   aspect="auto")
    ax.set_xticks(range(len(components)), components, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(ingredients)), ingredients, fontsize=8)
    for (i, j), v in np.ndenumerate(betas):
        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w")
    fig.colorbar(im, ax=ax, label="beta")
    ax.set_title("ManifoldMix weights (ingredient x component)")
    fig.tight_layout()
    with atomic(out / "beta.png") as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def redraw(run_dir: Path, report: dict) -> list[Path]:
    """`raysoup report`: a finished run's figures drawn again into `run_dir` from its
    report.json (`report`, as read)."""
    from .report import draw_scatter
    drawn = [run_dir / "scatter.png"] if draw_scatter(report, run_dir / "scatter.png") else []
    row = report["methods"].get("manifold_mix")
    if row is not None:
        write_betas(run_dir, np.array(row["betas"]), row["ingredients"], row["components"])
        drawn += [run_dir / "beta.parquet", run_dir / "beta.png"]
    return drawn


def write_manifold_mix(out: Path, row: dict, fused: dict) -> None:
    """fused.safetensors, beta.parquet + beta.png and history.json of a ManifoldMix run."""
    save_state_dict(from_numpy(fused), out / "fused.safetensors")
    write_betas(out, np.array(row["betas"]), row["ingredients"], row["components"])
    write_json(out / "history.json", row["history"], indent=1)


def execute(config: RunConfig, resume: bool = False, address: str | None = None,
            extra: dict | None = None) -> dict:
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
    logger.info(f"[run] {evaluators.count} evaluator(s), {evaluators.mode} evaluation, "
                f"{len(prepared.components)} components, methods {', '.join(config.methods)}")
    actors = start_evaluators(prepared.pool.spec, prepared.eval_sources, prepared.components,
                              evaluators, config.resources.start_timeout_s)
    # On this node: the driver writes its step checkpoints and Tune folders under `out`,
    # which must be where this process (and a later --resume) can read them.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    console = [h for h in logging.getLogger("raysoup").handlers
               if getattr(h, "raysoup_tag", "") == "console"]
    driver = SoupDriver.options(scheduling_strategy=here,
                                runtime_env=runtime_env(evaluators.numerics)).remote(
        prepared, evaluators, actors, cache, console[0].level if console else logging.INFO,
        run_dir)
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
    if result["fused"] is not None:
        write_manifold_mix(out, result["methods"]["manifold_mix"], result["fused"])
    manifest = read_manifest(config.pool.zoo)
    report = {"methods": result["methods"], "ingredients": result["ingredients"],
              "cache": result["cache"],
              "references": result["references"], "ranking": result["ranking"],
              "zoo": {"dir": str(config.pool.zoo), "config": manifest.get("config"),
                      "build_seconds": manifest.get("build_seconds")},
              "data": dataset_records(prepared.eval_sources),
              "config": {**(extra or {}), "source": config.source and str(config.source),
                         "resumed": resume, "methods": list(config.methods),
                         "report_ingredients": config.report_ingredients,
                         "metric": config.metric,
                         "pool": str(config.pool.zoo),
                         **{name: c.to_dict() for name, c in config.method_configs().items()},
                         "tracking": config.tracking.to_dict(),
                         "evaluators": evaluators.count, "evaluation": evaluators.mode,
                         "numerics": result["numerics"]}}
    write_report(out, report, result["correctness"])
    logger.info(format_table(report["methods"], report["references"], config.metric))
    counts = result["cache"]
    logger.info(f"[run] from the cache ({cache}): {counts['points_cached']} mixing "
                f"point(s) and {counts['judgements_cached']} of "
                f"{counts['judgements_cached'] + counts['judgements_measured']} judgements "
                f"(model x set); clear it to measure everything again")
    written = ["report.json", "results.parquet", "correctness.parquet", "scatter.png",
               "beta.parquet", "beta.png", "history.json", "fused.safetensors"]
    written = [f for f in written if (out / f).exists()]
    logger.info(f"[run] wrote {run_dir.remote or out}: " + ", ".join(written))
    run_dir.finish()
    return report
