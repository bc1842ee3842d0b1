"""Numeric domains: does ManifoldMix decide the same under other CPU kernels, and what does
the portable domain cost?

decisions: the demo's ManifoldMix (shipped zoo, 10 evaluations per component, 2
single-thread evaluators) as a `raysoup run`, once per setting, each in a fresh process with
its own empty cache. A setting is a `resources.numerics` and the kernel variables of the
environment Ray starts in: ATEN_CPU_CAPABILITY (ATen's vectorised kernels),
MKL_ENABLE_INSTRUCTIONS and ONEDNN_MAX_CPU_ISA (what another CPU would give MKL and
oneDNN). Records each step's verdict, the kept ingredients, the validation accuracy and the
per-image val results of the fused model, and whether they equal the first setting's of
the same numerics.

throughput: the evaluator's images/s on the testbed tower and on ViT-B-32 at 224 px
(random weights), native and portable, in alternating fresh processes (the domains are
per process); the ratio of the medians.

sensitivity: the demo's ManifoldMix (portable) on the calibration zoos (the shipped recipe
with zoo seeds 0, 1, 2 on the shipped pretrained model): how many verdicts were a tie or
one validation image from the best so far.

logits: one mixed model of the shipped zoo on val under each setting, in a fresh process:
the largest difference of its weights and logits from those of the first setting of the
same numerics, and how many predictions differ.

    python benchmarks/numerics/numerics.py [--allow-dirty] decisions [--settings native:this ...]
    python benchmarks/numerics/numerics.py [--allow-dirty] logits [--settings native:this ...]
    python benchmarks/numerics/numerics.py [--allow-dirty] sensitivity [--seeds 0 1 2]
    python benchmarks/numerics/numerics.py [--allow-dirty] throughput [--repeats 3]
Appends rows to benchmarks/numerics/results/numerics_{decisions,logits,throughput}.parquet and
prints them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/common.py
from common import append_result, default_zoo, machine, parse_args

KERNEL_VARIABLES = (
    "ATEN_CPU_CAPABILITY",
    "MKL_CBWR",
    "MKL_ENABLE_INSTRUCTIONS",
    "ONEDNN_MAX_CPU_ISA",
)
# What another machine would run, as far as this one can show it.
MACHINES = {
    "this": {},
    "avx2": {
        "ATEN_CPU_CAPABILITY": "avx2",
        "MKL_ENABLE_INSTRUCTIONS": "AVX2",
        "ONEDNN_MAX_CPU_ISA": "AVX2",
    },
    "default": {
        "ATEN_CPU_CAPABILITY": "default",
        "MKL_ENABLE_INSTRUCTIONS": "AVX2",
        "ONEDNN_MAX_CPU_ISA": "AVX2",
    },
}
DEFAULT_SETTINGS = (
    "native:this",
    "native:avx2",
    "native:default",
    "portable:this",
    "portable:default",
)


def environment(machine_name: str, cache: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in KERNEL_VARIABLES}
    return {**env, **MACHINES[machine_name], "RAYSOUP_CACHE": cache, "HF_HUB_OFFLINE": "1"}


def run_manifold_mix(zoo: Path, numerics: str, machine_name: str, work: Path) -> dict:
    from raysoup.tools.demo import DEMO_EVALS_PER_COMPONENT, DEMO_RESOURCES

    out = work / f"{numerics}-{machine_name}"
    config = work / f"{numerics}-{machine_name}.toml"
    config.write_text(
        "\n".join(
            [
                f'out = "{out}"',
                'methods = ["manifold_mix"]',
                "[pool]",
                f'zoo = "{zoo}"',
                "[manifold_mix]",
                f"evals_per_component = {DEMO_EVALS_PER_COMPONENT}",
                "[resources]",
                f"evaluators = {DEMO_RESOURCES.evaluators}",
                f"cpus_per_evaluator = {DEMO_RESOURCES.cpus_per_evaluator}",
                f'numerics = "{numerics}"',
            ]
        )
        + "\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "raysoup.cli", "run", "-q", str(config)],
        env=environment(machine_name, str(work / f"cache-{out.name}")),
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"{numerics}:{machine_name} failed:\n{done.stderr[-3000:]}")
    from raysoup.api import load_report

    report = load_report(out).raw
    row = report["methods"]["manifold_mix"]
    import pyarrow.parquet as pq

    hits = pq.read_table(out / "correctness.parquet").to_pylist()
    fused_val = next(r for r in hits if r["name"] == "manifold_mix" and r["set"] == "val")
    return {
        "numerics": numerics,
        "machine": machine_name,
        "domain": report["config"]["numerics"],
        "verdicts": [s["accepted"] if s["passes"] else None for s in row["history"]],
        "accuracies": [s.get("accuracy", s["promise_accuracy"]) for s in row["history"]],
        "ingredients": row["ingredients"],
        "val": row["val"],
        "id": row["id"],
        "close_decisions": row["close_decisions"],
        "ood_avg": row["ood_avg"],
        "evaluations": row["evaluations"],
        "val_hits": np.packbits(np.asarray(fused_val["correct"], dtype=bool)).tobytes(),
    }


def decisions(args) -> None:
    zoo = default_zoo()
    where = machine(args.allow_dirty)
    first: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="raysoup-numerics-") as tmp:
        for setting in args.settings:
            numerics, machine_name = setting.split(":")
            result = run_manifold_mix(zoo, numerics, machine_name, Path(tmp))
            ref = first.setdefault(numerics, result)
            same = {k: result[k] == ref[k] for k in ("verdicts", "ingredients", "val_hits")}
            row = {
                **where,
                **{k: v for k, v in result.items() if k != "val_hits"},
                "close_decisions": json.dumps(result["close_decisions"]),
                "verdicts": json.dumps(result["verdicts"]),
                "accuracies": json.dumps(result["accuracies"]),
                "ingredients": ",".join(result["ingredients"]),
                "same_as": f"{numerics}:{ref['machine']}",
                **{f"same_{k}": v for k, v in same.items()},
            }
            append_result(args.out, "numerics_decisions", row)
            print(
                f"{setting:18} {row['ingredients']:24} val {100 * row['val']:.2f} id "
                f"{100 * row['id']:.2f} ood {100 * row['ood_avg']:.2f} evals "
                f"{row['evaluations']}  same as {row['same_as']}: {same}",
                flush=True,
            )


LOGITS_PROBE = """
import os, sys
from raysoup.numerics import runtime_env
os.environ.update((runtime_env(sys.argv[2]) or {}).get("env_vars", {}))
import numpy as np, torch
from raysoup.components import partition
from raysoup.evaluate import VAL, Evaluator, load_eval_sets
from raysoup.inputs.pool import IngredientPool
from raysoup.inputs.tasks import eval_set_sources
from raysoup.mixing import mix
from raysoup.numerics import enter
domain = enter(sys.argv[2], threads=1)
zoo = sys.argv[1]
pool = IngredientPool.from_zoo(zoo)
evaluator = Evaluator(pool.spec, load_eval_sets({VAL: eval_set_sources(zoo)[VAL]},
                                                pool.spec.num_classes), domain=domain)
