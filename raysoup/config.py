"""`raysoup run` configuration: a TOML file read into typed sections.

Every key of every section has a type, bounds and a default (the dataclasses below and
each method's config); a TOML file is validated against them by pydantic in strict mode,
so a wrong type, a value out of bounds or an unknown key is one error naming the file, the
key, the expected type and the value given, raised before any cluster work starts.
Relative paths are relative to the config file.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Annotated, ClassVar, Literal

from pydantic import Field

from .errors import RaysoupError
from .inputs import storage
from .numerics import Numerics
from .search import check_optimizer
from .tracking import TrackingConfig
from .typed import describe, example_toml, section_config, validate


@section_config
class PoolConfig:
    SECTION: ClassVar[str] = "pool"
    SUMMARY: ClassVar[str] = "the ingredients and the evaluation sets"
    zoo: Annotated[
        str,
        Field(
            description="a folder (or a pyarrow.fs URI) with manifest.json: `raysoup zoo build "
            "--out runs/zoo`, or your own pool (docs/clip.md, docs/models.md)",
            examples=["../runs/zoo"],
        ),
    ]
    verify_sha256: Annotated[
        bool, Field(description="refuse files whose sha256 differs from the manifest's")
    ] = True


@section_config
class SearchConfig:
    SECTION: ClassVar[str] = "search"
    SUMMARY: ClassVar[str] = (
        "how every method's validation search runs (Tune + nevergrad on the evaluators)"
    )
    components: Annotated[
        str,
        Field(
            description="the weights' components, each mixed with its own weight: "
            "granularity-0..3, per-block, whole-model, or regex rules"
        ),
    ] = "granularity-1"
    drop_unused: Annotated[
        bool, Field(description="leave out weights the classifier never uses")
    ] = False
    num_workers: Annotated[
        int,
        Field(
            ge=1,
            description="points in flight (asked together, one Tune trial); > 1 needs a "
            "parallel optimizer",
        ),
    ] = 1
    racing: Annotated[
        bool,
        Field(
            description="stop scoring a point once it cannot beat the pass's best "
            "(num_workers = 1; the default scores every point fully)"
        ),
    ] = False
    racing_chunks: Annotated[
        int, Field(ge=2, le=100, description="racing: validation chunks, a look after each")
    ] = 8
    racing_confidence: Annotated[
        float,
        Field(gt=0.5, lt=1, description="racing: confidence that a stopped point would not win"),
    ] = 0.99

    def __post_init__(self):
        if self.racing and self.num_workers != 1:  # one rule across two keys
            raise RaysoupError(
                f"search.racing scores one point at a time: it needs "
                f"num_workers = 1, got {self.num_workers}"
            )

    def to_dict(self) -> dict:
        return asdict(self)


@section_config
class ResourcesConfig:
    SECTION: ClassVar[str] = "resources"
    SUMMARY: ClassVar[str] = "what the evaluator actors reserve and how they compute"
    evaluators: Annotated[
        int, Field(ge=0, description="0: one per GPU, or one per CPU on a CPU-only cluster")
    ] = 0
    evaluation: Annotated[
        Literal["auto", "sharded", "whole"],
        Field(description="sharded for num_workers = 1, else whole"),
    ] = "auto"
    cpus_per_evaluator: Annotated[
        float, Field(gt=0, description="CPUs each evaluator actor reserves (its torch threads)")
    ] = 1.0
    gpus_per_evaluator: Annotated[
        float, Field(ge=-1, description="-1: 1 when the cluster has GPUs, else 0")
    ] = -1.0
    bf16: Annotated[bool, Field(description="bf16 autocast on GPU evaluators")] = False
    eval_timeout_s: Annotated[
        float, Field(gt=0, description="one evaluation slower than this fails its trial")
    ] = 600.0
    max_failures: Annotated[
        int, Field(ge=0, description="retries of a failed trial before it is scored 0")
    ] = 2
    wait_for_autoscaler: Annotated[
        bool, Field(description="evaluators may wait for nodes the cluster adds")
    ] = False
    start_timeout_s: Annotated[
        float, Field(gt=0, description="evaluators not up by then: fail loudly")
    ] = 600.0
    numerics: Annotated[
        Numerics,
        Field(
            description='CPU kernels: "portable" gives the same bits on any x86-64 CPU with '
            'AVX2; "native" is each CPU\'s fastest'
        ),
    ] = "portable"


@dataclass(frozen=True)
class RunConfig:
    pool: PoolConfig
    out: Path | str  # a local or shared path, or a URI (a str) the run uploads to
    methods: tuple[str, ...] = ("manifold_mix",)  # run on one shared ranking, in this order
    # The methods' configs, by method name (a TOML section each); defaults if absent.
    options: dict = field(default_factory=dict)
    search: SearchConfig = field(default_factory=SearchConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    source: Path | None = None  # the TOML file it came from
    # Judge every ingredient on every set too (report rows and scatter plot); off, only the
    # ranking's val accuracies are reported: the full table costs N x all sets.
    report_ingredients: bool = False
    metric: str = ""  # "package.module:function" (raysoup.metrics); "": top-1
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    cache: str | None = None  # judgements and points by content; None: RAYSOUP_CACHE's

    def __post_init__(self):
        from .methods import METHODS

        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise RaysoupError(
                f"methods: unknown method(s) {unknown or '(none given)'}; known: {sorted(METHODS)}"
            )
        for name, config in self.method_configs().items():
            if hasattr(config, "optimizer"):  # every search runs num_workers points at once
                try:
                    check_optimizer(config.optimizer, self.search.num_workers)
                except RaysoupError as e:
                    raise RaysoupError(
                        f"{name}.optimizer with search.num_workers = {self.search.num_workers}: {e}"
                    ) from None

    def method_configs(self) -> dict[str, object]:
        """The config of every method in `methods` that has one."""
        from .methods import METHOD_INFO

        return {
            name: self.options.get(name) or METHOD_INFO[name].config()
            for name in self.methods
            if METHOD_INFO[name].config is not None
        }

    def resumable(self) -> list[str]:
        """The methods that checkpoint their steps, which --resume continues."""
        from .methods import METHOD_INFO

        return [name for name in self.methods if METHOD_INFO[name].resumable]

    def fingerprint(self) -> dict:
        """What must not change between a run and its --resume: the pool, the search, the
        metric and every resumable method's config."""
        configs = self.method_configs()
        # Through JSON, so it compares equal to the copy saved in a checkpoint.
        return json.loads(
            json.dumps(
                {
                    "pool": storage.resolve(self.pool.zoo),
                    "search": self.search.to_dict(),
                    **{n: configs[n].to_dict() for n in self.resumable()},
                    **({"metric": self.metric} if self.metric else {}),
                }
            )
        )


