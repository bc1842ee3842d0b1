"""Numeric domains: which kernels compute an evaluation, so that its decisions repeat.

ManifoldMix decides on exact validation ties, and one image that flips at a tie changes
that decision and every one after it. On CPUs the per-image results depend on kernels
picked at run time: ATen's vectorised kernels by the CPU's instruction set (reduction
width, FMA or not), oneDNN's convolution kernels by instruction set and cache sizes, and
MKL's GEMM path by CPU. Between ATen's AVX-512, AVX2 and default kernels the logits of one
model differ by up to 7e-6 (``benchmarks/numerics/numerics.py``).

Two domains for CPU evaluation, ``resources.numerics``:

- ``portable`` (default): every Ray process that computes (evaluators and the driver) runs
  ATen's AVX2 kernels, MKL's AVX2 code path under Conditional Numerical Reproducibility
  (``MKL_CBWR``), convolutions without oneDNN, and a fixed thread count. Results are the
  same bits on any x86-64 CPU with AVX2; a CPU without AVX2 is refused.
- ``native``: each CPU's fastest kernels; results repeat on one CPU model only, and a run
  is resumed only where its recorded domain matches.

GPU evaluation is a domain of its own (CUDA kernels, optional bf16 autocast), named by
the device: its results are not comparable bit for bit with CPU results.
"""

from __future__ import annotations

import logging
import os
import platform
from typing import Literal

from .errors import RaysoupError

logger = logging.getLogger(__name__)

Numerics = Literal["portable", "native"]
PORTABLE_CAPABILITY = "AVX2"
# Read by ATen, MKL, OpenBLAS and numpy when they first load, so they are set in the
# process's environment (a Ray runtime_env), never changed after they have started. numpy's
# OpenBLAS picks its kernels by CPU and numpy dispatches loops up to AVX-512: both change the
# last bits of the points nevergrad proposes in the driver, so both are held at AVX2 too.
PORTABLE_ENV = {
    "ATEN_CPU_CAPABILITY": PORTABLE_CAPABILITY.lower(),
    "MKL_CBWR": PORTABLE_CAPABILITY,
    "OPENBLAS_CORETYPE": "Haswell",
    "NPY_DISABLE_CPU_FEATURES": "X86_V4 AVX512_ICL AVX512_SPR",
}


def runtime_env(numerics: Numerics) -> dict | None:
    """The Ray runtime_env of a process that computes in this domain."""
    return {"env_vars": dict(PORTABLE_ENV)} if numerics == "portable" else None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe(numerics: Numerics, threads: int, device: str = "cpu") -> str:
    """The name of the domain a process with these settings computes in: part of every
    cache key and step checkpoint, and of the report."""
    import torch

    if device.startswith("cuda"):
        return f"cuda {torch.cuda.get_device_name(torch.device(device))}, torch {torch.__version__}"
    if numerics == "native":
        return (
            f"cpu native {torch.backends.cpu.get_cpu_capability()} ({cpu_model()}), "
            f"torch {torch.__version__}, {threads} thread(s)"
        )
    return (
        f"cpu portable {PORTABLE_CAPABILITY} (MKL_CBWR, no oneDNN), torch "
        f"{torch.__version__}, {threads} thread(s)"
    )


def enter(numerics: Numerics, threads: int, device: str = "cpu", strict: bool = True) -> str:
    """Set this process up for the domain (before its first forward pass) and name it. A
    portable process whose CPU cannot run the pinned kernels is refused (`strict`), or
    logged."""
    import torch

    torch.set_num_threads(max(1, threads))
    if numerics == "portable" and not device.startswith("cuda"):
        torch.backends.mkldnn.enabled = False  # oneDNN's kernels depend on the CPU's caches
        capability = torch.backends.cpu.get_cpu_capability()
        pinned = {k: os.environ.get(k) for k in PORTABLE_ENV}
        if capability != PORTABLE_CAPABILITY or pinned != PORTABLE_ENV:
            message = (
                f'resources.numerics = "portable" needs x86-64 CPUs with AVX2: node '
                f"{platform.node()} ({cpu_model()}, {platform.machine()}) runs ATen's "
                f"{capability} kernels with {pinned}; set resources.numerics = "
                f'"native" (results then repeat on one CPU model only)'
            )
            if strict:
                raise RaysoupError(message)
            logger.warning(message)
    return describe(numerics, threads, device)
