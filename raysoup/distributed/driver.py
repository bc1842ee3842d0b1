"""The driver side of a run: joining Ray, and the SoupDriver actor that owns a run's
sequential state (ranking, every method, every judgement) while every forward pass runs on
the evaluator pool."""

from __future__ import annotations

import logging
import os
import socket
import time
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np
import ray

from ..cache import JudgementCache
from ..checkpoint import StepCheckpoint, load_ranking, save_ranking
from ..console import LOG_FILE, console_logging, file_logging
from ..errors import RaysoupError
from ..evaluate import VAL, accuracy_row, ood_sets
from ..inputs.pool import load_pretrained
from ..inputs.storage import join
from ..methods import METHOD_INFO, METHODS, SoupContext, ValidationJudge
from ..numerics import enter
from ..rundir import RunDir
from ..stats import compare
from .evaluators import EvaluatorPool, EvaluatorSpec
from .racing import Racing
from .tracking import Tracker
from .tune_search import TuneSearch

if TYPE_CHECKING:
    from ..preflight import Prepared

logger = logging.getLogger(__name__)


class Judged:
    """Every model judged on every evaluation set, with its per-image correctness kept for
    the paired comparisons of the report."""

    def __init__(self, evaluator_pool: EvaluatorPool):
        self.evaluator_pool = evaluator_pool
        self.correctness: dict[str, dict[str, np.ndarray]] = {}

    def add(self, name: str, state_dict) -> dict:
        t0 = time.perf_counter()
        self.correctness[name] = self.evaluator_pool.correctness(state_dict)
        row = accuracy_row(self.correctness[name])
        images = sum(len(c) for c in self.correctness[name].values())
        logger.info(
            f"[report] {name}: judged on {len(self.correctness[name])} sets "
            f"({images} images, {time.perf_counter() - t0:.1f} s), val "
            f"{100 * row['val']:.2f}"
        )
        return row

    def comparisons(self, name: str, baselines: dict[str, str]) -> dict:
        """`name` against each judged baseline (report name: judged name), paired on the
        same images."""
        hits = self.correctness[name]
        return {
            label: compare(hits, self.correctness[judged], ood_sets(hits))
            for label, judged in baselines.items()
            if judged != name and judged in self.correctness
        }


