"""`raysoup demo`: install (or build) the zoo, run the methods, report."""

from __future__ import annotations

import hashlib
import json
import logging
from datetime import datetime
from pathlib import Path

from ..cache import cache_dir
from ..config import PoolConfig, ResourcesConfig, RunConfig
from ..errors import RaysoupError
from ..methods.manifold_mix import ManifoldMixConfig
from ..runner import execute
from ..testbed.image import QUICK_ZOO, SHIPPED_ZOO, ZooConfig, build_zoo, install_shipped_zoo

logger = logging.getLogger(__name__)

ALL_METHODS = (
    "best_individual",
    "uniform_soup",
    "greedy_soup",
    "model_stock",
    "task_arithmetic",
    "ties_merging",
    "tsv_merge",
    "iso_c",
    "iso_cts",
    "fisher_merging",
    "regmean",
    "learned_soup",
    "adamerging",
    "manifold_mix",
)
# The image demo's default, to keep a fresh clone's run near 20 minutes on 2 cores:
# every method but the slowest data passes (per-image Fisher gradients, RegMean's Grams,
# AdaMerging's training) and Iso-CTS, and no judging of every ingredient on every set (their
# rows and scatter.png). `--all` (and --quick, --text) run ALL_METHODS and judge them.
DEMO_METHODS = tuple(
    m for m in ALL_METHODS if m not in ("iso_cts", "fisher_merging", "regmean", "adamerging")
)
# The demo's reduced ManifoldMix budget (the reference spends 30 per component per pass).
DEMO_EVALS_PER_COMPONENT = 10
QUICK_EVALS_PER_COMPONENT = 4
# Two single-thread evaluators on any machine: the same validation shards and the same
# per-image results as the README's run (more evaluators would batch other rows together,
# and float sums in another order can flip an image at a tie).
DEMO_RESOURCES = ResourcesConfig(evaluators=2, cpus_per_evaluator=0.5)


def default_zoo_dir(config: ZooConfig) -> Path:
    digest = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode()).hexdigest()
    return cache_dir() / f"zoo-{digest[:12]}"


def fresh_run_dir(out: Path | None) -> Path:
    if out is None:
        out = Path("runs") / datetime.now().strftime("demo-%Y%m%d-%H%M%S")
    out = Path(out)
    if (out / "report.json").exists():
        raise RaysoupError(f"{out} already holds a report; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    return out


def shipped_zoo_dir() -> Path:
    digest = hashlib.sha256((SHIPPED_ZOO / "manifest.json").read_bytes()).hexdigest()
    return cache_dir() / f"testbed-{digest[:12]}"


def demo_zoo(quick: bool = False, zoo_dir: Path | None = None) -> Path:
    """The demo's zoo: the shipped default zoo (installed into the cache on first use), or
    the quick one, built on first use and cached."""
    if zoo_dir is None and not quick:
        zoo_dir = shipped_zoo_dir()
        if not (zoo_dir / "manifest.json").is_file():
            logger.info(f"[zoo] installing the shipped zoo in {zoo_dir}")
        return install_shipped_zoo(zoo_dir)
    zoo_dir = Path(zoo_dir) if zoo_dir else default_zoo_dir(QUICK_ZOO)
    if (zoo_dir / "manifest.json").is_file():
        logger.info(f"[zoo] using {zoo_dir}")
    else:
        logger.info(f"[zoo] building in {zoo_dir} (cached for later runs)")
        build_zoo(zoo_dir, QUICK_ZOO)
    return zoo_dir


def shipped_text_zoo_dir() -> Path:
    """The shipped fortunes text zoo, installed into the cache on first use."""
    from ..testbed.text import SHIPPED_TEXT_ZOO, install_shipped_text_zoo

    digest = hashlib.sha256((SHIPPED_TEXT_ZOO / "manifest.json").read_bytes()).hexdigest()
    zoo_dir = cache_dir() / f"text-testbed-{digest[:12]}"
    if not (zoo_dir / "manifest.json").is_file():
        logger.info(f"[zoo] installing the shipped text zoo in {zoo_dir}")
    return install_shipped_text_zoo(zoo_dir)


def run_demo(
    out: Path | None = None,
    quick: bool = False,
    zoo_dir: Path | None = None,
    verify_sha256: bool = True,
    text: bool = False,
    every_method: bool = False,
) -> dict:
    """DEMO_METHODS on the shipped image zoo; ALL_METHODS with `every_method`, `quick` (the
    small zoo) or `text` (the shipped text zoo)."""
    if text and zoo_dir is None:
        if quick:
            raise RaysoupError(
                "raysoup demo --text has no --quick: the shipped text zoo is the small one"
            )
        zoo_dir = shipped_text_zoo_dir()
    zoo_dir = demo_zoo(quick, zoo_dir)
    budget = QUICK_EVALS_PER_COMPONENT if quick else DEMO_EVALS_PER_COMPONENT
    everything = every_method or quick or text
    config = RunConfig(
        PoolConfig(str(zoo_dir), verify_sha256),
        fresh_run_dir(out),
        methods=ALL_METHODS if everything else DEMO_METHODS,
        options={"manifold_mix": ManifoldMixConfig(evals_per_component=budget)},
        resources=DEMO_RESOURCES,
        report_ingredients=everything,
    )
    return execute(config, extra={"quick": quick, "text": text})
