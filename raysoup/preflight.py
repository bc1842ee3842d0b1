"""Everything a run checks before any cluster work (`raysoup check` prints its plan): the
output and cache locations, the pool, the evaluation sets, the components, every method's
needs and the metric. A failure is one line, raised before Ray starts."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from .cache import cache_location
from .checkpoint import RANKING_FILE, load_ranking
from .components import Components, partition, unused_keys
from .config import RunConfig
from .errors import RaysoupError
from .evaluate import VAL
from .families import family_of, state_dict_template
from .inputs.data import EvalSetSource, check_eval_set, set_inputs, verify_eval_set
from .inputs.pool import IngredientPool, check_state_dict, load_pretrained
from .inputs.storage import check_writable, is_file, is_uri, join
from .inputs.tasks import eval_set_sources
from .methods import METHOD_INFO
from .metrics import Metric, load_metric

logger = logging.getLogger(__name__)


@dataclass
class Prepared:
    """Everything checked before any cluster work."""

    config: RunConfig
    pool: IngredientPool
    components: Components
    eval_sources: dict[str, EvalSetSource]
    metric: Metric | None = None  # None: top-1 correctness


def validate_run(config: RunConfig, resume: bool, pool: IngredientPool | None = None) -> Prepared:
    """`pool`: the config's pool, already loaded and validated (bench: once for all cells)."""
    # Object storage first: an unreachable bucket fails in seconds, before any zoo read.
    for what, location in [("out", str(config.out)), ("cache", cache_location(config.cache))]:
        check_writable(location, what)
    if pool is None:
        pool = IngredientPool.from_zoo(config.pool.zoo)
        pool.validate(config.pool.verify_sha256)
    keys = list(pool.load(pool.names[0]))
    spec, family = pool.spec, family_of(pool.spec)
    unused = traced_unused_keys(spec) if config.search.drop_unused else []
    components = partition(keys, config.search.components, unused, family.presets)
    eval_sources = eval_set_sources(config.pool.zoo)
    if VAL not in eval_sources:
        raise RaysoupError(f"zoo {config.pool.zoo} has no '{VAL}' evaluation set")
    for name, source in eval_sources.items():  # labels, classes, maps, shapes; images unread
        check_eval_set(
            source, spec.num_classes, family.inputs(spec), name, min_classes=2 if name == VAL else 1
        )
        if set_inputs(source) == "text":
            family.check_text(spec)
        if config.pool.verify_sha256:
            verify_eval_set(source, name)
    pretrained = load_pretrained(config.pool.zoo)
    if pretrained is not None:
        check_state_dict(
            pretrained,
            state_dict_template(spec),
            "manifest.json pretrained",
            family.architecture(spec),
        )
    check_methods(config, pool, pretrained is not None)
    metric = check_metric(config, spec.num_classes)
    out = str(config.out)
    if is_file(join(out, "report.json")) and not resume:
        raise RaysoupError(f"{out} already holds a finished run; choose another `out`")
    if is_file(join(out, f"driver/{RANKING_FILE}")) and not resume:
        raise RaysoupError(
            f"{out} holds an unfinished run; continue it with --resume or choose another `out`"
        )
    if resume:
        if not config.resumable():
            raise RaysoupError(
                f"--resume continues the checkpointed steps of a resumable "
                f"method (manifold_mix); this config's methods "
                f"{list(config.methods)} keep none (run without --resume, "
                f"into a new `out`)"
            )
        load_ranking(join(out, "driver"), config.fingerprint())  # refuses a different config
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
    if config.search.racing and not metric.binary:
        raise RaysoupError(
            f"search.racing compares points on right/wrong answers; metric = "
            f"{config.metric!r} gives scores between 0 and 1 (set racing = "
            f"false)"
        )
    return metric


def traced_unused_keys(spec) -> list[str]:
    """Weights the family's forward pass never uses, traced on a shapes-only (meta) model."""
    import torch

    family = family_of(spec)
    with torch.device("meta"):
        model = family.build(spec, device="meta")
        try:
            return unused_keys(
                model, family.example_batch(spec), lambda m, batch: family.forward(spec, m, batch)
            )
        except (RuntimeError, NotImplementedError) as e:
            raise RaysoupError(
                f"search.drop_unused: the {family.name} model cannot be traced "
                f"on shapes alone ({str(e).splitlines()[0]}); leave "
                f"drop_unused = false"
            ) from None


def check_methods(config: RunConfig, pool: IngredientPool, has_pretrained: bool) -> None:
    """What each method needs of the pool, before any cluster work."""
    needing = [m for m in config.methods if METHOD_INFO[m].needs_pretrained]
    if needing and not has_pretrained:
        raise RaysoupError(
            f"methods {', '.join(needing)} need the pretrained weights, but "
            f"{config.pool.zoo}/manifest.json has no `pretrained` entry"
        )
    for name, method_config in config.method_configs().items():
        if METHOD_INFO[name].check is not None:
            METHOD_INFO[name].check(pool, method_config)


def plan(prepared: Prepared) -> str:
    """What a run of this config would do: `raysoup check` prints it, nothing started."""
    config, pool = prepared.config, prepared.pool
    search, r = config.search, config.resources
    n, m = len(pool), len(prepared.components)
    lines = [
        (
            f"pool: {n} ingredients of {family_of(pool.spec).describe(pool.spec)} from "
            f"{config.pool.zoo}; evaluation sets {', '.join(prepared.eval_sources)}"
        ),
        f"components ({search.components}, {m}): {', '.join(prepared.components.names)}",
        f"ranking: {n} validation evaluations, shared by every method",
    ]
    if config.metric:
        lines.insert(
            2,
            f"metric: {config.metric}, a score in [0, 1] per example (accuracies are mean scores)",
        )
    configs = config.method_configs()
    lines += [
        f"{name}: {METHOD_INFO[name].plan_line(configs.get(name), n, m)}" for name in config.methods
    ]
    count = r.evaluators or "one per GPU (or per CPU on a CPU-only cluster)"
    gpus = (
        "1 GPU if the cluster has GPUs, else none"
        if r.gpus_per_evaluator < 0
        else f"{r.gpus_per_evaluator:g} GPU"
    )
    mode = (
        r.evaluation
        if r.evaluation != "auto"
        else ("sharded" if search.num_workers == 1 else "whole")
    )
    lines.append(
        f"evaluators: {count}, each {r.cpus_per_evaluator:g} CPU and {gpus}; "
        f"{mode} evaluation, {search.num_workers} point(s) in flight"
    )
    lines.append(
        f"out: {config.out}"
        + (" (uploaded from a local staging folder)" if is_uri(str(config.out)) else "")
    )
    return "\n".join(lines)