a, c = pool.load(pool.names[0]), pool.load(pool.names[1])
components = partition(list(a), "granularity-1")
mixed = mix(a, c, np.linspace(0.3, 0.7, len(components)), components)
evaluator.load(mixed)
with torch.inference_mode():
    logits = torch.cat([evaluator.model(x) for x in evaluator.sets[VAL][0].split(1000)])
np.savez(sys.argv[3], logits=logits.double().numpy(),
         weights=np.concatenate([v.double().flatten().numpy() for v in mixed.values()]))
"""


def logits(args) -> None:
    """One mixed model of the shipped zoo on val under each setting: how far its weights
    (the mix) and logits are from this machine's native ones, and how many predictions
    differ."""
    zoo, where = default_zoo(), machine(args.allow_dirty)
    with tempfile.TemporaryDirectory(prefix="raysoup-logits-") as tmp:
        results = {}
        for setting in args.settings:
            numerics, machine_name = setting.split(":")
            out = Path(tmp) / f"{numerics}-{machine_name}.npz"
            done = subprocess.run(
                [sys.executable, "-c", LOGITS_PROBE, str(zoo), numerics, str(out)],
                capture_output=True,
                text=True,
                env=environment(machine_name, tmp),
                check=False,
            )
            if done.returncode != 0:
                raise SystemExit(done.stderr[-3000:])
            results[setting] = np.load(out)
        for setting, r in results.items():
            # against the first setting of the same numerics
            ref_name = next(s for s in results if s.split(":")[0] == setting.split(":")[0])
            ref = results[ref_name]
            row = {
                **where,
                "setting": setting,
                "against": ref_name,
                "max_weight_diff": float(np.abs(r["weights"] - ref["weights"]).max()),
                "max_logit_diff": float(np.abs(r["logits"] - ref["logits"]).max()),
                "predictions_differ": int((r["logits"].argmax(1) != ref["logits"].argmax(1)).sum()),
            }
            append_result(args.out, "numerics_logits", row)
            print(
                f"{setting:18} vs {ref_name}: weights {row['max_weight_diff']:.1e}, logits "
                f"{row['max_logit_diff']:.1e}, {row['predictions_differ']} predictions "
                f"differ",
                flush=True,
            )


def calibration_zoo(seed: int, work: Path) -> Path:
    """The shipped zoo's recipe with another seed, on the shipped pretrained model (as the
    calibration's zoos share theirs), built once under `work`."""
    from raysoup.testbed.image import ZooConfig, build_zoo

    shipped = default_zoo()
    manifest = json.loads((shipped / "manifest.json").read_text())
    if seed == manifest["config"]["seed"]:
        return shipped
    zoo = work / f"zoo-seed{seed}"
    (zoo / "ingredients").mkdir(parents=True, exist_ok=True)
    shutil.copy(shipped / "pretrained.safetensors", zoo / "pretrained.safetensors")
    # The pretrained model's record, as a build leaves it: a finished step, not redone.
    (zoo / "pretrained.safetensors.json").write_text(json.dumps(manifest["pretrained"]))
    return build_zoo(zoo, ZooConfig.from_dict({**manifest["config"], "seed": seed}))


