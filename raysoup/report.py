"""The run report: a printed table, report.json, results.parquet and scatter.png."""

from __future__ import annotations

import os
import platform
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import RaysoupError
from .inputs.storage import atomic, write_json
from .stats import CONFIDENCE, OOD_AVG, format_difference


def format_table(
    rows: dict[str, dict], references: dict[str, dict] | None = None, metric: str = ""
) -> str:
    """Method x (val, id, each OOD set, OOD avg, ingredients, evaluations, wall seconds),
    then the reference models (e.g. pretrained) in one line. `metric`: the run's own
    metric ("" = top-1 accuracy)."""
    shifts = list(next(iter(rows.values()))["ood"])
    header = ["method", "val", "id", *shifts, "ood_avg", "ingr", "evals", "wall_s"]

    def pct(accuracy: float | None) -> str:  # a manifest may have no id or ood sets
        return "-" if accuracy is None else f"{100 * accuracy:.2f}"

    lines = []
    for name, r in rows.items():
        lines.append(
            [
                name,
                pct(r["val"]),
                pct(r["id"]),
                *(pct(r["ood"][s]) for s in shifts),
                pct(r["ood_avg"]),
                str(len(r["ingredients"])),
                str(r["evaluations"]),
                f"{r['wall_s']:.1f}",
            ]
        )
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]

    def fmt(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
        )

    refs = "".join(
        f"; {name}: val {pct(r['val'])}, id {pct(r['id'])}, ood_avg {pct(r['ood_avg'])}"
        for name, r in (references or {}).items()
    )
    table = "\n".join([fmt(header), fmt(["-" * w for w in widths]), *map(fmt, lines)]) + (
        f"\n({f'mean {metric} scores' if metric else 'accuracies'} in %{refs}; "
        f"only val decides, id and ood only report)"
    )
    close = [
        f"{name} {c['tie']} by a tie and {c['one image']} by one image"
        for name, r in rows.items()
        if (c := r.get("close_decisions")) and any(c.values())
    ]
    if close:
        table += (
            "\n(close verdicts on val, which another CPU's last bits could turn: "
            + "; ".join(close)
            + ")"
        )
    differences = format_differences(rows)
    return table + ("\n\n" + differences if differences else "")


def format_differences(rows: dict[str, dict], metrics=("val", "id", OOD_AVG)) -> str:
    """Each method minus each baseline it was compared with, paired on the same images."""
    lines = [
        [
            name,
            baseline,
            *(format_difference(c.get(m)) for m in metrics),
            *(f"{c[m]['p']:.2g}" if m in c and c[m]["p"] is not None else "-" for m in metrics),
        ]
        for name, r in rows.items()
        for baseline, c in r.get("vs", {}).items()
    ]
    no_mcnemar = any(
        c["p"] is None
        for r in rows.values()
        for per_set in r.get("vs", {}).values()
        for c in per_set.values()
    )
    if not lines:
        return ""
    header = ["method", "minus", *metrics, *(f"p_{m}" for m in metrics)]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]

    def fmt(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
        )

    return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *map(fmt, lines)]) + (
        f"\n(paired differences in points on the same images, [{100 * CONFIDENCE:.0f} % "
        f"bootstrap interval], * where it excludes 0; p: exact McNemar test"
        + (
            "; p -: McNemar does not apply to scores other than 0 and 1, the interval alone tells"
            if no_mcnemar
            else ""
        )
        + ")"
    )


def comparison_columns(versus: dict[str, dict]) -> dict:
    """`{baseline}.{set}.{diff|lo|hi|p}` for every comparison of a row."""
    return {
        f"{baseline}.{metric}.{key}": c[key]
        for baseline, per_set in versus.items()
        for metric, c in per_set.items()
        for key in ("diff", "lo", "hi", "p")
    }


def results_table(rows: dict[str, dict], kind: str) -> pa.Table:
    records = [
        {
            "name": name,
            "kind": kind,
            "val": r["val"],
            "id": r["id"],
            "ood_avg": r["ood_avg"],
            **{f"ood_{s}": a for s, a in r["ood"].items()},
            "ingredients": list(r.get("ingredients", [name])),
            "evaluations": r.get("evaluations"),
            "wall_s": r.get("wall_s"),
            **comparison_columns(r.get("vs", {})),
        }
        for name, r in rows.items()
    ]
    # Every row's columns (from_pylist would take the first row's alone), None where absent.
    columns = list(dict.fromkeys(k for record in records for k in record))
    return pa.Table.from_pylist([{k: record.get(k) for k in columns} for record in records])


def correctness_table(correctness: dict[str, dict[str, np.ndarray]]) -> pa.Table:
    """One row per (model, set): the per-image correctness behind every comparison
    (`correct`, booleans), or, where a metric gives other scores than 0 and 1, the scores
    (`score`, floats)."""
    from .stats import is_binary

    every = [hits for per_set in correctness.values() for hits in per_set.values()]
    column, kind = ("correct", bool) if is_binary(every) else ("score", np.float64)
    return pa.Table.from_pylist(
        [
            {"name": name, "set": set_name, column: hits.astype(kind).tolist()}
            for name, per_set in correctness.items()
            for set_name, hits in per_set.items()
        ]
    )


