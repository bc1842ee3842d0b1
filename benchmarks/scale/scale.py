"""Scale rehearsal: the reference's run shape on raysoup's real machinery, the forward pass
replaced by a wait.

The reference (arXiv 2309.08610): 72 CLIP ViT-B/32 fine-tunes in the model soups layout
(`module.` prefix, text tower kept), granularity-1, a 26k-image validation split, ImageNet
and 5 OOD report sets, NGOpt at 30 evaluations per component per pass. Real and measured
here: the pool's validation (sha256 of every file), the ranking of all 72 (each loaded by
the driver, put in the object store, fetched and loaded by every evaluator), one
ManifoldMix step (two resident models in the object store, a promise test, Tune passes of
T = --trials and 2T points, each mixing and loading 114M parameters in every evaluator),
the step checkpoint, and the report's dispatch (one model judged on every report set).
The evaluators are real Ray actors holding a real ViT-B/32 classifier; only its forward
pass is a wait of rows / --images-per-s (default: the README's H200 bf16 evaluator,
22,710 images/s). The passes run twice: mixing for real on the evaluators' CPU threads,
and mixing as a GPU would (a wait of --gpu-mix-load-s that leaves the host's cores to
Ray and Tune), so each projection carries the Tune and dispatch costs measured under its
own assumption. Distinct weight files are few (--distinct), hard-linked under 72 names.

From those unit costs, the wall time of the reference's run (71 promise tests; 27 first,
6 second and 6 third passes, the reference's 27 optimised and 6 accepted candidates) is
projected on 1, 8 and 64 GPUs, sharded (one point at a time over every evaluator: NGOpt's
Cobyla, as the reference) and whole (k = N points at once: a parallel optimiser).

    python benchmarks/scale/scale.py [--evaluators 2] [--trials 24] [--distinct 2]
Appends one row per GPU count to benchmarks/scale/results/scale.parquet and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import ray
import torch
from ray import tune

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/common.py
from common import append_result, machine, parse_args

from raysoup.checkpoint import StepCheckpoint
from raysoup.components import partition
from raysoup.distributed.evaluators import EvaluatorPool, EvaluatorSpec
from raysoup.distributed.tune_search import TuneSearch
from raysoup.inputs.data import EvalSetSource
from raysoup.inputs.model import ModelSpec, build_classifier, clip_model
from raysoup.inputs.pool import IngredientPool
from raysoup.search import lerp_mixer

INGREDIENTS = 72
VAL_ROWS = 26_000  # ImageNet2p
# ImageNet's validation set and the paper's 5 shifts (V2, Sketch, R, ObjectNet, A).
REPORT_SETS = {
    "imagenet": 50_000,
    "imagenet_v2": 10_000,
    "imagenet_sketch": 50_889,
    "imagenet_r": 30_000,
    "objectnet": 18_574,
    "imagenet_a": 7_500,
}
# The reference's run: 27 of 71 candidates optimised, 6 accepted (a second pass each;
# counted with a third pass each too, the most it could run).
PROMISE_TESTS, PASSES, ACCEPTED = INGREDIENTS - 1, 27 + 6 + 6, 6
REPORTED_MODELS = 4  # best individual, uniform soup, greedy soup, ManifoldMix


@ray.remote(max_restarts=0)
class RehearsalEvaluator:
    """An evaluator actor as raysoup's: fetches the resident models once per step, mixes
    and loads every point into a real classifier; the forward pass over its rows is a
    wait of rows / images_per_s. Records the time of each part."""

    def __init__(self, spec: ModelSpec, components, rows: dict[str, int], images_per_s: float):
        # Heavy imports here, as in raysoup's EvaluatorActor: this class travels by value
        # (it is __main__'s), and each pass's Tune trial that unpickles a handle would
        # otherwise import torch and open_clip first (3 s per pass on 2 cores).
        import torch

        from raysoup.inputs.model import build_classifier

        torch.set_num_threads(1)
        self.model = build_classifier(spec).eval()
        self.components, self.rows, self.images_per_s = components, rows, images_per_s
        self.ids: tuple = ()
        self.models, self.mixer = [], None
        self.times: dict[str, list[float]] = {"fetch": [], "mix_load": [], "forward": []}
        self.mix_load_wait: float | None = None  # mix for real (None) or wait this long

    def simulate_mixing(self, seconds: float | None) -> None:
        """Mixing on a GPU leaves the host's cores free: wait instead of mixing on them."""
        self.mix_load_wait = seconds

    def ready(self) -> str:
        return "rehearsal: no forward pass"  # the numeric domain, as raysoup's actors say it

    def val_rows(self) -> int:
        return self.rows["val"]

    def _score(self, refs, x, set_name: str) -> int:
        from raysoup.mixing import from_numpy

        t0 = time.perf_counter()
        if tuple(r.hex() for r in refs) != self.ids:
            *model_refs, mixer_ref = refs
            self.models = [from_numpy(ray.get(r)) for r in model_refs]
            self.mixer, self.ids = ray.get(mixer_ref), tuple(r.hex() for r in refs)
            self.times["fetch"].append(time.perf_counter() - t0)
        t1 = time.perf_counter()
        if self.mix_load_wait is None:
            self.model.load_state_dict(self.mixer(self.models, np.asarray(x), self.components))
        else:
            time.sleep(self.mix_load_wait)
        t2 = time.perf_counter()
        time.sleep(self.rows[set_name] / self.images_per_s)
        self.times["mix_load"].append(t2 - t1)
        self.times["forward"].append(time.perf_counter() - t2)
        return self.rows[set_name]

    def correct(self, refs, x) -> tuple[int, int]:
        rows = self._score(refs, x, "val")
        return rows // 2, rows

    def judge(self, refs, x, set_name: str) -> np.ndarray:
        return np.ones(self._score(refs, x, set_name), dtype=bool)

    def timings(self) -> dict[str, list[float]]:
        """The times recorded since the last call."""
        times, self.times = self.times, {k: [] for k in self.times}
        return times


