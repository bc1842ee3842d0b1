"""Testbed calibration: does the soups premise hold on several zoo seeds?

    python benchmarks/calibration/calibration.py [--seeds 0 1 2] [--work DIR] [--label NAME]
                                     [--set KEY=JSON ...]

For each seed, builds the default zoo recipe with that seed (the pretrained model is shared
by every seed, as one CLIP is fine-tuned many times; later seeds copy the first one's) and
runs the methods the premise is about (best individual, uniform and greedy soup,
ManifoldMix) with the demo's settings on it. One row per seed goes into
benchmarks/calibration/results/calibration.parquet (with the recipe, machine and commit),
and the table of every row into calibration.md beside it. The premise, checked per seed:
- greedy soup keeps at least 2 ingredients, and ManifoldMix accepts at least 2;
- ManifoldMix's and the uniform soup's OOD average beat the best individual's, with the
  paired 95 % interval above zero;
- ManifoldMix's ID accuracy is at least the best individual's minus 0.3 points.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/common.py
from common import append_result, machine, parse_args

from raysoup.config import PoolConfig, RunConfig
from raysoup.console import console_logging
from raysoup.methods.manifold_mix import ManifoldMixConfig
from raysoup.report import provenance_note
from raysoup.runner import execute
from raysoup.stats import OOD_AVG, format_difference
from raysoup.testbed.image import ZooConfig, build_zoo
from raysoup.tools.demo import DEMO_EVALS_PER_COMPONENT, DEMO_RESOURCES

HERE = Path(__file__).resolve().parent
METHODS = ("best_individual", "uniform_soup", "greedy_soup", "manifold_mix")
ID_SLACK = 0.003  # ManifoldMix may lose at most 0.3 points of ID accuracy
# --smoke: one seed of a zoo of 3 ingredients of a tiny model, trained for seconds.
SMOKE_RECIPE = [
    "ingredients=3",
    "val_size=300",
    "train_size=1500",
    "test_size=300",
    "pretrain_epochs=1.0",
    "finetune_epochs=[1.0,1.0]",
    'model={"width":32,"layers":1,"heads":2,"embed_dim":32}',
]


def premise(methods: dict) -> dict:
    """The four checks of one seed, from its report's method rows."""
    best, mm, uniform = (methods[m] for m in ("best_individual", "manifold_mix", "uniform_soup"))
    return {
        "greedy_keeps_2": len(methods["greedy_soup"]["ingredients"]) >= 2,
        "mm_accepts_2": len(mm["ingredients"]) >= 2,
        "ood_beats_best": all(r["vs"]["best_individual"][OOD_AVG]["lo"] > 0 for r in (mm, uniform)),
        "id_within_0.3": mm["id"] >= best["id"] - ID_SLACK,
    }


def calibrate(
    config: ZooConfig,
    work: Path,
    label: str,
    first_zoo: Path | None,
    evals_per_component: int,
    results: Path,
    allow_dirty: bool,
) -> Path:
    seed = config.seed
    zoo = work / f"zoo-seed{seed}"
    if first_zoo is not None and not (zoo / "pretrained.safetensors").exists():
        zoo.mkdir(parents=True, exist_ok=True)  # the shared pretrained model, as a cached step
        for name in ("pretrained.safetensors", "pretrained.safetensors.json"):
            shutil.copy(first_zoo / name, zoo / name)
    t0 = time.perf_counter()
    build_zoo(zoo, config)
    build_s = time.perf_counter() - t0
    out = work / f"run-seed{seed}"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    report = execute(
        RunConfig(
            PoolConfig(str(zoo)),
            out,
            methods=METHODS,
            options={"manifold_mix": ManifoldMixConfig(evals_per_component=evals_per_component)},
            resources=DEMO_RESOURCES,
        )
    )
    methods = report["methods"]
    row = {
        "label": label,
        "seed": seed,
        "recipe": json.dumps(config.to_dict()),
        "build_s": round(build_s, 1),
        "run_s": round(time.perf_counter() - t0, 1),
        "pretrained": json.dumps(report["references"].get("pretrained")),
        **premise(methods),
    }
    for name, r in methods.items():
        row.update(
            {
                f"{name}.val": r["val"],
                f"{name}.id": r["id"],
                f"{name}.ood_avg": r["ood_avg"],
                f"{name}.ingredients": len(r["ingredients"]),
                f"{name}.vs": json.dumps(r.get("vs", {})),
            }
        )
    append_result(results, "calibration", {**row, **machine(allow_dirty)})
    return zoo


