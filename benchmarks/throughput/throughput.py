"""Evaluation throughput: the Evaluator against the raw forward pass of the same model.

For each model, on one device, with one batch size and thread count (warm-up first, then
`--repeats` interleaved passes; best-of is the headline, the median is recorded too):
- raw: the Evaluator's own module (same weights) on one pre-built float batch, already
  normalised and 3-channel, on the device: vision tower -> feature L2 norm -> head, under
  torch.inference_mode, no argmax, no labels. The ideal the Evaluator can reach.
- evaluator: `Evaluator.correct` over a resident uint8 EvalSet of `--images` random images
  (uint8 -> float, normalisation, forward, argmax, counting: one real evaluation).
- preprocess: only the classifier's uint8 -> normalised float step on the same batches,
  to show where the Evaluator loses time.
ratio = evaluator images/s / raw images/s (target: close to 1). Projected time of one
26k-image evaluation (the reference's ImageNet2p size) = 26000 / evaluator images/s, and
sharded over `--shards` devices = 26000 / (shards x images/s); the reference needed about
35 s per such evaluation on 2 GPUs.

Models: tiny = the default ModelSpec (the zoo/testbed model, 28 px grayscale);
vit-b-32 = an open_clip ViT-B-32 vision tower (random weights, 224 px RGB) plus a
1000-class head; its tower's parameter count is checked against
open_clip.create_model("ViT-B-32", pretrained=None).visual (offline, nothing downloaded).
Uses the GPU whenever one is available (`--device` overrides); fp32 unless `--bf16`
(autocast, GPU only, applied to both paths).

    python benchmarks/throughput/throughput.py [--models tiny vit-b-32] [--images-vit 128] [--bf16]
Appends one row per model to benchmarks/throughput/results/throughput.parquet and prints a table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/common.py
from common import append_result, machine, parse_args

from raysoup.evaluate import Evaluator
from raysoup.inputs.data import EvalSet
from raysoup.inputs.model import ModelSpec

REFERENCE_IMAGES = 26_000  # ImageNet2p, the reference's held-out validation set
REFERENCE_S, REFERENCE_DEVICES = 35.0, 2  # reference: ~35 s per evaluation on 2 GPUs
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)  # open_clip.constants.OPENAI_DATASET_*
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

SPECS = {
    "tiny": ModelSpec(),
    "vit-b-32": ModelSpec(
        image_size=224,
        in_channels=3,
        patch_size=32,
        width=768,
        layers=12,
        heads=12,
        embed_dim=512,
        num_classes=1000,
        mean=OPENAI_MEAN,
        std=OPENAI_STD,
    ),
}


def open_clip_visual_params() -> int:
    """Parameters of open_clip's own ViT-B-32 vision tower (random init, no download)."""
    import open_clip
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    assert tuple(OPENAI_DATASET_MEAN) == OPENAI_MEAN and tuple(OPENAI_DATASET_STD) == OPENAI_STD
    model = open_clip.create_model("ViT-B-32", pretrained=None, device="cpu")
    return sum(p.numel() for p in model.visual.parameters())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def raw_forward(model, x: torch.Tensor) -> torch.Tensor:
    """ImageClassifier.forward without its preprocessing (x is already normalised)."""
    features = model.model.visual(x)
    if model.spec.normalize_features:
        features = features / features.norm(dim=-1, keepdim=True)
    return model.classification_head(features)


