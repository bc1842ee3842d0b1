"""ManifoldMix's files beside the report: the fused weights, beta (ingredient x component
weights, a table and a heatmap) and the step history."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ...inputs.storage import atomic, write_json
from ...inputs.weights import save_state_dict
from ...mixing import StateDict


def write_betas(
    out: Path, betas: np.ndarray, ingredients: list[str], components: list[str]
) -> None:
    """beta.parquet (ingredient x component weights) and its heatmap beta.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = pa.table(
        {"ingredient": ingredients, **{c: betas[:, i].tolist() for i, c in enumerate(components)}}
    )
    with atomic(out / "beta.parquet") as tmp:
        pq.write_table(table, tmp)
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(components), 1.0 + 0.45 * len(ingredients)))
    im = ax.imshow(betas, cmap="viridis", vmin=0, vmax=max(1e-9, float(betas.max())), aspect="auto")
    ax.set_xticks(range(len(components)), components, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(ingredients)), ingredients, fontsize=8)
    for (i, j), v in np.ndenumerate(betas):
        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w")
    fig.colorbar(im, ax=ax, label="beta")
    ax.set_title("ManifoldMix weights (ingredient x component)")
    fig.tight_layout()
    with atomic(out / "beta.png") as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def write_outputs(out: Path, row: dict, fused: StateDict | None) -> list[str]:
    """beta.parquet + beta.png from the report row; with the fused weights (a run, not a
    redraw), fused.safetensors and history.json too."""
    write_betas(out, np.array(row["betas"]), row["ingredients"], row["components"])
    if fused is None:
        return ["beta.parquet", "beta.png"]
    save_state_dict(fused, out / "fused.safetensors")
    write_json(out / "history.json", row["history"], indent=1)
    return ["fused.safetensors", "beta.parquet", "beta.png", "history.json"]
