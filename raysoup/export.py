"""`raysoup export`: a run's fused model in the ingredients' own format (keys, prefixes,
dtypes, container; a save_pretrained folder for Hugging Face pools), loadable wherever that
ingredient was."""

from __future__ import annotations

from pathlib import Path

from .api import load_report
from .errors import RaysoupError
from .families import family_of
from .inputs.pool import IngredientPool, load_state_dict


def export_like(run_dir: Path, like: str, out: Path) -> Path:
    """The fused model of `run_dir` in the format of ingredient `like` (its model family's
    export)."""
    report = load_report(run_dir)
    fused_path = Path(run_dir) / "fused.safetensors"
    if not fused_path.is_file():
        raise RaysoupError(f"{run_dir} has no fused.safetensors (a run with manifold_mix "
                           f"writes it)")
    pool = IngredientPool.from_zoo(report.raw["zoo"]["dir"])
    if like not in pool.ingredients:
        raise RaysoupError(f"--like {like!r}: no such ingredient; the pool has "
                           f"{', '.join(pool.names)}")
    return family_of(pool.spec).export(pool.spec, load_state_dict(fused_path),
                                       str(pool.ingredients[like].path), Path(out))
