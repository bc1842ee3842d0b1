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
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field

from .errors import RaysoupError
from .inputs import storage
from .numerics import Numerics
from .search import check_optimizer
from .tracking import TrackingConfig
from .typed import describe, example_toml, section_config, validate

Location = str  # a path (shared by every node) or a URI that pyarrow.fs reads (s3://, gs://)


@section_config
class PoolConfig:
    """The ingredients and the evaluation sets."""
    SECTION: ClassVar[str] = "pool"
    zoo: Location = Field(
        description="a folder (or a pyarrow.fs URI) with manifest.json: `raysoup zoo build "
                    "--out runs/zoo`, or your own pool (docs/clip.md, docs/models.md)",
        examples=["../runs/zoo"])
    verify_sha256: bool = Field(
        True, description="refuse files whose sha256 differs from the manifest's")


@section_config
class SearchConfig:
    """How every method's validation search runs (Tune + nevergrad on the evaluators)."""
    SECTION: ClassVar[str] = "search"
    components: str = Field(
        "granularity-1", description="the weights' components, each mixed with its own "
                                     "weight: granularity-0..3, per-block, whole-model, or "
                                     "regex rules")
    drop_unused: bool = Field(False, description="leave out weights the classifier never uses")
    num_workers: int = Field(
        1, ge=1, description="points in flight (asked together, one Tune trial); > 1 needs a "
                             "parallel optimizer")
    racing: bool = Field(
        False, description="stop scoring a point once it cannot beat the pass's best "
                           "(num_workers = 1; the default scores every point fully)")
    racing_chunks: int = Field(8, ge=2, le=100,
                               description="racing: validation chunks, a look after each")
    racing_confidence: float = Field(
        0.99, gt=0.5, lt=1, description="racing: confidence that a stopped point would not win")

    def __post_init__(self):
        if self.racing and self.num_workers != 1:  # one rule across two keys
            raise RaysoupError(f"search.racing scores one point at a time: it needs "
                               f"num_workers = 1, got {self.num_workers}")

    def to_dict(self) -> dict:
        return asdict(self)


@section_config
class ResourcesConfig:
    """What the evaluator actors reserve and how they compute."""
    SECTION: ClassVar[str] = "resources"
    evaluators: int = Field(0, ge=0, description="0: one per GPU, or one per CPU on a "
                                                 "CPU-only cluster")
    evaluation: Literal["auto", "sharded", "whole"] = Field(
        "auto", description="sharded for num_workers = 1, else whole")
    cpus_per_evaluator: float = Field(
        1.0, gt=0, description="CPUs each evaluator actor reserves (its torch threads)")
    gpus_per_evaluator: float = Field(-1.0, ge=-1,
                                      description="-1: 1 when the cluster has GPUs, else 0")
    bf16: bool = Field(False, description="bf16 autocast on GPU evaluators")
    eval_timeout_s: float = Field(
        600.0, gt=0, description="one evaluation slower than this fails its trial")
    max_failures: int = Field(2, ge=0,
                              description="retries of a failed trial before it is scored 0")
    wait_for_autoscaler: bool = Field(
        False, description="evaluators may wait for nodes the cluster adds")
    start_timeout_s: float = Field(600.0, gt=0,
                                   description="evaluators not up by then: fail loudly")
    numerics: Numerics = Field(
        "portable", description='CPU kernels: "portable" gives the same bits on any x86-64 '
                                'CPU with AVX2; "native" is each CPU\'s fastest')


