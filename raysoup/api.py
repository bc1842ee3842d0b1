"""The Python API for notebooks: run a config, reopen a finished run, as typed results.

import raysoup
report = raysoup.run("examples/run.toml")          # or a RunConfig
report = raysoup.load_report("runs/demo-...")      # a finished run: a path or a URI
print(report.table())
report.methods["manifold_mix"].ood_avg, report.best("val")
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .errors import RaysoupError
from .inputs import storage


@dataclass(frozen=True)
class MethodRow:
    """One method's (or ingredient's) line of a report; accuracies in [0, 1]."""

    name: str
    val: float
    id: float | None
    ood: dict[str, float]
    ood_avg: float | None
    ingredients: list[str]
    evaluations: int | None = None
    wall_s: float | None = None
    vs: dict = field(default_factory=dict)  # paired comparisons: {baseline: {set: {...}}}

    @classmethod
    def from_row(cls, name: str, row: dict) -> MethodRow:
        return cls(
            name,
            row["val"],
            row.get("id"),
            row.get("ood", {}),
            row.get("ood_avg"),
            row.get("ingredients", [name]),
            row.get("evaluations"),
            row.get("wall_s"),
            row.get("vs", {}),
        )


@dataclass(frozen=True)
class Report:
    path: str  # the run's `out`: a path or a URI
    methods: dict[str, MethodRow]
    ingredients: dict[str, MethodRow]
    references: dict[str, MethodRow]
    ranking: list[tuple[str, float]]
    raw: dict  # report.json as written

    def table(self) -> str:
        """The table `raysoup run` printed, with the paired differences."""
        from .report import format_table

        return format_table(
            self.raw["methods"],
            self.raw.get("references"),
            self.raw.get("config", {}).get("metric", ""),
        )

    def best(self, metric: str = "val") -> str:
        """The method with the highest `metric` (val, id or ood_avg); val is what decides."""
        return max(self.methods, key=lambda m: getattr(self.methods[m], metric) or 0.0)


def load_report(run_dir: str | Path) -> Report:
    path = str(run_dir)
    location = storage.join(path, "report.json")
    try:
        raw = json.loads(storage.read_bytes(location))
    except RaysoupError as e:
        raise RaysoupError(
            f"{path} holds no finished run (no readable report.json: {str(e).splitlines()[0]})"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RaysoupError(f"{location} is not valid JSON: {e}") from None

    def rows(section: str) -> dict[str, MethodRow]:
        return {n: MethodRow.from_row(n, r) for n, r in raw.get(section, {}).items()}

    return Report(
        path,
        rows("methods"),
        rows("ingredients"),
        rows("references"),
        [tuple(r) for r in raw.get("ranking", [])],
        raw,
    )


def run(config, resume: bool = False, address: str | None = None) -> Report:
    """Run a config (a TOML path or a raysoup.config.RunConfig) and return its report."""
    from .config import RunConfig, load_config
    from .runner import execute

    if not isinstance(config, RunConfig):
        config = load_config(Path(config))
    execute(config, resume=resume, address=address)
    return load_report(config.out)
