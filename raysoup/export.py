"""`raysoup export`: a run's fused model in the ingredients' own format (keys, prefixes,
dtypes, container; a save_pretrained folder for Hugging Face pools), loadable wherever that
ingredient was."""

from __future__ import annotations

import tempfile
from pathlib import Path, PurePosixPath

from .api import load_report
from .errors import RaysoupError
from .families import family_of
from .inputs import storage
from .inputs.pool import IngredientPool
from .inputs.weights import load_state_dict
from .rundir import RunDir


def export_like(run_dir: Path | str, like: str, out: Path | str) -> Path | str:
    """The fused model of `run_dir` in the format of ingredient `like` (its model family's
    export), written to `out`. Either may be a URI: the run is read from it, and the export
    is written to a staging folder first and then uploaded."""
    report = load_report(run_dir)
    pool = IngredientPool.from_zoo(report.raw["zoo"]["dir"])
    if like not in pool.ingredients:
        raise RaysoupError(
            f"--like {like!r}: no such ingredient; the pool has {', '.join(pool.names)}"
        )
    with RunDir.reading(run_dir, "fused.safetensors") as run:
        if not (run.local / "fused.safetensors").is_file():
            raise RaysoupError(
                f"{run_dir} has no fused.safetensors (a run with manifold_mix writes it)"
            )
        fused = load_state_dict(run.local / "fused.safetensors")
    like_path = str(pool.ingredients[like].path)
    export = family_of(pool.spec).export
    if not storage.is_uri(str(out)):
        return export(pool.spec, fused, like_path, Path(out))
    with tempfile.TemporaryDirectory(prefix="raysoup-export-") as staging:
        written = export(pool.spec, fused, like_path, Path(staging) / PurePosixPath(str(out)).name)
        storage.upload_tree(written, str(out))
    return str(out)
