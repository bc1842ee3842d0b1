"""Shared by the benchmarks: machine description, result tables, the default zoo."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

RESULTS = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(RESULTS.parent.parent))  # run from a checkout without installing


def machine() -> dict:
    import ray
    import torch
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, cwd=RESULTS.parent).stdout.strip()
    except OSError:
        commit = ""
    return {"when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "commit": commit, "cpus": os.cpu_count(), "cpu": platform.processor() or
            platform.machine(), "gpu": torch.cuda.get_device_name(0)
            if torch.cuda.is_available() else "none", "torch": torch.__version__,
            "ray": ray.__version__, "python": platform.python_version()}


def append_result(name: str, row: dict) -> None:
    """Append one row to benchmarks/results/NAME.parquet (columns may grow)."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.parquet"
    table = pa.Table.from_pylist([row])
    if path.exists():
        table = pa.concat_tables([pq.read_table(path), table], promote_options="default")
    pq.write_table(table, path)


def default_zoo() -> Path:
    """The demo's cached zoo (`raysoup demo` builds it)."""
    from raysoup.demo import default_zoo_dir
    from raysoup.zoo import ZooConfig
    zoo = default_zoo_dir(ZooConfig())
    if not (zoo / "manifest.json").exists():
        raise SystemExit(f"no zoo at {zoo}: run `raysoup demo` first or pass --zoo DIR")
    return zoo