@ray.remote(num_cpus=0, max_restarts=0)
class SoupDriver:
    """Owns the sequential state of a run: ranks, runs every method, judges every model.
    Every forward pass goes to the evaluator actors; a resumable method's step checkpoint
    is written after every step (and uploaded, when `out` is a URI). `cache_root`: the
    cache of the process that started the run (the config's or its RAYSOUP_CACHE), not of
    whichever node this actor's worker was started by."""

    def __init__(
        self,
        prepared: Prepared,
        evaluators: EvaluatorSpec,
        actors: list,
        cache_root: str,
        log_level: int = logging.INFO,
        run_dir: RunDir | None = None,
    ):
        console_logging(log_level)  # this actor's lines reach the driver's console via Ray
        file_logging(prepared.config.out)  # on the driver's node, as `out` is
        # The merges computed here (Model Stock's angles, TIES's trims, ...) use the
        # evaluators' kernels too; a head that cannot is only logged: it judges nothing.
        enter(evaluators.numerics, threads=1, strict=False)
        self.prepared = prepared
        config = prepared.config
        self.evaluator_pool = EvaluatorPool(
            actors,
            evaluators,
            prepared.pool.spec,
            prepared.eval_sources,
            JudgementCache(join(cache_root, "judgements")),
        )
        self.metrics = Tracker(
            config.out,
            config.tracking,
            {
                "zoo": str(config.pool.zoo),
                "methods": ",".join(config.methods),
                "out": str(config.out),
            },
        )
        search = config.search
        self.search = TuneSearch(
            actors,
            evaluators,
            search.num_workers,
            config.out / "tune",
            config.resources.max_failures,
            join(cache_root, "points"),
            self.evaluator_pool.set_keys.get(VAL),
            self.metrics.pass_callbacks,
            config.tracking.progress_interval_s,
            Racing(search.racing_chunks, search.racing_confidence) if search.racing else None,
        )
        self.state_dir = config.out / "driver"
        self.run_dir = run_dir or RunDir(config.out)

    def _ranking(self, judge: ValidationJudge) -> tuple[list, float]:
        """The ranking on val and its cost: kept in `driver/` when a method of the run is
        resumable, and read from there on a resume."""
        config, pool = self.prepared.config, self.prepared.pool
        keep = bool(config.resumable())
        saved = (
            load_ranking(self.state_dir, config.fingerprint(), self.evaluator_pool.domain)
            if keep
            else None
        )
        if saved is not None:
            logger.info(
                f"[driver] resuming: the ranking of {len(saved)} ingredients from {self.state_dir}"
            )
            return saved, 0.0
        t0 = time.perf_counter()
        ranking = SoupContext.rank(pool, judge).ranking
        if keep:
            save_ranking(self.state_dir, ranking, config.fingerprint(), self.evaluator_pool.domain)
            self.run_dir.sync("driver")
        return ranking, time.perf_counter() - t0

    def _context(self, ctx: SoupContext, name: str) -> SoupContext:
        """`ctx` with the method's step checkpoint (if it keeps one) and tracker."""
        config = self.prepared.config
        checkpoint = (
            StepCheckpoint(
                self.state_dir / name,
                config.fingerprint(),
                self.evaluator_pool.domain,
                # Another head resumes from what is uploaded: the step, its passes, the log.
                on_save=lambda: self.run_dir.sync("driver", "tune", LOG_FILE),
            )
            if METHOD_INFO[name].resumable
            else None
        )
        return replace(
            ctx,
            checkpoint=checkpoint,
            track=lambda step, values: self.metrics.step(name, step, values),
        )

    def run(self) -> dict:
        config, pool = self.prepared.config, self.prepared.pool
        judge = ValidationJudge(self.evaluator_pool.accuracy, rows=self.search.val_rows)
        ranking, ranking_s = self._ranking(judge)
        logger.info(
            "[driver] ranking on val: " + ", ".join(f"{n} {100 * a:.2f}" for n, a in ranking)
        )
        pretrained = load_pretrained(config.pool.zoo)
        ctx = SoupContext(
            pool,
            judge,
            ranking,
            self.prepared.components,
            self.search,
            pretrained,
            self.evaluator_pool.learn,
            self.evaluator_pool.statistic,
        )
        judged = Judged(self.evaluator_pool)
        if config.report_ingredients:
            ingredients = {
                n: {**judged.add(n, pool.load(n)), "ingredients": [n]} for n in pool.names
            }
        else:
            ingredients = {
                n: {"val": acc, "id": None, "ood": {}, "ood_avg": None, "ingredients": [n]}
                for n, acc in ranking
            }
        configs = config.method_configs()
        rows, written = {}, []
        for name in config.methods:
            t0, cached = time.perf_counter(), self.search.cached_points
            stopped = self.search.stopped_points
            method_ctx = self._context(ctx, name)
            result = (
                METHODS[name](method_ctx, configs[name])
                if name in configs
                else METHODS[name](method_ctx)
            )
            details = result.details_dict()
            if name in configs:
                details["config"] = configs[name].to_dict()
            wall = time.perf_counter() - t0 + (ranking_s if result.ranked else 0.0)
            rows[name] = {
                **judged.add(name, result.state_dict),
                "ingredients": result.ingredients,
                "evaluations": result.evaluations + (len(pool) if result.ranked else 0),
                "ranked": result.ranked,
                "wall_s": round(wall, 2),
                # evaluations answered by the point cache (measured before)
                "cached_evaluations": self.search.cached_points - cached,
                **(
                    {"stopped_evaluations": self.search.stopped_points - stopped}
                    if config.search.racing
                    else {}
                ),
                **details,
            }
            self.metrics.method(name, rows[name])
            logger.info(
                f"[driver] {name}: val {100 * rows[name]['val']:.2f}, "
                f"{len(result.ingredients)} ingredient(s)"
                + (
                    f", {rows[name]['cached_evaluations']} of its evaluations from the point cache"
                    if rows[name]["cached_evaluations"]
                    else ""
                )
            )
            if METHOD_INFO[name].write is not None:  # under `out`, on this (the head's) node
                written += METHOD_INFO[name].write(config.out, rows[name], result.state_dict)
        # Every method against the best ingredient and greedy soup, paired on the same images.
        best = ranking[0][0]
        if best not in judged.correctness:
            judged.add(best, pool.load(best))
        for name, row in rows.items():
            row["vs"] = judged.comparisons(
                name,
                {"greedy_soup": "greedy_soup"}
                if name == "best_individual"
                else {"best_individual": best, "greedy_soup": "greedy_soup"},
            )
        self.metrics.close()
        references = (
            {} if pretrained is None else {"pretrained": judged.add("pretrained", pretrained)}
        )
        cache = self.evaluator_pool.cache
        return {
            "methods": rows,
            "ingredients": ingredients,
            "references": references,
            "ranking": ranking,
            "correctness": judged.correctness,
            "written": written,
            "numerics": self.evaluator_pool.domain,
            "run_dir": self.run_dir,
            "cache": {
                "points_cached": self.search.cached_points,
                "judgements_cached": cache.cached,
                "judgements_measured": cache.measured,
            },
        }