def markdown(rows: list[dict]) -> str:
    """Per recipe and seed: val / ID / OOD of each method, kept ingredients, the paired
    OOD and ID differences against the best individual, and the verdict."""
    lines = [
        (
            "| recipe | seed | best individual | uniform | greedy (kept) | ManifoldMix "
            "(kept) | MM − best, OOD | uniform − best, OOD | MM − best, ID | premise |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def cell(r: dict, name: str) -> str:
        return " / ".join(f"{100 * r[f'{name}.{k}']:.2f}" for k in ("val", "id", "ood_avg"))

    for r in rows:
        vs = {
            m: json.loads(r[f"{m}.vs"]).get("best_individual", {})
            for m in ("manifold_mix", "uniform_soup")
        }
        checks = [
            k
            for k in ("greedy_keeps_2", "mm_accepts_2", "ood_beats_best", "id_within_0.3")
            if not r[k]
        ]
        lines.append(
            f"| {r['label']} | {r['seed']} | {cell(r, 'best_individual')} | "
            f"{cell(r, 'uniform_soup')} | {cell(r, 'greedy_soup')} "
            f"({r['greedy_soup.ingredients']}) | {cell(r, 'manifold_mix')} "
            f"({r['manifold_mix.ingredients']}) | "
            f"{format_difference(vs['manifold_mix'].get(OOD_AVG)).strip()} | "
            f"{format_difference(vs['uniform_soup'].get(OOD_AVG)).strip()} | "
            f"{format_difference(vs['manifold_mix'].get('id')).strip()} | "
            f"{'holds' if not checks else 'fails: ' + ', '.join(checks)} |"
        )
    return (
        "\n".join(lines) + "\n\n(val / ID / OOD average in %; differences in points with "
        "paired 95 % bootstrap intervals, * where the interval excludes 0)\n\n"
        + provenance_note(rows)
        + "\n"
    )


def main() -> None:
    console_logging()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--work",
        type=Path,
        default=Path("runs/calibration"),
        help="zoos and runs (large; not committed)",
    )
    parser.add_argument("--label", default="default", help="the recipe's name in the table")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=JSON",
        help="a recipe change from the default ZooConfig, e.g. "
        "finetune_data_fraction=0.25 or finetune_epochs=[3.6,4.4]",
    )
    parser.add_argument("--evals-per-component", type=int, default=DEMO_EVALS_PER_COMPONENT)
    args = parse_args(
        parser,
        HERE / "results",
        smoke={"seeds": [0], "set": SMOKE_RECIPE, "evals_per_component": 1},
    )
    if args.smoke and args.work == parser.get_default("work"):
        args.work = args.out / "work"
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in ZooConfig.__dataclass_fields__:
            parser.error(f"--set {item}: ZooConfig has no field {key!r}")
        overrides[key] = json.loads(value)
    first = None
    for seed in args.seeds:
        config = ZooConfig.from_dict({**ZooConfig(seed=seed).to_dict(), **overrides})
        zoo = calibrate(
            config,
            args.work,
            args.label,
            first,
            args.evals_per_component,
            args.out,
            args.allow_dirty,
        )
        first = first or zoo
    import pyarrow.parquet as pq

    table = pq.read_table(args.out / "calibration.parquet").to_pylist()
    (args.out / "calibration.md").write_text(markdown(table))
    print((args.out / "calibration.md").read_text())


if __name__ == "__main__":
    main()