def measure(
    name: str,
    spec: ModelSpec,
    images: int,
    batch_size: int,
    device: torch.device,
    bf16: bool,
    repeats: int,
    seed: int,
) -> dict:
    rng = np.random.default_rng(seed)
    x = rng.integers(
        0, 256, (images, spec.in_channels, spec.image_size, spec.image_size), dtype=np.uint8
    )
    y = rng.integers(0, spec.num_classes, images, dtype=np.int64)
    batch_size = min(batch_size, images)
    sizes = [min(batch_size, images - s) for s in range(0, images, batch_size)]
    warm = batch_size + (sizes[-1] if sizes[-1] != batch_size else 0)  # each batch shape once
    evaluator = Evaluator(
        spec,
        [EvalSet("bench", x, y), EvalSet("warmup", x[:warm], y[:warm])],
        batch_size=batch_size,
        device=str(device),
        autocast_bf16=bf16,
    )
    del x
    model = evaluator.model  # the very module (and weights) the Evaluator uses
    autocast = evaluator.autocast_bf16
    resident = evaluator.sets["bench"][0]
    with torch.inference_mode():
        batch = model.preprocess(resident[:batch_size]).contiguous()  # float, normalised, 3 ch

    @torch.inference_mode()
    def raw_pass(batch_sizes: list[int] = sizes) -> None:
        for n in batch_sizes:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                raw_forward(model, batch[:n])

    @torch.inference_mode()
    def preprocess_pass() -> None:
        for s in range(0, images, batch_size):
            model.preprocess(resident[s : s + batch_size])

    def timed(fn) -> float:
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        return time.perf_counter() - t0

    def warm_up(fn, max_calls: int = 8) -> None:
        """Call until a call is no longer clearly faster than the one before (the first
        forward calls of a process were seen running several times slower on a busy CPU)."""
        last = None
        for _ in range(max_calls):
            t = timed(fn)
            if last is not None and t > 0.8 * last:
                break
            last = t

    # Warm-up: each batch shape through each path (kernels, allocator, autotuning).
    warm_up(lambda: raw_pass(sorted(set(sizes))))
    warm_up(lambda: evaluator.correct("warmup"))
    preprocess_pass()
    raw_s, eval_s, pre_s = [], [], []
    for _ in range(repeats):  # interleaved, so drift on a shared machine hits both paths
        raw_s.append(timed(raw_pass))
        eval_s.append(timed(lambda: evaluator.correct("bench")))
        pre_s.append(timed(preprocess_pass))
    raw_ips, eval_ips = images / min(raw_s), images / min(eval_s)
    return {
        "model": name,
        "device": device.type,
        "dtype": "bf16" if autocast else "fp32",
        "threads": torch.get_num_threads(),
        "batch_size": batch_size,
        "images": images,
        "repeats": repeats,
        "params": sum(p.numel() for p in model.parameters()),
        "visual_params": sum(p.numel() for p in model.model.visual.parameters()),
        "raw_images_per_s": raw_ips,
        "evaluator_images_per_s": eval_ips,
        "ratio": eval_ips / raw_ips,
        "raw_images_per_s_median": images / statistics.median(raw_s),
        "evaluator_images_per_s_median": images / statistics.median(eval_s),
        "ratio_median": statistics.median(raw_s) / statistics.median(eval_s),
        "preprocess_images_per_s": images / min(pre_s),
        "preprocess_share": min(pre_s) / min(eval_s),
        "projected_26k_s": REFERENCE_IMAGES / eval_ips,
        "raw_projected_26k_s": REFERENCE_IMAGES / raw_ips,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", choices=list(SPECS), default=list(SPECS))
    parser.add_argument(
        "--images-tiny",
        type=int,
        default=6000,
        help="images for the tiny model (default: the demo zoo's val size)",
    )
    parser.add_argument(
        "--images-vit",
        type=int,
        default=None,
        help=f"images for ViT-B-32 (default: {REFERENCE_IMAGES} on CUDA, 128 on CPU)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=1000,
        help="the Evaluator's default; capped at the image count",
    )
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU only)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--shards",
        type=int,
        default=REFERENCE_DEVICES,
        help="devices for the sharded projection (the reference used 2 GPUs)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-save", action="store_true", help="print only, append no rows")
    args = parse_args(
        parser,
        Path(__file__).resolve().parent / "results",
        smoke={"images_tiny": 64, "images_vit": 4, "batch_size": 32, "threads": 1, "repeats": 1},
    )
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    images = {
        "tiny": args.images_tiny,
        "vit-b-32": args.images_vit or (REFERENCE_IMAGES if device.type == "cuda" else 128),
    }

    base = machine(args.allow_dirty)
    rows = []
    for name in args.models:
        row = measure(
            name,
            SPECS[name],
            images[name],
            args.batch_size,
            device,
            args.bf16,
            args.repeats,
            args.seed,
        )
        if name == "vit-b-32":
            row["open_clip_visual_params"] = reference = open_clip_visual_params()
            row["visual_params_match"] = row["visual_params"] == reference
            print(
                f"ViT-B-32 vision tower: {row['visual_params']:,} parameters; open_clip "
                f"create_model('ViT-B-32', pretrained=None).visual: {reference:,} -> "
                f"{'same' if row['visual_params_match'] else 'DIFFERENT'}"
            )
        row.update(
            {
                "shards": args.shards,
                "projected_26k_sharded_s": row["projected_26k_s"] / args.shards,
                "reference_26k_s": REFERENCE_S,
                "reference_devices": REFERENCE_DEVICES,
            }
        )
        row = {**base, **row}
        rows.append(row)
        if not args.no_save:
            append_result(args.out, "throughput", row)

    print(
        f"\n{base['cpus']} cpus ({base['cpu']}), gpu: {base['gpu']}, torch {base['torch']}, "
        f"commit {base['commit']}"
    )
    print(
        f"{'model':9s} {'dev':4s} {'dtype':5s} {'batch':>5s} {'images':>6s} {'raw img/s':>10s} "
        f"{'eval img/s':>10s} {'ratio':>6s} {'prep %':>6s} {'26k s':>8s} "
        f"{f'26k s/{args.shards}dev':>11s}"
    )
    for r in rows:
        print(
            f"{r['model']:9s} {r['device']:4s} {r['dtype']:5s} {r['batch_size']:5d} "
            f"{r['images']:6d} {r['raw_images_per_s']:10.1f} "
            f"{r['evaluator_images_per_s']:10.1f} {r['ratio']:6.3f} "
            f"{100 * r['preprocess_share']:6.1f} {r['projected_26k_s']:8.1f} "
            f"{r['projected_26k_sharded_s']:11.1f}"
        )
    print(
        f"(reference: ~{REFERENCE_S:.0f} s per {REFERENCE_IMAGES}-image evaluation on "
        f"{REFERENCE_DEVICES} GPUs; 'prep %' = share of the evaluator's time spent in "
        "uint8 -> normalised float)"
    )


if __name__ == "__main__":
    main()