def scatter_plot(
    methods: dict[str, dict],
    ingredients: dict[str, dict],
    path: Path,
    references: dict[str, dict] | None = None,
) -> None:
    """ID accuracy vs OOD average, one point per ingredient and per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 5))
    ax.scatter(
        [100 * r["id"] for r in ingredients.values()],
        [100 * r["ood_avg"] for r in ingredients.values()],
        c="0.6",
        s=22,
        label="ingredients (fine-tunes)",
    )
    for name, r in (references or {}).items():
        ax.scatter(100 * r["id"], 100 * r["ood_avg"], marker="x", c="k", s=50, label=name)
    markers = iter("o^sDPv*Xh<>p")
    for name, r in methods.items():
        ax.scatter(
            100 * r["id"],
            100 * r["ood_avg"],
            marker=next(markers, "o"),
            s=70,
            label=name,
            edgecolors="k",
            zorder=3,
        )
    ax.set_xlabel("ID test accuracy (%)")
    ax.set_ylabel("OOD accuracy, mean over shifts (%)")
    ax.set_title("Soups vs ingredients")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def draw_scatter(report: dict, path: Path) -> bool:
    """scatter.png of a report, if its manifest has both ID and OOD sets (else False)."""
    points = [*report["methods"].values(), *report.get("ingredients", {}).values()]
    if not all(r["id"] is not None and r["ood_avg"] is not None for r in points):
        return False
    scatter_plot(report["methods"], report.get("ingredients", {}), path, report.get("references"))
    return True


def write_report(
    run_dir: Path, report: dict, correctness: dict[str, dict[str, np.ndarray]] | None = None
) -> None:
    """Each output written atomically, report.json last, so a run that fails part-way never
    leaves a report that looks complete."""
    run_dir = Path(run_dir)
    tables = [
        results_table(report["methods"], "method"),
        results_table(report.get("ingredients", {}), "ingredient"),
    ]
    with atomic(run_dir / "results.parquet") as tmp:
        pq.write_table(pa.concat_tables(tables, promote_options="default"), tmp)
    if correctness:
        with atomic(run_dir / "correctness.parquet") as tmp:
            pq.write_table(correctness_table(correctness), tmp)
    with atomic(run_dir / "scatter.png") as tmp:
        draw_scatter(report, tmp)
    write_json(run_dir / "report.json", report)


# A committed result row measured before rows recorded their provenance (see
# benchmarks/PROVENANCE.md): the commit is inferred from git history, if at all.
PRE_PROVENANCE = "unknown (pre-provenance)"


def git_state(checkout: Path = Path(__file__).parent) -> tuple[str, bool]:
    """(`git describe --always --dirty` of the checkout, whether it has uncommitted edits);
    ("unknown", True) outside a git checkout: code that cannot be named counts as dirty."""
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            cwd=checkout,
            check=False,
        )
    except OSError:
        return "unknown", True
    described = out.stdout.strip()
    if out.returncode or not described:
        return "unknown", True
    return described, described.endswith("-dirty")


def machine(allow_dirty: bool = False, checkout: Path = Path(__file__).parent) -> dict:
    """Where and with what a result was measured: time, git commit and whether the tree was
    dirty, hardware, versions. Refuses (RaysoupError) a tree with uncommitted edits or no
    git commit at all, unless `allow_dirty`: then the rows say dirty = true."""
    import ray
    import torch

    commit, dirty = git_state(checkout)
    if dirty and not allow_dirty:
        raise RaysoupError(
            f"the code in {checkout} is not a clean git commit (git describe: "
            f"{commit}): a result row must name the code that measured it; "
            f"commit first, or pass --allow-dirty, which marks the rows "
            f"dirty = true"
        )
    return {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": commit,
        "dirty": dirty,
        "cpus": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
        "torch": torch.__version__,
        "ray": ray.__version__,
        "python": platform.python_version(),
    }


def provenance_note(rows: list[dict]) -> str:
    """One line for a results summary: which commits measured its rows, and how many were
    measured on a dirty tree or before rows recorded their commit."""
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.get("commit") or "none"] = counts.get(r.get("commit") or "none", 0) + 1
    line = "Commits of these rows: " + ", ".join(f"{c} ({n})" for c, n in counts.items())
    if any(r.get("commit") == PRE_PROVENANCE for r in rows):
        line += (
            f". Rows marked {PRE_PROVENANCE} were measured before rows recorded their "
            f"commit (`git describe` failed and wrote nothing); their `committed_in` "
            f"names the commit that added them, so the code ran on that commit's "
            f"parent plus uncommitted edits (benchmarks/PROVENANCE.md)"
        )
    return line + "."


def append_rows(path: Path, rows: list[dict]) -> None:
    """Append rows to a Parquet table (columns may grow); written whole, then renamed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows)
    if path.exists():
        table = pa.concat_tables([pq.read_table(path), table], promote_options="default")
    with atomic(path) as tmp:
        pq.write_table(table, tmp)
