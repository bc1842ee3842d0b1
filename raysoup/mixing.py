"""Weight-space arithmetic: component-wise mixing, lambda -> beta unrolling, rebuilds.

No function here writes into its inputs: they may be read-only object-store buffers or
tensors shared with other callers. Every result is a fresh tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch

from .components import Components

StateDict = dict[str, torch.Tensor]


def mix(
    accumulator: Mapping[str, torch.Tensor],
    candidate: Mapping[str, torch.Tensor],
    lambdas: Sequence[float],
    components: Components,
) -> StateDict:
    """A'_i = lambda_i * A_i + (1 - lambda_i) * C_i per component i; unmixed keys keep A."""
    if len(lambdas) != len(components):
        raise ValueError(f"{len(lambdas)} lambdas for {len(components)} components")
    out: StateDict = {k: accumulator[k].clone() for k in components.unmixed}
    for lam, keys in zip(lambdas, components.keys):
        for k in keys:
            a, c = accumulator[k], candidate[k]
            out[k] = torch.lerp(c, a, float(lam)) if a.is_floating_point() else a.clone()
    return out


class RunningSum:
    """Streaming sum of state dicts in float64: one input resident at a time."""

    def __init__(self) -> None:
        self.total: StateDict = {}
        self.dtypes: dict[str, torch.dtype] = {}
        self.count = 0

    def add(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        for k, v in state_dict.items():
            if not v.is_floating_point():
                self.total.setdefault(k, v.clone())  # non-float keys come from the first
            elif self.count == 0:
                self.total[k], self.dtypes[k] = v.double(), v.dtype
            else:
                self.total[k] += v
        self.count += 1

    def mean(self, extra: Mapping[str, torch.Tensor] | None = None) -> StateDict:
        """Mean of what was added, plus `extra` if given (without adding it)."""
        n = self.count + (extra is not None)
        if n == 0:
            raise ValueError("cannot average zero state dicts")
        out = {}
        for k, v in self.total.items():
            if k in self.dtypes:
                v = v + extra[k] if extra is not None else v
                v = (v / n).to(self.dtypes[k])
            out[k] = v
        return out


def average(state_dicts: Iterable[Mapping[str, torch.Tensor]]) -> StateDict:
    """Uniform average of state dicts, streamed."""
    running = RunningSum()
    for sd in state_dicts:
        running.add(sd)
    return running.mean()


def lambdas_to_betas(lambda_rows: np.ndarray) -> np.ndarray:
    """Unroll accepted lambda rows (k x m) into ingredient weights beta ((k+1) x m).

    Row r (0-based) mixed ingredient r+1 into the accumulator: A_{r+1} = l_r A_r +
    (1 - l_r) I_{r+1}, with A_0 = I_0. Hence beta_0 = prod_r l_r and
    beta_j = (1 - l_{j-1}) * prod_{r >= j} l_r; every column sums to 1.
    """
    rows = np.asarray(lambda_rows, dtype=np.float64)
    if rows.ndim != 2:
        raise ValueError(f"lambda rows must be a (steps x components) matrix, got {rows.shape}")
    betas = np.empty((rows.shape[0] + 1, rows.shape[1]))
    betas[0] = np.prod(rows, axis=0)
    for j in range(1, rows.shape[0] + 1):
        betas[j] = (1.0 - rows[j - 1]) * np.prod(rows[j:], axis=0)
    return betas


def weighted_sum(
    load: Callable[[int], Mapping[str, torch.Tensor]], betas: np.ndarray, components: Components
) -> StateDict:
    """sum_j beta_j * ingredient_j per component, loading ingredient j via load(j) in turn.

    Accumulates in float64 and returns each key in its input dtype. Unmixed and
    non-float keys take ingredient 0's values (the accumulator's origin).
    """
    total: StateDict = {}
    dtypes: dict[str, torch.dtype] = {}
    for j in range(betas.shape[0]):
        sd = load(j)
        if j == 0:
            total.update({k: sd[k].clone() for k in components.unmixed})
        for i, keys in enumerate(components.keys):
            for k in keys:
                v = sd[k]
                if not v.is_floating_point():
                    total.setdefault(k, v.clone())
                    continue
                dtypes[k] = v.dtype
                term = v.double() * float(betas[j, i])
                total[k] = term if j == 0 else total[k] + term
    return {k: v.to(dtypes[k]) if k in dtypes else v for k, v in total.items()}


def to_numpy(state_dict: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Numpy copy for the Ray object store (which stores numpy zero-copy)."""
    return {k: v.detach().cpu().numpy() for k, v in state_dict.items()}


def from_numpy(arrays: Mapping[str, np.ndarray]) -> StateDict:
    """Tensors that share memory with `arrays`, which may be read-only object-store buffers.

    torch warns that it cannot mark such tensors read-only; every function in this module
    returns fresh tensors, so nothing ever writes into them.
    """
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return {k: torch.from_numpy(v) for k, v in arrays.items()}
