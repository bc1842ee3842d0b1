"""Peak memory of an evaluator actor vs the number of report sets it judges.

Every report set is split by rows across the evaluators, and each evaluator streams its
rows from the memory-mapped Arrow files a batch at a time, holding only its validation
shard resident. So an evaluator's peak memory should not grow with the report sets. This
writes K report sets of the same size (random 3x64x64 images, 40 MB each as uint8), starts
2 evaluator actors on a local Ray for each K (fresh processes), judges one model on every
set through the evaluator pool, and reads each actor's peak RSS (VmHWM). Target: peak at
K = 8 within 10 % of K = 1 (while the report data grows 8-fold).

    python benchmarks/report_memory/report_memory.py [--counts 1 2 4 8] [--rows 10000]
Appends one row per K to benchmarks/report_memory/results/report_memory.parquet and prints a table.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import ray

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/common.py
from common import append_result, machine, parse_args

from raysoup.components import partition
from raysoup.distributed.evaluators import EvaluatorPool, EvaluatorSpec, start_evaluators
from raysoup.evaluate import VAL
from raysoup.families import state_dict_template
from raysoup.inputs.data import EvalSet, EvalSetSource, write_eval_set
from raysoup.inputs.model import ModelSpec

TARGET_RATIO = 1.10
MIB = 1 << 20
SPEC = ModelSpec(
    image_size=64,
    in_channels=3,
    patch_size=16,
    width=64,
    layers=2,
    heads=2,
    embed_dim=32,
    mean=(0.5, 0.5, 0.5),
    std=(0.25, 0.25, 0.25),
)


def write_set(path: Path, name: str, rows: int, seed: int) -> EvalSetSource:
    rng = np.random.default_rng(seed)
    write_eval_set(
        EvalSet(
            name,
            rng.integers(0, 256, (rows, 3, 64, 64), dtype=np.uint8),
            rng.integers(0, SPEC.num_classes, rows),
        ),
        path,
    )
    return EvalSetSource(str(path))


def peak_mib(actor) -> float:
    """VmHWM of the actor's process (same machine), in MiB."""
    import os

    pid = ray.get(actor.__ray_call__.remote(lambda self: os.getpid()))
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--rows", type=int, default=10000, help="images per report set")
    args = parse_args(
        parser, Path(__file__).resolve().parent / "results", smoke={"counts": [1, 2], "rows": 200}
    )
    work = Path(tempfile.mkdtemp(prefix="raysoup-report-memory-"))
    val = write_set(work / "val.arrow", VAL, 2000, 0)
    reports = [
        write_set(work / f"r{i}.arrow", f"r{i}", args.rows, i + 1) for i in range(max(args.counts))
    ]
    import torch

    torch.manual_seed(0)
    weights = {k: torch.randn(v.shape) * 0.02 for k, v in state_dict_template(SPEC).items()}
    components = partition(list(weights), "whole-model")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    evaluators = EvaluatorSpec(count=2, mode="sharded", cpus=1.0, timeout_s=600)
    rows = []
    for k in args.counts:
        sources = {VAL: val, **{f"r{i}": reports[i] for i in range(k)}}
        actors = start_evaluators(SPEC, sources, components, evaluators)
        t0 = time.perf_counter()
        hits = EvaluatorPool(actors, evaluators, SPEC, sources).correctness(weights)
        seconds = time.perf_counter() - t0
        assert sum(len(h) for h in hits.values()) == 2000 + k * args.rows
        peaks = [peak_mib(a) for a in actors]
        for a in actors:
            ray.kill(a)
        data_mib = k * args.rows * 3 * 64 * 64 / MIB
        rows.append(
            {
                "report_sets": k,
                "report_mib": round(data_mib, 1),
                "peak_mib": round(max(peaks), 1),
                "judge_s": round(seconds, 2),
            }
        )
    ray.shutdown()
    shutil.rmtree(work)  # the report sets: 40 MB each at the default size
    base = rows[0]["peak_mib"]
    print(
        f"{'report sets':>11}  {'report data':>11}  {'peak per evaluator':>18}  "
        f"{'peak / peak(K=' + str(rows[0]['report_sets']) + ')':>16}  judge s"
    )
    for row in rows:
        row["ratio"] = round(row["peak_mib"] / base, 3)
        append_result(
            args.out,
            "report_memory",
            {**row, "rows_per_set": args.rows, **machine(args.allow_dirty)},
        )
        print(
            f"{row['report_sets']:>11}  {row['report_mib']:>8.0f} MiB  "
            f"{row['peak_mib']:>14.0f} MiB  {row['ratio']:>16.3f}  {row['judge_s']:.1f}"
        )
    worst = max(r["ratio"] for r in rows)
    print(f"largest ratio {worst:.3f} (target <= {TARGET_RATIO})")


if __name__ == "__main__":
    main()
