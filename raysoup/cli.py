"""Thin command line: parse, call the library, turn user errors into one clear line."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .console import console_logging
from .errors import RaysoupError


def _demo(args: argparse.Namespace) -> None:
    from .tools.demo import run_demo

    run_demo(
        out=args.out,
        quick=args.quick,
        zoo_dir=args.zoo,
        verify_sha256=not args.no_verify,
        text=args.text,
        every_method=args.all,
    )


def _run(args: argparse.Namespace) -> None:
    from .config import load_config
    from .runner import execute

    execute(load_config(args.config), resume=args.resume, address=args.address)


def _check(args: argparse.Namespace) -> None:
    from .config import load_config
    from .preflight import plan, validate_run

    print(plan(validate_run(load_config(args.config), resume=args.resume)))
    print(f"[check] {args.config}: ok (nothing was started)")


def _report(args: argparse.Namespace) -> None:
    from .inputs import storage
    from .rundir import RunDir

    with RunDir.reading(args.run_dir, "report.json", "bench.parquet") as run:
        if (run.local / "bench.parquet").is_file():  # a benchmark folder
            from .tools.bench_plots import write_all

            paths = write_all(run.local / "bench.parquet", run.local)
            print((run.local / "summary.md").read_text())
        else:
            from .api import load_report
            from .runner import redraw

            report = load_report(args.run_dir)
            print(report.table())
            paths = redraw(run.local, report.raw)
        written = [p.relative_to(run.local).as_posix() for p in paths]
        run.sync(*written)  # a URI's redrawn figures go back beside its report
    for rel in written:
        print(f"[report] wrote {storage.join(args.run_dir, rel)}")


def _export(args: argparse.Namespace) -> None:
    from .export import export_like

    print(f"[export] wrote {export_like(args.run_dir, args.like, args.out)}")


def _bench(args: argparse.Namespace) -> None:
    from .tools.bench import load_grid, run_bench
    from .tools.bench_plots import write_all
    from .tools.demo import demo_zoo

    grid = load_grid(args.config, args.quick)
    zoo = args.zoo or demo_zoo(args.quick)
    out = args.out or Path("runs") / ("bench-quick" if args.quick else "bench")
    table = run_bench(zoo, out, grid, address=args.address, allow_dirty=args.allow_dirty)
    for path in write_all(table, out):
        print(f"[bench] wrote {path}")


def _prepare(args: argparse.Namespace) -> None:
    if args.text:
        from .tools.prepare_text import prepare_text

        prepare_text(
            args.src,
            args.out,
            text_column=args.text_column,
            label_column=args.label_column,
            classes=args.classes,
            shard_size=args.shard_size,
        )
        print(f"[prepare] ready: {args.out}/dataset.json")
        return
    from .tools.prepare import prepare_dataset

    prepare_dataset(
        args.src,
        args.out,
        arch=args.arch,
        image_size=args.image_size,
        classes=args.classes,
        val_fraction=args.val_fraction,
        seed=args.seed,
        workers=args.workers,
        shard_size=args.shard_size,
        strict=args.strict,
    )
    print(f"[prepare] ready: {args.out}/dataset.json")


def _zeroshot(args: argparse.Namespace) -> None:
    from .inputs.weights import save_state_dict
    from .tools.zeroshot import load_clip, read_lines, templates_for, zeroshot_classifier

    classes = read_lines(args.classes, "classes")
    templates = templates_for(args.templates)
    clip = load_clip(args.arch, args.pretrained)
    save_state_dict(
        zeroshot_classifier(clip, args.arch, classes, templates),
        args.out,
        metadata={
            "arch": args.arch,
            "pretrained": args.pretrained,
            "classes": len(classes),
            "templates": len(templates),
        },
    )
    print(
        f"[zeroshot] wrote {args.out}: {args.arch} with a zero-shot head for "
        f"{len(classes)} classes ({len(templates)} prompts each)"
    )


def _zoo_build(args: argparse.Namespace) -> None:
    if args.ingredients is not None and args.ingredients < 2:
        raise RaysoupError(f"--ingredients must be at least 2, got {args.ingredients}")
    if args.text:
        from .testbed.text import TINY_TEXT_ZOO, TextZooConfig, build_text_zoo, with_overrides

        base = TINY_TEXT_ZOO if args.quick else TextZooConfig()
        build_text_zoo(args.out, with_overrides(base, ingredients=args.ingredients, seed=args.seed))
    else:
        from .testbed.image import QUICK_ZOO, ZooConfig, build_zoo, with_overrides

        base = QUICK_ZOO if args.quick else ZooConfig()
        build_zoo(args.out, with_overrides(base, ingredients=args.ingredients, seed=args.seed))
    print(f"[zoo] ready: {args.out}/manifest.json")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raysoup",
        description=(
            "Fuse fine-tuned checkpoints of one model into a robust soup (ManifoldMixMS on Ray)."
        ),
    )
    verbosity = argparse.ArgumentParser(add_help=False)  # on every command
    loud = verbosity.add_mutually_exclusive_group()
    loud.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="warnings and errors only on the console (a run's raysoup.log keeps everything)",
    )
    loud.add_argument("-v", "--verbose", action="store_true", help="debug lines too")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, **kwargs) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[verbosity], **kwargs)

    demo = command("demo", help="run the merge methods on the shipped Fashion-MNIST zoo")
    demo.add_argument(
        "--all",
        action="store_true",
        help="every method, the slow data "
        "passes too (Fisher, RegMean, AdaMerging, Iso-CTS), and every "
        "ingredient judged on every set (scatter.png)",
    )
    demo.add_argument("--out", type=Path, help="run directory (default: a fresh runs/demo-*)")
    demo.add_argument("--quick", action="store_true", help="smaller zoo and budget (smoke run)")
    demo.add_argument(
        "--text",
        action="store_true",
        help="the shipped fortunes text zoo (a tiny BERT and 12 fine-tunes; docs/text_testbed.md)",
    )
    demo.add_argument(
        "--zoo",
        type=Path,
        help="zoo directory (default: the shipped zoo, installed into the cache)",
    )
    demo.add_argument(
        "--no-verify",
        action="store_true",
        help="use zoo files whose sha256 differs from the manifest's",
    )
    demo.set_defaults(func=_demo)

    run = command("run", help="run ManifoldMix from a TOML config on a Ray cluster")
    run.add_argument("config", type=Path, help="TOML file (see examples/run.toml)")
    run.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run from its last completed step",
    )
    run.add_argument(
        "--address",
        help="an existing Ray cluster (auto, HOST:PORT or "
        "ray://HOST:PORT); default: start a local one",
    )
    run.set_defaults(func=_run)

    check = command(
        "check",
        help="validate a run config, its zoo and its data as "
        "`run` would, without starting Ray, and print what the run would do",
    )
    check.add_argument("config", type=Path, help="TOML file (see examples/run.toml)")
    check.add_argument("--resume", action="store_true", help="check it as a --resume")
    check.set_defaults(func=_check)

    report = command(
        "report",
        help="re-print a finished run's table and redraw its "
        "figures (or a benchmark folder's) from its files",
    )
    report.add_argument("run_dir", help="the run's `out`: a path or a URI (s3://...)")
    report.set_defaults(func=_report)

    export = command(
        "export",
        help="write a run's fused model in an ingredient's own "
        "format (keys, prefixes, dtypes, container)",
    )
    export.add_argument("run_dir", help="the run's `out`: a path or a URI (s3://...)")
    export.add_argument("--like", required=True, help="the ingredient whose format to copy")
    export.add_argument("--out", required=True, help="the checkpoint to write: a path or a URI")
    export.set_defaults(func=_export)

    bench = command(
        "bench",
        help="benchmark optimisers, budgets, parallel trials and "
        "component granularity on a zoo (resumable)",
    )
    bench.add_argument("--quick", action="store_true", help="a tiny grid (CI smoke run)")
    bench.add_argument(
        "--config",
        type=Path,
        help="TOML with a [grid] section (see "
        "benchmarks/optimizer_budget/grids/); default: the full grid",
    )
    bench.add_argument("--zoo", help="zoo directory or URI (default: the demo's zoo)")
    bench.add_argument(
        "--out",
        type=Path,
        help="results folder: bench.parquet, figures, "
        "summary.md (default: runs/bench or runs/bench-quick)",
    )
    bench.add_argument("--address", help="an existing Ray cluster (default: a local one)")
    bench.add_argument(
        "--allow-dirty",
        action="store_true",
        help="write rows from a tree that is not a clean git commit (they are marked dirty = true)",
    )
    bench.set_defaults(func=_bench)

    prep = command(
        "prepare",
        help="images (a folder per class, or a CSV/Parquet of "
        "path,label) to preprocessed Arrow shards for evaluation (resumable); "
        "with --text, a CSV/JSONL/Parquet of text and labels to a text set",
    )
    prep.add_argument(
        "src",
        type=Path,
        help="image folder, or .csv/.parquet with path,label; "
        "with --text, a .csv/.jsonl/.parquet file",
    )
    prep.add_argument("--out", type=Path, required=True)
    prep.add_argument("--text", action="store_true", help="src holds texts and labels")
    prep.add_argument("--text-column", default="text", help="--text: the text column")
    prep.add_argument(
        "--label-column",
        default="label",
        help="--text: the label column "
        "(ints, or class names mapped to ints in --classes' or sorted order)",
    )
    size = prep.add_mutually_exclusive_group()
    size.add_argument(
        "--arch", help="open_clip model whose eval preprocessing to apply (e.g. ViT-B-32)"
    )
    size.add_argument(
        "--image-size",
        type=int,
        help="square input size (open_clip's default preprocessing at that size)",
    )
    prep.add_argument(
        "--classes",
        type=Path,
        help="class names, one per line, in the "
        "model's order (default: sorted folder names / labels)",
    )
    prep.add_argument(
        "--val-fraction",
        type=float,
        help="carve a validation split of this "
        "fraction per class (only it is written; the split is recorded)",
    )
    prep.add_argument("--seed", type=int, default=0, help="seed of the validation split")
    prep.add_argument("--workers", type=int, help="processes (default: all cores)")
    prep.add_argument("--shard-size", type=int, default=1000, help="images per shard")
    prep.add_argument(
        "--strict", action="store_true", help="fail on an unreadable image instead of skipping it"
    )
    prep.set_defaults(func=_prepare)

    zs = command(
        "zeroshot",
        help="a CLIP classifier with a zero-shot head from class "
        "names and prompts (an ingredient / the pretrained reference)",
    )
    zs.add_argument("--arch", required=True, help="open_clip model name, e.g. ViT-B-32-quickgelu")
    zs.add_argument(
        "--pretrained",
        required=True,
        help="a checkpoint file, or an open_clip "
        "tag whose weights are in the local Hugging Face cache (never downloaded)",
    )
    zs.add_argument(
        "--classes",
        type=Path,
        required=True,
        help="class names for the prompts, one per line, in the model's class order",
    )
    zs.add_argument(
        "--templates",
        default="openai",
        help="openai (80 prompts), simple (7), or a file with one '{}' prompt per line",
    )
    zs.add_argument("--out", type=Path, required=True, help="output .safetensors")
    zs.set_defaults(func=_zeroshot)

    zoo = command("zoo", help="the testbeds (Fashion-MNIST; --text: fortunes)").add_subparsers(
        dest="zoo_command", required=True
    )
    build = zoo.add_parser(
        "build", parents=[verbosity], help="build (or finish) a zoo; cached and deterministic"
    )
    build.add_argument("--out", type=Path, required=True)
    build.add_argument("--ingredients", type=int)
    build.add_argument("--seed", type=int)
    build.add_argument(
        "--quick",
        action="store_true",
        help="the smaller zoo used by demo --quick (with --text: a tiny text zoo of seconds)",
    )
    build.add_argument(
        "--text", action="store_true", help="the fortunes text testbed (docs/text_testbed.md)"
    )
    build.set_defaults(func=_zoo_build)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console_logging(
        logging.WARNING if args.quiet else logging.DEBUG if args.verbose else logging.INFO
    )
    try:
        args.func(args)
    except RaysoupError as e:
        print(f"raysoup: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("raysoup: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
