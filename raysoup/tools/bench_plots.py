"""Figures and the summary table of a `raysoup bench` table (bench.parquet).

accuracy_vs_budget.png   final val and OOD accuracy vs budget per optimiser, seed spread
best_so_far.png          best val accuracy seen vs evaluations
cost_quality.png         val and OOD accuracy vs wall time (the cost-quality frontier)
parallel.png             final val and OOD accuracy vs points in flight (k), same budget
betas.png                beta heatmaps, one per optimiser (its best cell on val)
granularity.png          the component-granularity ablation
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from ..evaluate import VAL, ood_sets
from ..report import provenance_note
from ..stats import format_difference, paired

CORRECTNESS = "correctness.parquet"  # per cell and set: every image right or wrong


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)


PANELS = (("val", "validation"), ("ood_avg", "OOD average"))  # left: decides; right: reports


def _references(rows: list[dict], ax, key: str) -> None:
    for r, style in zip([r for r in rows if r["kind"] == "reference"], ("--", ":")):
        ax.axhline(100 * r[key], color="0.4", ls=style, lw=1, label=r["optimizer"])


def _panels(rows: list[dict], path: Path, draw, xlabel: str, title: str) -> None:
    """Val (decides) and OOD average (reports) side by side; draw(ax, key) adds the lines."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, (key, label) in zip(axes, PANELS):
        draw(ax, key)
        _references(rows, ax, key)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{label} accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0].set_title(title)
    axes[1].legend(fontsize=7)
    _save(fig, path)


def accuracy_vs_budget(rows: list[dict], path: Path) -> None:
    grid = [r for r in rows if r["kind"] == "grid" and r["parallel"] == 1]

    def draw(ax, key):
        for opt in dict.fromkeys(r["optimizer"] for r in grid):
            budgets = sorted({r["budget"] for r in grid if r["optimizer"] == opt})
            acc = [
                [100 * r[key] for r in grid if r["optimizer"] == opt and r["budget"] == b]
                for b in budgets
            ]
            (line,) = ax.plot(budgets, [np.mean(a) for a in acc], marker="o", label=opt)
            ax.fill_between(
                budgets,
                [min(a) for a in acc],
                [max(a) for a in acc],
                color=line.get_color(),
                alpha=0.15,
            )

    _panels(
        rows,
        path,
        draw,
        "evaluations per component per pass",
        "final fused model: mean over seeds, band = min..max",
    )


def best_so_far(rows: list[dict], path: Path) -> None:
    plt = _plt()
    grid = [r for r in rows if r["kind"] == "grid" and r["parallel"] == 1]
    top = max(r["budget"] for r in grid)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    colors = {}
    for r in (r for r in grid if r["budget"] == top):
        color = colors.setdefault(r["optimizer"], f"C{len(colors)}")
        ax.plot(
            np.arange(1, len(r["best_so_far"]) + 1),
            100 * np.array(r["best_so_far"]),
            color=color,
            alpha=0.8,
            lw=1.2,
            label=r["optimizer"] if r["seed"] == min(x["seed"] for x in grid) else None,
        )
    ax.set_xlabel("evaluations")
    ax.set_ylabel("best validation accuracy so far (%)")
    ax.set_title(f"best-so-far, budget {top} per component, one line per seed")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    _save(fig, path)


