"""`raysoup bench`: the grid, its config, the best-so-far curve, and a real quick run."""

import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import ray

from raysoup.tools.bench import QUICK_GRID, BenchGrid, best_so_far, load_grid
from raysoup.errors import RaysoupError


def test_the_full_grid_skips_parallel_cells_for_sequential_optimisers():
    cells = BenchGrid().cells()
    keys = [c["cell"] for c in cells]
    assert len(keys) == len(set(keys))
    assert not [c for c in cells if c["optimizer"] == "Cobyla" and c["parallel"] > 1]
    grid = [c for c in cells if c["kind"] == "grid"]
    # 5 parallel-capable optimisers x 3 k + Cobyla x 1, each x 4 budgets x 3 seeds
    assert len(grid) == (5 * 3 + 1) * 4 * 3
    ablation = [c for c in cells if c["kind"] == "ablation"]
    assert len(ablation) == len(BenchGrid().granularities) + 1
    assert [c for c in ablation if c["drop_unused"]]
    assert not [c for c in BenchGrid(granularities=()).cells() if c["kind"] == "ablation"]


def test_a_grid_config_overrides_the_defaults_and_names_unknown_keys(tmp_path):
    path = tmp_path / "bench.toml"
    path.write_text('[grid]\noptimizers = ["CMA"]\nbudgets = [3]\n')
    grid = load_grid(path, quick=False)
    assert grid.optimizers == ("CMA",) and grid.budgets == (3,) and grid.seeds == (0, 1, 2)
    path.write_text('[grid]\nseeds = [0, 1, 2]\n')  # a default value still overrides --quick
    assert load_grid(path, quick=True).seeds == (0, 1, 2)
    path.write_text('[grid]\nbudget = [3]\n')
    with pytest.raises(RaysoupError, match="grid.budget"):
        load_grid(path, quick=False)
    path.write_text('[grid]\noptimizers = ["Cobylla"]\n')
    with pytest.raises(RaysoupError, match="did you mean 'Cobyla'"):
        load_grid(path, quick=False)


def test_best_so_far_is_a_running_max_over_every_evaluation():
    history = [{"promise_accuracy": 0.5, "passes": []},
               {"promise_accuracy": 0.7, "passes": [{"trace": [0.6, 0.8, 0.75]}]}]
    assert best_so_far(0.6, history) == [0.6, 0.7, 0.7, 0.8, 0.8]


@pytest.mark.slow
def test_bench_quick_writes_table_figures_and_resumes(soup_zoo, tmp_path):
    out = tmp_path / "bench"
    cmd = [sys.executable, "-m", "raysoup.cli", "bench", "--quick", "--zoo", str(soup_zoo),
           "--out", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    rows = pq.read_table(out / "bench.parquet").to_pylist()
    assert sorted(r["cell"] for r in rows) == sorted(
        [c["cell"] for c in QUICK_GRID.cells()] + ["reference/uniform_soup",
                                                   "reference/greedy_soup"])
    for r in rows:
        assert r["commit"] is not None and r["cpus"] >= 1 and 0 < r["val"] <= 1
        if r["kind"] != "reference":
            curve = r["best_so_far"]
            assert len(curve) == r["evaluations"] and curve == sorted(curve)
            assert max(curve) >= r["val"] - 1e-9  # the fused model was among those seen
    for name in ("accuracy_vs_budget", "best_so_far", "cost_quality", "parallel", "betas",
                 "granularity"):
        assert (out / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    summary = (out / "summary.md").read_text()
    # TwoPointsDE at k = 2 against NGOpt (same budget and seed) and greedy soup, paired.
    row = next(line for line in summary.splitlines() if line.startswith("| TwoPointsDE | 2 | 2 |"))
    assert row.count("[") == 4 and row.count("]") == 4
    ngopt = next(line for line in summary.splitlines() if line.startswith("| NGOpt | 2 | 1 |"))
    assert ngopt.count("[") == 2  # itself is the reference: greedy only
    assert len(pq.read_table(out / "correctness.parquet")) == len(rows) * 8  # 8 sets a cell
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and f"{len(rows)} cell(s) already" in again.stdout
    assert len(pq.read_table(out / "bench.parquet")) == len(rows)


def test_a_bench_table_of_another_zoo_is_refused_before_any_cell(tmp_path):
    from raysoup.report import append_rows
    from raysoup.tools.bench import run_bench
    append_rows(tmp_path / "bench.parquet", [{"cell": "reference/uniform_soup",
                                              "zoo": "/elsewhere/zoo"}])
    with pytest.raises(RaysoupError, match=r"holds cells of zoo \['/elsewhere/zoo'\], not "
                                           r"/this/zoo: choose another --out"):
        run_bench("/this/zoo", tmp_path, QUICK_GRID)
    assert not ray.is_initialized()


def test_a_bench_grid_value_of_the_wrong_type_names_it(tmp_path):
    path = tmp_path / "bench.toml"
    path.write_text('[grid]\nbudgets = [5, 2.5]\n')
    with pytest.raises(RaysoupError, match=r"grid.budgets = \[5, 2.5\]: expected tuple\[int"):
        load_grid(path, quick=False)