class PassClock(tune.Callback):
    """When each trial of a pass ended, and how long Tune timed its run. A trial's share
    of the pass is the gap since the previous trial ended (its start, the point's
    evaluation, its result); the first trial's gap also holds the trial actor's start-up,
    so it counts to the pass's fixed cost with the Tune run's start and end."""

    def __init__(self):
        self.ends: list[float] = []
        self.in_trials: list[float] = []  # time_this_iter_s: the trial function's run

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.in_trials.append(result["time_this_iter_s"])

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.ends.append(time.perf_counter())


def measure_passes(
    search: TuneSearch, clocks: list[PassClock], actors: list, start: np.ndarray, trials: int
) -> dict[str, float]:
    """Two passes of T and 2T points (one point per trial): the time per point from the
    gaps between trials after the first, the rest of each pass is its fixed cost."""
    ray.get([x.timings.remote() for x in actors])  # from here: the passes' calls only
    walls = [
        timed(search.optimise, start, 0.25, 0.75, points, seed, "NGOpt")[1]
        for seed, points in enumerate((trials, 2 * trials))
    ]
    recorded = ray.get([x.timings.remote() for x in actors])
    passes = clocks[-2:]
    gaps = np.concatenate([np.diff(clock.ends) for clock in passes])
    per_point = float(np.mean(gaps))
    in_trial = float(np.mean([t for clock in passes for t in clock.in_trials[1:]]))
    # A sharded point waits for its slowest evaluator: the mean over the passes' points of
    # the longest mixing + loading + forward among the evaluators (each scored every point).
    slowest = float(
        np.mean(np.max([np.add(t["mix_load"], t["forward"]) for t in recorded], axis=0))
    )
    return {
        "pass_fixed_s": (sum(walls) - 3 * trials * per_point) / 2,
        "trial_s": per_point,  # per point: Tune, dispatch, mixing, forward
        "mix_load_s": float(np.median(np.concatenate([t["mix_load"] for t in recorded]))),
        "slowest_evaluator_s": slowest,
        # Tune and dispatch per point, beyond the evaluators' work; Tune's share of it
        "orchestration_per_point_s": per_point - slowest,
        "tune_between_trials_s": per_point - in_trial,
    }


