"""`raysoup export`: a run's fused model in the ingredients' own format (keys, prefixes,
dtypes, container), loadable wherever that ingredient was."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from .api import load_report
from .errors import RaysoupError
from .inputs.model import DATA_PARALLEL_PREFIX
from .inputs.pool import IngredientPool, load_state_dict


def export_like(run_dir: Path, like: str, out: Path) -> Path:
    """The fused model of `run_dir` with the keys, `module.` prefix, dtypes and container
    (safetensors, or a torch.save'd state dict) of ingredient `like`; tensors the fused model
    does not hold (a kept text transformer) are the ingredient's own."""
    report = load_report(run_dir)
    fused_path = Path(run_dir) / "fused.safetensors"
    if not fused_path.is_file():
        raise RaysoupError(f"{run_dir} has no fused.safetensors (a run with manifold_mix "
                           f"writes it)")
    pool = IngredientPool.from_zoo(report.raw["zoo"]["dir"])
    if like not in pool.ingredients:
        raise RaysoupError(f"--like {like!r}: no such ingredient; the pool has "
                           f"{', '.join(pool.names)}")
    source = str(pool.ingredients[like].path)
    original = load_state_dict(source)
    fused = load_state_dict(fused_path)
    prefix = DATA_PARALLEL_PREFIX if original and all(
        k.startswith(DATA_PARALLEL_PREFIX) for k in original) else ""
    exported = {}
    for key, tensor in original.items():
        ours = key[len(prefix):]
        exported[key] = fused[ours].to(tensor.dtype) if ours in fused else tensor
    missing = sorted(set(fused) - {k[len(prefix):] for k in original})
    if missing:
        raise RaysoupError(f"ingredient {like!r} lacks {len(missing)} key(s) of the fused "
                           f"model (e.g. {missing[0]}): not the same architecture")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    if source.endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in exported.items()}, str(tmp))
    else:
        torch.save(exported, tmp)
    tmp.replace(out)
    return out