@section_config
class TopLevel:
    SUMMARY: ClassVar[str] = (
        "raysoup run examples/run.toml (relative paths are relative to this file). Every key "
        "at its default, generated from raysoup's typed config (scripts/config_reference.py)."
    )
    out: Annotated[
        str,
        Field(
            description="run directory: report, fused model, beta, Tune folders; or a URI "
            "(s3://bucket/run) uploaded to",
            examples=["../runs/example"],
        ),
    ]
    methods: Annotated[
        tuple[str, ...],
        Field(
            min_length=1,
            description="the registry's methods (docs/merge_methods.md) to run on "
            "one shared ranking, in this order",
        ),
    ] = ("manifold_mix",)
    report_ingredients: Annotated[
        bool,
        Field(
            description="also judge every ingredient on every set (their report rows and "
            "scatter.png)"
        ),
    ] = False
    cache: Annotated[
        str,
        Field(
            description="judgements and measured points by content: a path or URI shared by "
            'the cluster ("": RAYSOUP_CACHE\'s)'
        ),
    ] = ""
    metric: Annotated[
        str,
        Field(
            description='"package.module:function": a score in [0, 1] per example from (logits, '
            'labels); "": top-1 correctness'
        ),
    ] = ""


def section(cls, table: dict, name: str, where: str):
    """One TOML table into the section_config class `cls` (raysoup.typed.validate)."""
    return validate(
        cls, table, where, f"{name}." if name else "", f"[{name}]" if name else "the top level"
    )