@contextmanager
def loopback_kept():
    """Ray turns a node address of 127.0.0.1 into the machine's network address (so its
    gRPC servers would listen on every interface) unless multi-node support is off, as Ray
    does on macOS and Windows. Off while ray.init runs: services and drivers keep 127.0.0.1.
    """
    from ray._private import ray_constants

    multi_node = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = multi_node


def is_loopback(address: str) -> bool:
    host = address.split("://")[-1].rsplit(":", 1)[0]
    return host in ("127.0.0.1", "localhost")


def reachable(address: str, timeout_s: float = 5.0) -> bool:
    """Does anything accept a TCP connection at HOST:PORT (ray:// or not)?"""
    host, _, port = address.split("://")[-1].rpartition(":")
    if not host or not port.isdigit():
        return True  # not HOST:PORT: let Ray judge the address
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def connect(address: str | None, log_to_driver: bool = True) -> None:
    """Join a cluster, or start a private local one whose services bind 127.0.0.1 only.

    Token authentication stays as Ray sets it: on by default for a local Ray, and taken
    from RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH / ~/.ray/auth_token for a cluster.
    """
    if ray.is_initialized():
        return
    if not address:
        with loopback_kept():  # "local": a new Ray even when RAY_ADDRESS names a cluster
            ray.init(address="local", include_dashboard=False, log_to_driver=log_to_driver)
        return
    target = os.environ.get("RAY_ADDRESS", "") if address == "auto" else address
    if target and not reachable(target):  # ray.init would retry for minutes
        raise RaysoupError(
            f"cannot connect to the Ray cluster at {address!r}: nothing answers "
            f"at {target.split('://')[-1]} (is it running? `--address "
            f"HOST:PORT` works from a cluster node, ray://HOST:PORT from "
            f"elsewhere)"
        )
    # A loopback cluster (cluster/local.py) is reachable only under its own address.
    try:
        with loopback_kept() if is_loopback(target) else nullcontext():
            ray.init(address=address, log_to_driver=log_to_driver)
    except (ConnectionError, RuntimeError, ValueError, ray.exceptions.AuthenticationError) as e:
        raise RaysoupError(
            f"cannot connect to the Ray cluster at {address!r}: {str(e).splitlines()[0]} "
            f"(is it running? `--address HOST:PORT` works from a cluster node, ray://HOST:PORT "
            f"from elsewhere; a token-auth cluster needs RAY_AUTH_MODE=token and its token "
            f"in ~/.ray/auth_token, RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH)"
        ) from None