def make_zoo(root: Path, spec: ModelSpec, distinct: int, ingredients: int) -> Path:
    """`ingredients` files in the model soups layout: `distinct` files, hard-linked."""
    zoo = root / "zoo"
    if (zoo / "manifest.json").is_file():
        return zoo
    (zoo / "ingredients").mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    classifier = build_classifier(spec).state_dict()
    text = {
        f"model.{k}": v
        for k, v in clip_model(spec.arch).state_dict().items()
        if not k.startswith("visual.")
    }
    for i in range(distinct):
        g = torch.Generator().manual_seed(i)
        moved = {
            k: v + 0.01 * v.std() * torch.randn(v.shape, generator=g)
            if v.is_floating_point() and v.numel() > 1
            else v
            for k, v in classifier.items()
        }
        torch.save(
            {f"module.{k}": v for k, v in {**moved, **text}.items()},
            zoo / "ingredients" / f"distinct-{i}.pt",
        )
    for i in range(ingredients):
        os.link(
            zoo / "ingredients" / f"distinct-{i % distinct}.pt",
            zoo / "ingredients" / f"ft-{i:02d}.pt",
        )
    for i in range(distinct):
        (zoo / "ingredients" / f"distinct-{i}.pt").unlink()
    (zoo / "manifest.json").write_text(
        json.dumps({"model": spec.to_dict(), "ingredients": "ingredients/ft-*.pt", "eval_sets": {}})
    )
    return zoo


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--evaluators", type=int, default=2)
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--distinct", type=int, default=2)
    parser.add_argument("--images-per-s", type=float, default=22_710.0)
    parser.add_argument(
        "--gpu-mix-load-s",
        type=float,
        default=0.01,
        help="assumed mixing + loading time per point on a GPU evaluator",
    )
    parser.add_argument(
        "--dir",
        type=Path,
        help="the zoo and Tune's files (default: "
        "/tmp/raysoup-scale-ARCH; with --smoke, under --out)",
    )
    parser.add_argument("--arch", default="ViT-B-32", help="the open_clip tower to rehearse")
    parser.add_argument(
        "--ingredients",
        type=int,
        default=INGREDIENTS,
        help="the rehearsal's pool (the projection is for the reference's 72)",
    )
    args = parse_args(
        parser,
        Path(__file__).resolve().parent / "results",
        smoke={"arch": "ViT-S-32", "trials": 2, "ingredients": 4},
    )
    args.dir = args.dir or (
        args.out / "work" if args.smoke else Path(f"/tmp/raysoup-scale-{args.arch}")
    )
    n = args.evaluators
    spec = ModelSpec.from_dict({"arch": args.arch, "num_classes": 1000})
    zoo = make_zoo(args.dir, spec, args.distinct, args.ingredients)

    pool, pool_s = timed(IngredientPool.from_zoo, zoo)
    _, validate_s = timed(pool.validate)
    first = pool.load(pool.names[0])
    components = partition(list(first), "granularity-1")
    params = sum(v.numel() for v in first.values())

    ray.init(num_cpus=2, num_gpus=n, include_dashboard=False, log_to_driver=False)
    rows = {"val": VAL_ROWS // n, **{k: v // n for k, v in REPORT_SETS.items()}}
    actors = [
        RehearsalEvaluator.options(num_cpus=0.01, num_gpus=1).remote(
            spec, components, rows, args.images_per_s
        )
        for _ in range(n)
    ]
    ray.get([a.ready.remote() for a in actors])
    evaluators = EvaluatorSpec(count=n, mode="sharded", cpus=0.01, gpus=1.0)
    sources = {name: EvalSetSource(name) for name in ["val", *REPORT_SETS]}
    judge = EvaluatorPool(actors, evaluators, spec, sources)  # no cache: every call judges

    # The ranking: every ingredient loaded by the driver and judged on val.
    load_s = 0.0
    t0 = time.perf_counter()
    for name in pool.names:
        state, seconds = timed(pool.load, name)
        load_s += seconds
        judge.accuracy(state)
    ranking_s = time.perf_counter() - t0

    # One ManifoldMix step: resident models, a promise test, one pass, the checkpoint.
    clocks: list[PassClock] = []

    def clock_the_pass(name: str, settings: dict) -> list:
        clocks.append(PassClock())
        return clocks[-1:]

    search = TuneSearch(
        actors, evaluators, 1, args.dir / f"tune-{time.time()}", callbacks=clock_the_pass
    )
    a, c = pool.load(pool.names[0]), pool.load(pool.names[1])
    _, set_models_s = timed(search.set_models, [a, c], lerp_mixer)
    start = np.full(len(components), 0.5)
    _, promise_s = timed(search.accuracy, start)
    search.optimise(start, 0.25, 0.75, 2, 2, "NGOpt")  # Tune's one-time start in a process
    # Mixing for real on the evaluators' CPU threads, then as a GPU would (a wait that
    # leaves the cores to Ray and Tune): each projection below uses its own measurement.
    cpu = measure_passes(search, clocks, actors, start, args.trials)
    ray.get([x.simulate_mixing.remote(args.gpu_mix_load_s) for x in actors])
    gpu = measure_passes(search, clocks, actors, start, args.trials)
    ray.get([x.simulate_mixing.remote(None) for x in actors])
    # A fresh folder: an earlier run's checkpoint of the same weights would be reused.
    checkpoint = StepCheckpoint(args.dir / f"driver-{time.time()}", {}, judge.domain)
    _, checkpoint_s = timed(checkpoint.save, {"accepted": [pool.names[0]]}, a, 1)

    # The report's dispatch: one model on every report set.
    _, report_s = timed(judge.correctness, a, list(REPORT_SETS))
    ray.shutdown()

    forward_val = VAL_ROWS / args.images_per_s  # one whole validation pass on one GPU
    forward_val_shard = forward_val / n
    per_ingredient = ranking_s / args.ingredients - forward_val_shard  # load, put, fetch, load
    report_images = sum(REPORT_SETS.values())
    report_dispatch = report_s - report_images / args.images_per_s / n
    measured = {
        "pool_validate_s": pool_s + validate_s,
        "driver_load_s": load_s / args.ingredients,
        "ranking_per_ingredient_s": per_ingredient,
        "set_models_s": set_models_s,
        "promise_s": promise_s,
        "checkpoint_s": checkpoint_s,
        "report_dispatch_s": report_dispatch,
        **{f"cpu_mixing_{k}": v for k, v in cpu.items()},
        **{f"gpu_mixing_{k}": v for k, v in gpu.items()},
    }
    print(
        f"measured on {n} evaluators ({params / 1e6:.1f}M parameters, {len(components)} "
        f"components, {args.trials} trials):"
    )
    for key, value in measured.items():
        print(f"  {key:28s} {value:8.3f}")

    budget = 30 * len(components)
    evaluations = PROMISE_TESTS + PASSES * budget
    base = {
        **machine(args.allow_dirty),
        "evaluators_measured": n,
        "parameters": params,
        "components": len(components),
        "budget_per_pass": budget,
        "images_per_s": args.images_per_s,
        **measured,
    }
    print(
        f"\nprojected reference run: {INGREDIENTS} ingredients, {PASSES} passes of {budget} "
        f"+ {PROMISE_TESTS} promise tests = {evaluations} evaluations"
    )
    print(
        "| mixing + loading per point | GPUs | mode | pool + ranking | steps (set-up, "
        "checkpoint, pass start) | search | report | total | vs 59 h |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    # Mixing runs where the evaluator's models are resident: on its GPU in a real run. The
    # CPU time measured here bounds it from above; the GPU figure is an assumption, and
    # its Tune and dispatch costs were measured with the cores left free as a GPU would.
    for mixing, mix_s, costs in (
        (f"measured here (CPU, 1 thread): {cpu['mix_load_s']:.2f} s", cpu["mix_load_s"], cpu),
        (f"assumed on the GPU: {args.gpu_mix_load_s:.2f} s", args.gpu_mix_load_s, gpu),
    ):
        orchestration, pass_fixed = costs["orchestration_per_point_s"], costs["pass_fixed_s"]
        for gpus in (1, 8, 64):
            val = forward_val / gpus
            # the pool's validation hashes every file: scaled to the reference's pool
            ranking = measured["pool_validate_s"] * INGREDIENTS / args.ingredients + INGREDIENTS * (
                per_ingredient + val
            )
            # A step checkpoint writes the weights only after an acceptance.
            steps = PROMISE_TESTS * set_models_s + ACCEPTED * checkpoint_s + PASSES * pass_fixed
            report = REPORTED_MODELS * (report_dispatch + report_images / args.images_per_s / gpus)
            for mode in ("sharded", "whole"):
                if mode == "sharded":  # one point at a time, its rows split over every GPU
                    per_point = orchestration + mix_s + val
                else:  # k = GPUs points at once, each whole on one GPU
                    per_point = (orchestration + mix_s + forward_val) / gpus
                search_s = evaluations * per_point
                total = ranking + steps + search_s + report
                row = {
                    **base,
                    "mixing": mixing,
                    "mix_load_assumed_s": mix_s,
                    "gpus": gpus,
                    "mode": mode,
                    "ranking_s": ranking,
                    "steps_s": steps,
                    "search_s": search_s,
                    "report_s": report,
                    "total_s": total,
                    "speedup_vs_reference": 59 * 3600 / total,
                }
                append_result(args.out, "scale", row)
                print(
                    f"| {mixing} | {gpus} | {mode} | {ranking / 60:.1f} min | "
                    f"{steps / 60:.1f} min | {search_s / 60:.1f} min | {report / 60:.1f} min"
                    f" | {total / 60:.1f} min | {row['speedup_vs_reference']:.0f}x |"
                )


if __name__ == "__main__":
    main()