def cost_quality(rows: list[dict], path: Path) -> None:
    plt = _plt()
    runs = [r for r in rows if r["kind"] == "grid"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    markers = {1: "o", 2: "s", 4: "^"}
    for ax, (key, label) in zip(axes, PANELS):
        colors = {}
        for r in runs:
            color = colors.setdefault(r["optimizer"], f"C{len(colors)}")
            ax.scatter(
                r["wall_s"],
                100 * r[key],
                color=color,
                marker=markers.get(r["parallel"], "D"),
                s=18 + 2 * r["budget"],
                alpha=0.75,
            )
        frontier, best = [], -1.0  # cheapest-first: a cell is on it if nothing cheaper beats it
        for r in sorted(runs, key=lambda r: r["wall_s"]):
            if r["val"] > best:
                best = r["val"]
                frontier.append(r)
        if key == "val":
            ax.plot(
                [r["wall_s"] for r in frontier],
                [100 * r["val"] for r in frontier],
                "k-",
                lw=1,
                label="val frontier",
            )
        for opt, color in colors.items():
            ax.scatter([], [], color=color, label=opt)
        ax.set_xscale("log")
        ax.set_xlabel("wall seconds per run (log)")
        ax.set_ylabel(f"{label} accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0].set_title("cost vs quality (marker: o k=1, s k=2, ^ k=4; size: budget)")
    axes[0].legend(fontsize=7)
    _save(fig, path)


def parallel(rows: list[dict], path: Path) -> None:
    """What asking k points before telling any costs the optimiser, at equal budgets."""
    grid = [r for r in rows if r["kind"] == "grid"]
    # Lines only where k > 1 was run: (optimiser, budget) pairs of the parallel cells.
    lines = sorted({(r["optimizer"], r["budget"]) for r in grid if r["parallel"] > 1})
    ks_run = sorted({r["parallel"] for r in grid})

    def draw(ax, key):
        for opt, budget in lines:
            cells = [r for r in grid if (r["optimizer"], r["budget"]) == (opt, budget)]
            ks = sorted({r["parallel"] for r in cells})
            # Like with like: only the seeds that every k of this line has.
            seeds = set.intersection(
                *({r["seed"] for r in cells if r["parallel"] == k} for k in ks)
            )
            acc = [
                np.mean([100 * r[key] for r in cells if r["parallel"] == k and r["seed"] in seeds])
                for k in ks
            ]
            ax.plot(ks, acc, marker="o", label=f"{opt} b{budget}")
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks_run, [str(k) for k in ks_run])

    _panels(
        rows,
        path,
        draw,
        "points in flight (k)",
        "final fused model vs parallel trials (mean over shared seeds)",
    )


def betas(rows: list[dict], path: Path) -> None:
    plt = _plt()
    grid = [r for r in rows if r["kind"] == "grid"]
    best = {}
    for r in grid:
        if r["optimizer"] not in best or r["val"] > best[r["optimizer"]]["val"]:
            best[r["optimizer"]] = r
    fig, axes = plt.subplots(1, len(best), figsize=(3.2 * len(best), 3.2), squeeze=False)
    for ax, (opt, r) in zip(axes[0], best.items()):
        b = np.array(r["betas"])
        ax.imshow(b, cmap="viridis", vmin=0, vmax=1, aspect="auto")
        ax.set_xticks(
            range(b.shape[1]),
            [c.split(".")[-1] for c in r["component_names"]],
            rotation=45,
            ha="right",
            fontsize=6,
        )
        ax.set_yticks(range(b.shape[0]), r["ingredients"], fontsize=6)
        for (i, j), v in np.ndenumerate(b):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6, color="w")
        ax.set_title(
            f"{opt} b{r['budget']} k{r['parallel']} s{r['seed']}\nval {100 * r['val']:.2f}",
            fontsize=8,
        )
    _save(fig, path)


def granularity(rows: list[dict], path: Path) -> None:
    plt = _plt()
    cells = [r for r in rows if r["kind"] == "ablation"]
    names = [
        f"{r['components']}\n({r['n_components']})" + (" no unused" if r["drop_unused"] else "")
        for r in cells
    ]
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(cells)), 4.2))
    pos = np.arange(len(cells))
    ax.bar(pos - 0.2, [100 * r["val"] for r in cells], 0.4, label="val")
    ax.bar(pos + 0.2, [100 * r["ood_avg"] for r in cells], 0.4, label="OOD average")
    _references(rows, ax, "val")
    lo = min(100 * min(r["val"], r["ood_avg"]) for r in cells)
    ax.set_ylim(lo - 3, None)
    ax.set_xticks(pos, names, fontsize=7)
    ax.set_ylabel("accuracy (%)")
    ax.set_title("component granularity (same optimiser and budget per component)")
    ax.legend(fontsize=7)
    _save(fig, path)


def versus(cells: list[dict], baselines: list[dict], correct: dict, metric: str) -> dict | None:
    """Cells (one per seed) minus their baselines, paired on the same images: every (seed,
    set) a stratum, so the difference is the mean over seeds of the metric's difference."""
    if not baselines or any(r["cell"] not in correct for r in [*cells, *baselines]):
        return None
    a, b = [], []
    for cell, base in zip(cells, baselines):
        names = [VAL] if metric == "val" else ood_sets(correct[cell["cell"]])
        a += [correct[cell["cell"]][n] for n in names]
        b += [correct[base["cell"]][n] for n in names]
    return paired(a, b)