def method_sections() -> dict[str, type]:
    """The TOML section of every method with a config of its own, by method name."""
    from .methods import METHOD_INFO

    return {
        name: METHOD_INFO[name].config
        for name in sorted(METHOD_INFO)
        if METHOD_INFO[name].config is not None
    }


RUN_SECTIONS = {
    "pool": PoolConfig,
    "search": SearchConfig,
    "resources": ResourcesConfig,
    "tracking": TrackingConfig,
}


def load_config(path: Path) -> RunConfig:
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except OSError as e:
        raise RaysoupError(f"cannot read config {path}: {e}") from e
    except UnicodeDecodeError as e:
        raise RaysoupError(f"{path} is not UTF-8 text: {e}") from e
    except tomllib.TOMLDecodeError as e:
        raise RaysoupError(f"{path} is not valid TOML: {e}") from e
    if "method" in raw:
        raise RaysoupError(
            f"{path}: [method] is now two sections: [manifold_mix] (the "
            f"method's own keys) and [search] ({', '.join(f.name for f in fields(SearchConfig))})"
        )
    by_method = method_sections()
    sections = {**RUN_SECTIONS, **by_method}
    top_level = {f.name for f in fields(TopLevel)}
    unknown = sorted(set(raw) - set(sections) - top_level)
    if unknown:
        raise RaysoupError(
            f"{path}: unknown key(s) or section(s) {unknown}; known: "
            f"{sorted([*sections, *top_level])}"
        )
    if "pool" not in raw or "out" not in raw:
        raise RaysoupError(f'{path}: needs `out = "DIR"` and a [pool] section with `zoo`')
    where, base = str(path), path.parent
    top = section(TopLevel, {k: v for k, v in raw.items() if k in top_level}, "", where)
    pool = section(PoolConfig, raw["pool"], "pool", where)
    run = {
        name: section(cls, raw.get(name, {}), name, where)
        for name, cls in RUN_SECTIONS.items()
        if name != "pool"
    }
    options = {
        name: section(cls, raw[name], name, where) for name, cls in by_method.items() if name in raw
    }
    try:  # the rules across sections (RunConfig's own checks)
        return RunConfig(
            pool=replace(pool, zoo=storage.resolve(pool.zoo, base)),
            out=top.out if storage.is_uri(top.out) else base / Path(top.out).expanduser(),
            methods=top.methods,
            options=options,
            source=path,
            report_ingredients=top.report_ingredients,
            cache=storage.resolve(top.cache, base) if top.cache else None,
            metric=top.metric,
            **run,
        )
    except RaysoupError as e:
        raise RaysoupError(f"{where}: {e}") from None


EXAMPLE = Path(__file__).parents[1] / "examples" / "run.toml"


def config_sections() -> list[tuple[str, type, str]]:
    """(TOML section, its class, what it is) for the top level, the run's sections and
    every method's, in the reference's order."""
    return [
        ("", TopLevel, TopLevel.SUMMARY),
        *((name, cls, cls.SUMMARY) for name, cls in RUN_SECTIONS.items()),
        *((name, cls, cls.SUMMARY) for name, cls in method_sections().items()),
    ]


def example_config() -> str:
    """examples/run.toml: every key at its default, its meaning beside it."""
    return example_toml(config_sections())


def reference_table() -> str:
    """docs/configuration.md's reference: every section and key with its type and bounds,
    default and meaning (a test keeps the file equal to this)."""
    rows = ["| section | key | type | default | meaning |", "|---|---|---|---|---|"]
    for name, cls, _ in config_sections():
        for key, *cells in describe(cls):
            cells = [name and f"[{name}]", f"`{key}`", *cells]
            rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(rows)
