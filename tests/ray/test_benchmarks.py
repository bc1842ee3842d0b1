"""Every benchmark script's --smoke mode: it runs, writes its rows into --out (never into
the committed results), and its process exits when it is done."""

import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

BENCHMARKS = Path(__file__).parents[2] / "benchmarks"


def committed() -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in BENCHMARKS.glob("*/results/**/*") if p.is_file()}


def smoke(name: str, out: Path, *args: str, timeout: int = 240) -> str:
    """Runs benchmarks/NAME/NAME.py --smoke into `out`; fails if it does not exit in time
    (a leftover thread or process keeps a finished script alive)."""
    before = committed()
    cmd = [
        sys.executable,
        str(BENCHMARKS / name / f"{name}.py"),
        "--smoke",
        "--out",
        str(out),
        *args,
    ]
    done = subprocess.run(
        cmd,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert committed() == before  # the committed results are untouched
    return done.stdout


def rows(path: Path) -> list[dict]:
    table = pq.read_table(path).to_pylist()
    for row in table:  # --smoke implies --allow-dirty: the row says which tree it ran on
        assert row["commit"] and row["dirty"] == row["commit"].endswith("-dirty")
    return table


def test_every_benchmark_folder_has_its_script_readme_results_and_a_smoke_test():
    names = sorted(
        p.name for p in BENCHMARKS.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))
    )
    assert len(names) >= 10
    for name in names:
        assert f"test_{name}_smoke" in globals(), name
        for part in (f"{name}.py", "README.md", "results"):
            assert (BENCHMARKS / name / part).exists(), f"benchmarks/{name}/{part}"


def test_the_arguments_refuse_a_dirty_tree_unless_allowed_and_smoke_allows_it(
    monkeypatch, tmp_path, capsys
):
    """benchmarks/common.parse_args on a tree that is not a git checkout (so, dirty)."""
    import argparse
    import tempfile

    from raysoup.report import machine

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import common

    monkeypatch.setattr(common, "machine", lambda allow_dirty: machine(allow_dirty, tmp_path))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # --smoke's folders

    def parse(*argv: str) -> argparse.Namespace:
        monkeypatch.setattr(sys, "argv", ["bench.py", *argv])
        parser = argparse.ArgumentParser()
        parser.add_argument("--n", type=int, default=5)
        return common.parse_args(parser, tmp_path / "results", smoke={"n": 1})

    with pytest.raises(SystemExit) as exit_:
        parse("--n", "2")
    assert exit_.value.code == 2
    assert "not a clean git commit" in capsys.readouterr().err
    args = parse("--allow-dirty")
    assert (args.n, args.out, args.smoke) == (5, tmp_path / "results", False)
    args = parse("--smoke")
    assert args.allow_dirty and args.n == 1 and args.out.is_dir()
    assert args.out.parent == tmp_path / "tmp"  # a new temporary folder, not results/
    assert parse("--smoke", "--n", "3").n == 3  # explicit arguments win


def test_throughput_smoke(tmp_path):
    smoke("throughput", tmp_path)
    assert [r["model"] for r in rows(tmp_path / "throughput.parquet")] == ["tiny", "vit-b-32"]


@pytest.mark.slow  # four fresh interpreters, each importing torch and open_clip
def test_numerics_smoke(tmp_path):
    smoke("numerics", tmp_path, "throughput")
    table = rows(tmp_path / "numerics_throughput.parquet")
    assert [r["model"] for r in table] == ["testbed", "ViT-B-32"]
    assert all(r["portable_images_s"] > 0 and r["repeats"] == 1 for r in table)


@pytest.mark.slow
def test_calibration_smoke(tmp_path):
    printed = smoke("calibration", tmp_path, timeout=400)
    assert [r["seed"] for r in rows(tmp_path / "calibration.parquet")] == [0]
    assert (tmp_path / "calibration.md").read_text() in printed + "\n"


@pytest.mark.slow
def test_pool_memory_smoke(soup_zoo, tmp_path):
    smoke("pool_memory", tmp_path, "--zoo", str(soup_zoo))
    table = rows(tmp_path / "pool_memory.parquet")
    assert [r["n"] for r in table] == [2, 3] and all(r["peak_rss_mib"] > 0 for r in table)


@pytest.mark.slow
def test_scaling_smoke(tmp_path):
    smoke("scaling", tmp_path)
    table = rows(tmp_path / "scaling.parquet")
    assert sorted((r["mode"], r["n"], r.get("k")) for r in table) == [
        ("null", 2, 1),
        ("null", 2, 2),
        ("parallel", 2, 2),
        ("sharded", 2, None),
    ]


@pytest.mark.slow
def test_report_memory_smoke(tmp_path):
    smoke("report_memory", tmp_path)
    assert [r["report_sets"] for r in rows(tmp_path / "report_memory.parquet")] == [1, 2]


@pytest.mark.slow
def test_overhead_smoke(soup_zoo, tmp_path):
    smoke("overhead", tmp_path, "--zoo", str(soup_zoo))
    (row,) = rows(tmp_path / "overhead.parquet")
    assert row["zoo"] == str(soup_zoo) and row["tune_s"] > 0


@pytest.mark.slow
def test_racing_smoke(soup_zoo, tmp_path):
    smoke("racing", tmp_path, "--zoo", str(soup_zoo))
    (row,) = rows(tmp_path / "racing.parquet")
    assert row["chunks"] == 2 and row["full_forwards"] >= row["raced_forwards"]


@pytest.mark.slow
def test_optimizer_budget_smoke(soup_zoo, tmp_path):
    smoke("optimizer_budget", tmp_path, "--zoo", str(soup_zoo))
    cells = sorted(r["cell"] for r in rows(tmp_path / "bench.parquet"))
    assert cells == [
        "grid/NGOpt/b1/p1/s0/granularity-1",
        "reference/greedy_soup",
        "reference/uniform_soup",
    ]
    assert (tmp_path / "summary.md").exists()


@pytest.mark.slow
def test_scale_smoke(tmp_path):
    printed = smoke("scale", tmp_path, timeout=400)
    table = rows(tmp_path / "scale.parquet")
    assert {r["gpus"] for r in table} == {1, 8, 64} and "projected reference run" in printed
