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
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field

from .errors import RaysoupError
from .inputs import storage
from .numerics import Numerics
from .search import check_optimizer
from .tracking import TrackingConfig
from .typed import field_types, validate

Location = str  # a path (shared by every node) or a URI that pyarrow.fs reads (s3://, gs://)
Positive = Annotated[float, Field(gt=0)]
NonNegative = Annotated[int, Field(ge=0)]
AtLeastOne = Annotated[int, Field(ge=1)]


@dataclass(frozen=True)
class PoolConfig:
    zoo: Location                 # a raysoup zoo: its manifest names model, ingredients, data
    verify_sha256: bool = True    # refuse files whose sha256 differs from the manifest's


@dataclass(frozen=True)
class ResourcesConfig:
    evaluators: NonNegative = 0   # 0: one per GPU, or one per CPU on a CPU-only cluster
    evaluation: Literal["auto", "sharded", "whole"] = "auto"
    cpus_per_evaluator: Positive = 1.0
    gpus_per_evaluator: Annotated[float, Field(ge=-1)] = -1.0  # -1: 1 if the cluster has GPUs
    bf16: bool = False            # bf16 autocast on GPU evaluators
    eval_timeout_s: Positive = 600.0
    max_failures: NonNegative = 2  # retries of a failed trial before it is scored 0
    wait_for_autoscaler: bool = False  # evaluators may wait for nodes the cluster adds
    start_timeout_s: Positive = 600.0  # evaluators not up by then: fail loudly
    numerics: Numerics = "portable"  # CPU kernels: the same bits on any AVX2 CPU, or native

    def __post_init__(self):
        if self.evaluation not in ("auto", "sharded", "whole"):
            raise RaysoupError(f"resources.evaluation must be auto, sharded or whole, got "
                               f"{self.evaluation!r}")
        if self.evaluators < 0:
            raise RaysoupError(f"resources.evaluators must be >= 0, got {self.evaluators}")
        if self.cpus_per_evaluator <= 0:
            raise RaysoupError("resources.cpus_per_evaluator must be > 0")
        if self.eval_timeout_s <= 0 or self.max_failures < 0:
            raise RaysoupError("resources.eval_timeout_s must be > 0 and max_failures >= 0")


@dataclass(frozen=True)
class SearchConfig:
    """How every method's validation search runs (Tune + nevergrad on the evaluators): the
    weights' components, mixed per component, and the points in flight."""
    components: str = "granularity-1"  # a preset of raysoup.components, or regex rules
    drop_unused: bool = False          # leave out weights the classifier never uses
    num_workers: AtLeastOne = 1        # points in flight at once (1: sequential optimisers)
    # Racing (opt-in, num_workers = 1): stop scoring a point once it cannot beat the pass's
    # best at racing_confidence, after any of racing_chunks validation chunks.
    racing: bool = False
    racing_chunks: Annotated[int, Field(ge=2, le=100)] = 8
    racing_confidence: Annotated[float, Field(gt=0.5, lt=1)] = 0.99

    def __post_init__(self):
        if self.racing and self.num_workers != 1:
            raise RaysoupError(f"search.racing scores one point at a time: it needs "
                               f"num_workers = 1, got {self.num_workers}")

    def to_dict(self) -> dict:
        return asdict(self)


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


@dataclass(frozen=True)
class TopLevel:
    """The keys outside any section."""
    out: str
    methods: Annotated[tuple[str, ...], Field(min_length=1)] = ("manifold_mix",)
    report_ingredients: bool = False
    cache: str = ""
    metric: str = ""


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


def reference_table(example: Path = EXAMPLE) -> str:
    """The README's configuration reference: every section and key of the typed models,
    with its type and default, and its meaning from the comment beside it in
    examples/run.toml (a test keeps the README's copy equal to this)."""
    meanings, current, last = {}, "", None
    for line in example.read_text().splitlines():
        code, _, comment = line.partition("#")
        code = code.strip()
        if code.startswith("["):
            current, last = code.split("]")[0].strip("["), None
        elif "=" in code:
            last = (current, code.split("=")[0].strip())
            meanings[last] = comment.strip()
        elif line.startswith(" ") and comment and last:  # a comment's continuation line
            meanings[last] += " " + comment.strip()
        else:
            last = None
    sections = [("", TopLevel), *RUN_SECTIONS.items(), *method_sections().items()]
    rows = ["| section | key | type | default | meaning |", "|---|---|---|---|---|"]
    for name, cls in sections:
        types = field_types(cls)
        for f in fields(cls):
            default = "required" if f.default is MISSING else json.dumps(f.default)
            cells = [name and f"[{name}]", f"`{f.name}`", types[f.name], default,
                     meanings.get((name, f.name), "")]
            rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(rows)