def sensitivity(args) -> None:
    """On the calibration zoos: how many of ManifoldMix's verdicts were a tie or one
    validation image (portable numerics, the demo's settings)."""
    where = machine(args.allow_dirty)
    args.work.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        zoo = calibration_zoo(seed, args.work)
        with tempfile.TemporaryDirectory(prefix="raysoup-sensitivity-") as tmp:
            result = run_manifold_mix(zoo, "portable", "this", Path(tmp))
        verdicts = sum(v is not None for v in result["verdicts"])
        close = result["close_decisions"]
        row = {
            **where,
            "zoo_seed": seed,
            "verdicts": verdicts,
            "ties": close["tie"],
            "one_image": close["one image"],
            "ingredients": ",".join(result["ingredients"]),
            "val": result["val"],
            "evaluations": result["evaluations"],
        }
        append_result(args.out, "numerics_sensitivity", row)
        print(
            f"zoo seed {seed}: {verdicts} verdicts after a pass, {close['tie']} by a tie, "
            f"{close['one image']} by one image; kept {row['ingredients']}",
            flush=True,
        )


THROUGHPUT_PROBE = """
import os, sys, time
from raysoup.numerics import runtime_env
os.environ.update((runtime_env(sys.argv[1]) or {}).get("env_vars", {}))
import torch
from raysoup.inputs.model import ModelSpec, build_classifier
from raysoup.numerics import enter
enter(sys.argv[1], threads=1)
spec = ModelSpec() if sys.argv[2] == "testbed" else ModelSpec(arch=sys.argv[2]).with_arch_defaults()
model = build_classifier(spec).eval()
batch = int(sys.argv[3])
images = torch.randint(0, 256, (batch, spec.in_channels, spec.image_size, spec.image_size),
                       dtype=torch.uint8)
with torch.inference_mode():
    model(images)
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < float(sys.argv[4]):
        model(images)
        n += batch
print(n / (time.perf_counter() - t0))
"""


def throughput(args) -> None:
    where = machine(args.allow_dirty)
    for arch, batch, seconds in (
        ("testbed", 1000, args.seconds),
        ("ViT-B-32", 16, 2 * args.seconds),
    ):
        rates: dict[str, list[float]] = {"native": [], "portable": []}
        for _ in range(args.repeats):
            for numerics, measured in rates.items():  # alternating: load drifts hit both
                done = subprocess.run(
                    [
                        sys.executable,
                        "-c",
                        THROUGHPUT_PROBE,
                        numerics,
                        arch,
                        str(batch),
                        str(seconds),
                    ],
                    capture_output=True,
                    text=True,
                    env=environment("this", ""),
                    check=False,
                )
                if done.returncode != 0:
                    raise SystemExit(done.stderr[-3000:])
                measured.append(float(done.stdout.split()[-1]))
        native, portable = (statistics.median(rates[k]) for k in ("native", "portable"))
        row = {
            **where,
            "model": arch,
            "batch": batch,
            "native_images_s": native,
            "portable_images_s": portable,
            "portable_over_native": portable / native,
            "repeats": args.repeats,
        }
        append_result(args.out, "numerics_throughput", row)
        print(
            f"{arch:10} batch {batch:5}: native {native:8.1f} images/s, portable "
            f"{portable:8.1f} images/s, ratio {portable / native:.3f} "
            f"(median of {args.repeats}, 1 thread)",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("decisions")
    p.add_argument(
        "--settings",
        nargs="+",
        default=list(DEFAULT_SETTINGS),
        help="NUMERICS:MACHINE, MACHINE one of " + ", ".join(MACHINES),
    )
    p.set_defaults(func=decisions)
    p = sub.add_parser("logits")
    p.add_argument(
        "--settings",
        nargs="+",
        default=list(DEFAULT_SETTINGS),
        help="NUMERICS:MACHINE; each is compared with the first of its numerics",
    )
    p.set_defaults(func=logits)
    p = sub.add_parser("sensitivity")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument(
        "--work",
        type=Path,
        default=Path("runs/numerics"),
        help="the calibration zoos (large; not committed)",
    )
    p.set_defaults(func=sensitivity)
    p = sub.add_parser("throughput")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--seconds",
        type=float,
        default=4.0,
        help="timed per run for the testbed model (twice that for ViT-B-32)",
    )
    p.set_defaults(func=throughput)
    # --smoke: the throughput command runs in seconds; the others run the demo's
    # ManifoldMix per setting and take minutes even so.
    args = parse_args(
        parser,
        Path(__file__).resolve().parent / "results",
        smoke={
            "repeats": 1,
            "seconds": 0.2,
            "settings": ["native:this", "portable:this"],
            "seeds": [0],
        },
        subparsers=tuple(sub.choices.values()),
    )
    args.func(args)


if __name__ == "__main__":
    main()