def summary_table(
    rows: list[dict], correct: dict | None = None, reference_optimizer: str = "NGOpt"
) -> str:
    """Markdown: per optimiser, budget and parallelism, means over seeds (min to max), and
    the paired differences against the reference optimiser at the same budget and seeds
    (one trial at a time) and against greedy soup."""
    correct = correct or {}
    lines = [
        (
            f"| optimiser | budget/comp | k | seeds | val (min–max) | OOD avg (min–max) | "
            f"val − {reference_optimizer} | OOD − {reference_optimizer} | val − greedy | "
            f"OOD − greedy | evals | wall s |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    grid = [r for r in rows if r["kind"] == "grid"]
    greedy = [r for r in rows if r["cell"] == "reference/greedy_soup"]
    keys = sorted(
        {(r["optimizer"], r["budget"], r["parallel"]) for r in grid},
        key=lambda k: (k[0], k[2], k[1]),
    )

    def spread(cell: list[dict], key: str) -> str:
        values = [100 * r[key] for r in cell]
        return f"{np.mean(values):.2f}" + (
            f" ({min(values):.2f}–{max(values):.2f})" if len(values) > 1 else ""
        )

    for opt, budget, k in keys:
        cell = sorted(
            [r for r in grid if (r["optimizer"], r["budget"], r["parallel"]) == (opt, budget, k)],
            key=lambda r: r["seed"],
        )
        reference = {
            r["seed"]: r
            for r in grid
            if (r["optimizer"], r["budget"], r["parallel"]) == (reference_optimizer, budget, 1)
        }
        paired_cells = [r for r in cell if r["seed"] in reference]
        diffs = [
            versus(paired_cells, [reference[r["seed"]] for r in paired_cells], correct, m)
            if opt != reference_optimizer or k != 1
            else None
            for m in ("val", "ood_avg")
        ]
        diffs += [versus(cell, greedy * len(cell), correct, m) for m in ("val", "ood_avg")]
        lines.append(
            f"| {opt} | {budget} | {k} | {len(cell)} | {spread(cell, 'val')} | "
            f"{spread(cell, 'ood_avg')} | "
            + " | ".join(format_difference(d).strip() for d in diffs)
            + " | "
            f"{np.mean([r['evaluations'] for r in cell]):.0f} | "
            f"{np.mean([r['wall_s'] for r in cell]):.0f} |"
        )
    for r in rows:
        if r["kind"] in ("reference", "ablation"):
            name = (
                r["optimizer"]
                if r["kind"] == "reference"
                else f"ablation {r['components']}"
                + (" (unused dropped)" if r["drop_unused"] else "")
            )
            lines.append(
                f"| {name} | | | | {100 * r['val']:.2f} | {100 * r['ood_avg']:.2f} | "
                f"| | | | {r['evaluations']} | {r['wall_s']:.0f} |"
            )
    return "\n".join(lines) + (
        "\n\n(accuracies in %; differences in points, paired on the same images, with 95 % "
        "bootstrap intervals over images (seeds and shifts as strata), * where the interval "
        "excludes 0; -: the reference optimiser itself, or no per-image results recorded)\n\n"
        + provenance_note(rows)
    )


def read_correctness(path: Path) -> dict[str, dict[str, np.ndarray]]:
    """cell -> set -> per-image correctness (the last rows written for a cell win)."""
    if not Path(path).exists():
        return {}
    out: dict[str, dict[str, np.ndarray]] = {}
    for r in pq.read_table(path).to_pylist():
        out.setdefault(r["cell"], {})[r["set"]] = np.array(r["correct"], dtype=bool)
    return out


def write_all(table: Path, out_dir: Path) -> list[Path]:
    rows = pq.read_table(table).to_pylist()
    out_dir = Path(out_dir)
    paths = []
    for name, draw in [
        ("accuracy_vs_budget", accuracy_vs_budget),
        ("best_so_far", best_so_far),
        ("cost_quality", cost_quality),
        ("parallel", parallel),
        ("betas", betas),
        ("granularity", granularity),
    ]:
        # Curves over budgets and best-so-far need one-trial-at-a-time cells (k = 1), the
        # parallel plot cells with k > 1.
        needs = {
            "granularity": lambda r: r["kind"] == "ablation",
            "accuracy_vs_budget": lambda r: r["kind"] == "grid" and r["parallel"] == 1,
            "best_so_far": lambda r: r["kind"] == "grid" and r["parallel"] == 1,
            "parallel": lambda r: r["kind"] == "grid" and r["parallel"] > 1,
        }.get(name, lambda r: r["kind"] == "grid")
        if any(needs(r) for r in rows):
            draw(rows, out_dir / f"{name}.png")
            paths.append(out_dir / f"{name}.png")
    correct = read_correctness(Path(table).with_name(CORRECTNESS))
    (out_dir / "summary.md").write_text(summary_table(rows, correct) + "\n")
    return paths + [out_dir / "summary.md"]
