"""Numeric domains (raysoup.numerics): an evaluation's bits do not depend on the CPU's
kernels under `portable`, and a run is not resumed in another domain."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from raysoup.checkpoint import StepCheckpoint
from raysoup.errors import RaysoupError
from raysoup.inputs.pool import IngredientPool

PROBE = Path(__file__).parents[1] / "numerics_probe.py"
# Another machine's kernel choices, as far as one machine can show them: ATen's scalar
# kernels (no FMA, other reduction widths), MKL and oneDNN held to AVX2, OpenBLAS's generic
# kernels (numpy's, where nevergrad computes its points).
OTHER_CPU = {
    "ATEN_CPU_CAPABILITY": "default",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "OPENBLAS_CORETYPE": "Prescott",
}
KERNEL_VARIABLES = (
    "ATEN_CPU_CAPABILITY",
    "MKL_CBWR",
    "MKL_ENABLE_INSTRUCTIONS",
    "ONEDNN_MAX_CPU_ISA",
    "OPENBLAS_CORETYPE",
    "NPY_DISABLE_CPU_FEATURES",
)


def probe(zoo, numerics: str, out: Path, env: dict) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in KERNEL_VARIABLES}
    return subprocess.run(
        [sys.executable, str(PROBE), str(zoo), numerics, str(out)],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_portable_evaluation_is_the_same_bits_under_another_cpus_kernels(tiny_zoo, tmp_path):
    results = {}
    for numerics in ("portable", "native"):
        for machine, env in (("this", {}), ("other", OTHER_CPU)):
            out = tmp_path / f"{numerics}-{machine}.npz"
            done = probe(tiny_zoo, numerics, out, env)
            assert done.returncode == 0, done.stderr[-2000:]
            results[numerics, machine] = np.load(out)
    # The two settings do change the kernels: natively the logits differ in their last bits.
    assert str(results["native", "other"]["capability"]) == "DEFAULT"
    assert not np.array_equal(
        results["native", "this"]["logits"], results["native", "other"]["logits"]
    )
    # Portable: the same bits, so the same per-image results and decisions.
    for key in ("logits", "hits", "domain"):
        assert np.array_equal(
            results["portable", "this"][key], results["portable", "other"][key]
        ), key
    assert "portable AVX2" in str(results["portable", "this"]["domain"])
    # numpy's OpenBLAS: the other machine's generic kernels natively, AVX2's under portable.
    assert str(results["native", "other"]["openblas"]) != "Haswell"
    assert {str(results["portable", m]["openblas"]) for m in ("this", "other")} == {"Haswell"}


def test_a_portable_evaluator_without_the_pinned_kernels_is_refused(tiny_zoo, tmp_path):
    """Where ATen's AVX2 kernels do not run (simulated: the variables the evaluator's
    runtime_env would set are overridden), portable refuses in one line."""
    done = subprocess.run(
        [sys.executable, "-c", "from raysoup.numerics import enter; enter('portable', 1)"],
        env={**os.environ, "ATEN_CPU_CAPABILITY": "default"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode != 0
    assert 'resources.numerics = "portable" needs x86-64 CPUs with AVX2' in done.stderr
    assert 'set resources.numerics = "native"' in done.stderr


def test_a_run_is_not_resumed_in_another_numeric_domain(tiny_zoo, tmp_path):
    pool = IngredientPool.from_zoo(tiny_zoo)
    StepCheckpoint(tmp_path, {"config": 1}, "cpu native AVX512 (a CPU)").save(
        {"accepted": [pool.names[0]]}, pool.load(pool.names[0]), version=1
    )
    assert StepCheckpoint(tmp_path, {"config": 1}, "cpu native AVX512 (a CPU)").load()
    with pytest.raises(
        RaysoupError,
        match="evaluated in the numeric domain 'cpu native "
        "AVX512 \\(a CPU\\)', but the evaluators now "
        "compute in 'cpu native AVX2",
    ):
        StepCheckpoint(tmp_path, {"config": 1}, "cpu native AVX2 (another CPU)").load()