@dataclass(frozen=True)
class RunConfig:
    pool: PoolConfig
    out: Path | str               # a local or shared path, or a URI (a str) the run uploads to
    methods: tuple[str, ...] = ("manifold_mix",)  # run on one shared ranking, in this order
    # The methods' configs, by method name (a TOML section each); defaults if absent.
    options: dict = field(default_factory=dict)
    search: SearchConfig = field(default_factory=SearchConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    source: Path | None = None    # the TOML file it came from
    # Judge every ingredient on every set too (report rows and scatter plot); off, only the
    # ranking's val accuracies are reported: the full table costs N x all sets.
    report_ingredients: bool = False
    metric: str = ""              # "package.module:function" (raysoup.metrics); "": top-1
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    cache: str | None = None      # judgements and points by content; None: RAYSOUP_CACHE's

    def __post_init__(self):
        from .methods import METHODS
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise RaysoupError(f"methods: unknown method(s) {unknown or '(none given)'}; "
                               f"known: {sorted(METHODS)}")
        for name, config in self.method_configs().items():
            if hasattr(config, "optimizer"):  # every search runs num_workers points at once
                try:
                    check_optimizer(config.optimizer, self.search.num_workers)
                except RaysoupError as e:
                    raise RaysoupError(f"{name}.optimizer with search.num_workers = "
                                       f"{self.search.num_workers}: {e}") from None

    def method_configs(self) -> dict[str, object]:
        """The config of every method in `methods` that has one."""
        from .methods import METHOD_INFO
        return {name: self.options.get(name) or METHOD_INFO[name].config()
                for name in self.methods if METHOD_INFO[name].config is not None}

    def resumable(self) -> list[str]:
        """The methods that checkpoint their steps, which --resume continues."""
        from .methods import METHOD_INFO
        return [name for name in self.methods if METHOD_INFO[name].resumable]

    def fingerprint(self) -> dict:
        """What must not change between a run and its --resume: the pool, the search, the
        metric and every resumable method's config."""
        configs = self.method_configs()
        # Through JSON, so it compares equal to the copy saved in a checkpoint.
        return json.loads(json.dumps({"pool": storage.resolve(self.pool.zoo),
                                      "search": self.search.to_dict(),
                                      **{n: configs[n].to_dict() for n in self.resumable()},
                                      **({"metric": self.metric} if self.metric else {})}))


@section_config
class TopLevel:
    """raysoup run examples/run.toml (relative paths are relative to this file). Every key
    at its default, generated from raysoup's typed config (scripts/config_reference.py)."""
    out: str = Field(description="run directory: report, fused model, beta, Tune folders; "
                                 "or a URI (s3://bucket/run) uploaded to",
                     examples=["../runs/example"])
    methods: tuple[str, ...] = Field(
        ("manifold_mix",), min_length=1,
        description="the registry's methods (docs/merge_methods.md) to run on one shared "
                    "ranking, in this order")
    report_ingredients: bool = Field(
        False, description="also judge every ingredient on every set (their report rows and "
                           "scatter.png)")
    cache: str = Field("", description="judgements and measured points by content: a path "
                                       "or URI shared by the cluster (\"\": RAYSOUP_CACHE's)")
    metric: str = Field("", description='"package.module:function": a score in [0, 1] per '
                                        'example from (logits, labels); "": top-1 correctness')


def section(cls, table: dict, name: str, where: str, base: Path):
    """One TOML table into the dataclass `cls` (raysoup.typed.validate), paths resolved
    relative to the config file."""
    if isinstance(table, dict):
        location = {f.name for f in fields(cls) if f.type == "Location"}
        table = {k: storage.resolve(v, base) if k in location and isinstance(v, str) else v
                 for k, v in table.items()}
    return validate(cls, table, where, f"{name}." if name else "",
                    f"[{name}]" if name else "the top level")


def method_sections() -> dict[str, type]:
    """The TOML section of every method with a config of its own, by method name."""
    from .methods import METHOD_INFO
    return {name: info.config for name, info in METHOD_INFO.items() if info.config is not None}


RUN_SECTIONS = {"pool": PoolConfig, "search": SearchConfig, "resources": ResourcesConfig,
                "tracking": TrackingConfig}


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
        raise RaysoupError(f"{path}: [method] is now two sections: [manifold_mix] (the "
                           f"method's own keys) and [search] ({', '.join(f.name for f in fields(SearchConfig))})")
    by_method = method_sections()
    sections = {**RUN_SECTIONS, **by_method}
    top_level = {f.name for f in fields(TopLevel)}
    unknown = sorted(set(raw) - set(sections) - top_level)
    if unknown:
        raise RaysoupError(f"{path}: unknown key(s) or section(s) {unknown}; known: "
                           f"{sorted([*sections, *top_level])}")
    if "pool" not in raw or "out" not in raw:
        raise RaysoupError(f"{path}: needs `out = \"DIR\"` and a [pool] section with `zoo`")
    where, base = str(path), path.parent
    top = section(TopLevel, {k: v for k, v in raw.items() if k in top_level}, "", where, base)
    run = {name: section(cls, raw.get(name, {}), name, where, base)
           for name, cls in RUN_SECTIONS.items() if name != "pool"}
    try:
        return RunConfig(
            pool=section(PoolConfig, raw["pool"], "pool", where, base),
            out=top.out if storage.is_uri(top.out) else base / Path(top.out).expanduser(),
            methods=top.methods,
            options={name: section(cls, raw[name], name, where, base)
                     for name, cls in by_method.items() if name in raw},
            source=path,
            report_ingredients=top.report_ingredients,
            cache=storage.resolve(top.cache, base) if top.cache else None,
            metric=top.metric, **run)
    except RaysoupError as e:
        raise RaysoupError(f"{where}: {e}") from None


EXAMPLE = Path(__file__).parents[1] / "examples" / "run.toml"


def config_sections() -> list[tuple[str, type, str]]:
    """(TOML section, its class, what it is) for the top level, the run's sections and
    every method's, in the reference's order."""
    def about(cls) -> str:
        return " ".join((cls.__doc__ or "").split())
    return [("", TopLevel, about(TopLevel)),
            *((name, cls, about(cls)) for name, cls in RUN_SECTIONS.items()),
            *((name, cls, about(cls)) for name, cls in method_sections().items())]


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
