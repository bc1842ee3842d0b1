"""Peak memory vs pool size: a large ingredient pool is never loaded at once.

Ingredients stream from disk, so only the fused model and the current candidate (plus the
evaluator's model and validation set) should be resident, whatever the pool's size. This
builds pools of N ingredients (default 8, 24, 72) from a zoo's real fine-tunes, ingredient
i = zoo fine-tune (i mod k) plus small deterministic noise (each a distinct safetensors
file), and in a fresh process per N loads and validates the pool, ranks it on val, and
runs the uniform soup, the greedy soup and ManifoldMix (in-process search, a tiny budget).
It records the process's peak RSS after each phase and its wall seconds. Target: peak RSS
at the largest N within ~10 % of the smallest N's (while N x one ingredient grows 9-fold).

Peak RSS is VmHWM from /proc/self/status (Linux), not getrusage's ru_maxrss: a child's
ru_maxrss starts at its parent's RSS when it was spawned (the kernel keeps the high-water
mark across fork and exec), so it would report this script's own size, not the pool's.

    python benchmarks/pool_memory/pool_memory.py [--zoo DIR] [--work DIR] [--counts 8 24 72]
Appends one row per N to benchmarks/pool_memory/results/pool_memory.parquet and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/common.py
from common import append_result, machine, parse_args

from raysoup.components import partition
from raysoup.config import SearchConfig
from raysoup.evaluate import VAL, Evaluator, load_eval_sets
from raysoup.inputs.pool import IngredientPool, read_manifest
from raysoup.inputs.storage import write_json
from raysoup.inputs.tasks import eval_set_sources
from raysoup.inputs.weights import load_state_dict, save_state_dict
from raysoup.methods import METHODS, SoupContext, ValidationJudge
from raysoup.methods.manifold_mix import ManifoldMixConfig
from raysoup.search import LocalSearch

TARGET_RATIO = 1.10  # peak RSS at the largest N over the smallest N's
MIB = 1 << 20


def noisy_copy(state_dict: dict, noise: float, seed: int) -> dict:
    """Each float tensor plus Gaussian noise of `noise` x its RMS, seeded: files differ."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in state_dict.items():
        if value.is_floating_point():
            rms = value.float().pow(2).mean().sqrt()
            value = value + (noise * rms * torch.randn(value.shape, generator=gen)).to(value.dtype)
        out[key] = value
    return out


def write_ingredients(zoo: Path, folder: Path, count: int, noise: float) -> list[dict]:
    """`count` ingredient files in `folder`; returns their manifest entries."""
    sources = read_manifest(zoo)["ingredients"]
    entries = []
    for i in range(count):
        source = sources[i % len(sources)]
        name = f"ing-{i:03d}"
        state_dict = noisy_copy(load_state_dict(zoo / source["file"]), noise, seed=i)
        save_state_dict(
            state_dict,
            folder / f"{name}.safetensors",
            metadata={"source": source["name"], "noise": noise},
        )
        entries.append(
            {"name": name, "file": f"ingredients/{name}.safetensors", "source": source["name"]}
        )
    return entries


def link_or_copy(source: Path, target: Path) -> None:
    """A hard link (no extra bytes on disk), or a copy across file systems."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def build_pools(zoo: Path, work: Path, counts: list[int], noise: float) -> dict[int, Path]:
    """One zoo-format directory per N, sharing the ingredient files (pool N = the first N)
    and the zoo's evaluation sets as hard links (a pool refuses symlinks out of its zoo)."""
    shared = work / "ingredients"
    entries = write_ingredients(zoo, shared, max(counts), noise)
    manifest = read_manifest(zoo)
    pools = {}
    for n in counts:
        pool_dir = work / f"pool-{n:03d}"
        if not (pool_dir / "data").is_dir():
            shutil.copytree(zoo / "data", pool_dir / "data", copy_function=link_or_copy)
        (pool_dir / "ingredients").mkdir(parents=True, exist_ok=True)
        for entry in entries[:n]:
            if not (pool_dir / entry["file"]).exists():
                link_or_copy(work / entry["file"], pool_dir / entry["file"])
        write_json(
            pool_dir / "manifest.json",
            {
                "format": manifest["format"],
                "model": manifest["model"],
                "eval_sets": manifest["eval_sets"],
                "ingredients": entries[:n],
                "derived_from": str(zoo),
                "noise": noise,
            },
        )
        pools[n] = pool_dir
    return pools


class Phases:
    """Wall seconds and peak RSS so far after each phase."""

    def __init__(self):
        self.row = {"rss_imports_mib": peak_rss_mib()}

    def run(self, name: str, fn):
        t0 = time.perf_counter()
        result = fn()
        self.row[f"{name}_s"] = round(time.perf_counter() - t0, 2)
        self.row[f"rss_{name}_mib"] = peak_rss_mib()
        return result


def peak_rss_mib() -> float:
    """This process's peak resident set since it started (VmHWM, in KiB there)."""
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE).group(1)) / 1024


