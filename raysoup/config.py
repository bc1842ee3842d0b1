"""`raysoup run` configuration: a TOML file read into typed sections.

Unknown sections or keys (typos) are errors that name the file and the key, raised before
any cluster work starts. Relative paths are relative to the config file.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path

from .inputs import storage
from .errors import RaysoupError
from .methods.manifold_mix import ManifoldMixConfig

Location = str  # a path (shared by every node) or a URI that pyarrow.fs reads (s3://, gs://)


@dataclass(frozen=True)
class PoolConfig:
    zoo: Location                 # a raysoup zoo: its manifest names model, ingredients, data
    verify_sha256: bool = True    # refuse files whose sha256 differs from the manifest's


@dataclass(frozen=True)
class ResourcesConfig:
    evaluators: int = 0           # 0: one per GPU, or one per CPU on a CPU-only cluster
    evaluation: str = "auto"      # auto | sharded | whole
    cpus_per_evaluator: float = 1.0
    gpus_per_evaluator: float = -1.0  # -1: 1 when the cluster has GPUs, else 0
    bf16: bool = False            # bf16 autocast on GPU evaluators
    eval_timeout_s: float = 600.0
    max_failures: int = 2         # retries of a failed trial before it is scored 0
    wait_for_autoscaler: bool = False  # evaluators may wait for nodes the cluster adds
    start_timeout_s: float = 600.0     # evaluators not up by then: fail loudly

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
class RunConfig:
    pool: PoolConfig
    out: Path
    method: ManifoldMixConfig = field(default_factory=ManifoldMixConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    source: Path | None = None    # the TOML file it came from
    # Methods to run on one shared ranking (all but manifold_mix in the driver process).
    methods: tuple[str, ...] = ("manifold_mix",)
    # Judge every ingredient on every set too (report rows and scatter plot); off, only the
    # ranking's val accuracies are reported: the full table costs N x all sets.
    report_ingredients: bool = False
    # The other methods' configs, by method name (a TOML section each); defaults if absent.
    options: dict = field(default_factory=dict)

    def __post_init__(self):
        from .methods import METHODS
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise RaysoupError(f"methods: unknown method(s) {unknown or '(none given)'}; "
                               f"known: {sorted(METHODS)}")

    def method_configs(self) -> dict[str, object]:
        """The config of every method in `methods` that has one (manifold_mix: `method`)."""
        from .methods import METHOD_INFO
        configs = {name: self.options.get(name) or METHOD_INFO[name].config()
                   for name in self.methods if METHOD_INFO[name].config is not None}
        if "manifold_mix" in self.methods:
            configs["manifold_mix"] = self.method
        return configs

    def fingerprint(self) -> dict:
        """What must not change between a run and its --resume."""
        # Through JSON, so it compares equal to the copy saved in a checkpoint.
        return json.loads(json.dumps({"pool": storage.resolve(self.pool.zoo),
                                      "method": self.method.to_dict()}))


def section(cls, table: dict, name: str, where: str, base: Path):
    """One TOML table into the dataclass `cls`; unknown keys name the file and the key."""
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(table) - set(known))
    if unknown:
        raise RaysoupError(f"{where}: unknown key(s) {', '.join(f'{name}.{k}' for k in unknown)}"
                           f"; known keys of [{name}]: {', '.join(sorted(known))}")
    values = {}
    for key, value in table.items():
        if known[key].type == "Location":
            value = storage.resolve(value, base)
        elif known[key].type in ("Path", "Path | None"):
            value = base / Path(value).expanduser()
        elif isinstance(value, list):
            value = tuple(value)
        values[key] = value
    try:
        return cls(**values)
    except TypeError as e:
        raise RaysoupError(f"{where}: bad [{name}] section: {e}") from e


def load_config(path: Path) -> RunConfig:
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except OSError as e:
        raise RaysoupError(f"cannot read config {path}: {e}") from e
    except tomllib.TOMLDecodeError as e:
        raise RaysoupError(f"{path} is not valid TOML: {e}") from e
    from .methods import METHOD_INFO
    method_sections = {name: info.config for name, info in METHOD_INFO.items()
                       if info.config is not None and name != "manifold_mix"}
    sections = {"pool": PoolConfig, "method": ManifoldMixConfig, "resources": ResourcesConfig,
                **method_sections}
    top_level = {"out", "methods", "report_ingredients"}
    unknown = sorted(set(raw) - set(sections) - top_level)
    if unknown:
        raise RaysoupError(f"{path}: unknown key(s) or section(s) {unknown}; known: "
                           f"{sorted([*sections, *top_level])}")
    if "pool" not in raw or "out" not in raw:
        raise RaysoupError(f"{path}: needs `out = \"DIR\"` and a [pool] section with `zoo`")
    base = path.parent
    return RunConfig(
        pool=section(PoolConfig, raw["pool"], "pool", str(path), base),
        out=base / Path(raw["out"]).expanduser(),
        method=section(ManifoldMixConfig, raw.get("method", {}), "method", str(path), base),
        resources=section(ResourcesConfig, raw.get("resources", {}), "resources", str(path),
                           base),
        source=path,
        methods=tuple(raw.get("methods", ("manifold_mix",))),
        report_ingredients=bool(raw.get("report_ingredients", False)),
        options={name: section(cls, raw[name], name, str(path), base)
                 for name, cls in method_sections.items() if name in raw})