def measure(pool_dir: Path, evals_per_component: int) -> dict:
    """Every phase on one pool, in this process; returns the phase timings and RSS."""
    phases = Phases()
    pool = phases.run("load", lambda: IngredientPool.from_zoo(pool_dir))
    phases.run("validate", pool.validate)
    evaluator = Evaluator(
        pool.spec,
        load_eval_sets({VAL: eval_set_sources(pool_dir)[VAL]}, pool.spec.num_classes),
        device="cpu",
    )
    judge = ValidationJudge(evaluator.accuracy)
    ctx = phases.run("rank", lambda: SoupContext.rank(pool, judge))
    uniform = phases.run("uniform_soup", lambda: METHODS["uniform_soup"](ctx))
    greedy = phases.run("greedy_soup", lambda: METHODS["greedy_soup"](ctx))
    config = ManifoldMixConfig(evals_per_component=evals_per_component)
    components = partition(list(pool.load(pool.names[0])), SearchConfig().components)
    ctx.components, ctx.search = components, LocalSearch(judge, components)
    mixed = phases.run("manifold_mix", lambda: METHODS["manifold_mix"](ctx, config))
    return {
        **phases.row,
        "peak_rss_mib": peak_rss_mib(),
        "evaluations": judge.evaluations,
        "uniform_val": judge(uniform.state_dict),
        "greedy_kept": len(greedy.ingredients),
        "greedy_val": judge(greedy.state_dict),
        "mix_accepted": len(mixed.ingredients),
        "mix_val": mixed.details.val_accuracy,
    }


def measure_in_subprocess(pool_dir: Path, evals_per_component: int) -> dict:
    """`measure` in a fresh interpreter, so its peak RSS belongs to this pool alone."""
    # --allow-dirty: the parent checked the tree; this process writes no row.
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--measure",
            str(pool_dir),
            "--evals-per-component",
            str(evals_per_component),
            "--allow-dirty",
        ],
        check=True,
        stdout=subprocess.PIPE,
        text=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def print_table(rows: list[dict]) -> None:
    """`over imports`: the peak less the RSS right after the imports (torch's libraries
    alone are most of the peak), i.e. what the pool and the methods added."""
    print(
        f"{'N':>4}  {'peak RSS MiB':>12}  {'over imports':>12}  {'one ingr. MiB':>13}  "
        f"{'N x ingr. MiB':>13}  {'ratio':>6}  {'wall s':>7}"
    )
    for r in rows:
        print(
            f"{r['n']:>4}  {r['peak_rss_mib']:>12.1f}  "
            f"{r['peak_rss_mib'] - r['rss_imports_mib']:>12.1f}  "
            f"{r['ingredient_bytes'] / MIB:>13.2f}  {r['pool_bytes'] / MIB:>13.1f}  "
            f"{r['ratio']:>6.3f}  {r['wall_s']:>7.1f}"
        )
    verdict = "met" if rows[-1]["ratio"] <= TARGET_RATIO else "MISSED"
    print(f"target peak({rows[-1]['n']}) <= {TARGET_RATIO:.2f} x peak({rows[0]['n']}): {verdict}")


def run(
    zoo: Path,
    work: Path,
    counts: list[int],
    noise: float,
    evals_per_component: int,
    out: Path,
    allow_dirty: bool,
) -> list[dict]:
    pools = build_pools(zoo, work, counts, noise)
    ingredient_bytes = (pools[counts[0]] / "ingredients" / "ing-000.safetensors").stat().st_size
    rows, where = [], machine(allow_dirty)
    for n in counts:
        t0 = time.perf_counter()
        result = measure_in_subprocess(pools[n], evals_per_component)
        rows.append(
            {
                **where,
                "zoo": str(zoo),
                "n": n,
                "noise": noise,
                "evals_per_component": evals_per_component,
                "ingredient_bytes": ingredient_bytes,
                "pool_bytes": n * ingredient_bytes,
                "wall_s": round(time.perf_counter() - t0, 1),
                **result,
            }
        )
        print(
            f"[pool_memory] N={n}: peak RSS {result['peak_rss_mib']:.1f} MiB "
            f"({rows[-1]['wall_s']:.0f} s)",
            flush=True,
        )
    for row in rows:
        row["ratio"] = row["peak_rss_mib"] / rows[0]["peak_rss_mib"]
        append_result(out, "pool_memory", row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--zoo",
        type=Path,
        default=None,
        help="zoo to draw ingredients from (default: the demo's quick zoo)",
    )
    parser.add_argument(
        "--work",
        type=Path,
        default=None,
        help="where to build the pools (default: a temporary directory)",
    )
    parser.add_argument("--counts", type=int, nargs="+", default=[8, 24, 72])
    parser.add_argument(
        "--noise",
        type=float,
        default=0.01,
        help="noise added to each weight tensor, relative to its RMS",
    )
    parser.add_argument(
        "--evals-per-component",
        type=int,
        default=2,
        help="ManifoldMix budget per component per pass",
    )
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # the per-N process
    args = parse_args(
        parser,
        Path(__file__).resolve().parent / "results",
        smoke={"counts": [2, 3], "evals_per_component": 1},
    )
    if args.measure is not None:
        print(json.dumps(measure(args.measure, args.evals_per_component)))
        return
    if args.zoo is None:
        from raysoup.tools.demo import demo_zoo

        args.zoo = demo_zoo(quick=True)
    counts = sorted(set(args.counts))
    if args.work is not None:
        rows = run(
            args.zoo.resolve(),
            args.work.resolve(),
            counts,
            args.noise,
            args.evals_per_component,
            args.out,
            args.allow_dirty,
        )
    else:
        with tempfile.TemporaryDirectory(prefix="raysoup-pool-memory-") as work:
            rows = run(
                args.zoo.resolve(),
                Path(work),
                counts,
                args.noise,
                args.evals_per_component,
                args.out,
                args.allow_dirty,
            )
    print_table(rows)


if __name__ == "__main__":
    main()
