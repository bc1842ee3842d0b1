"""The metric every model is judged by: one score in [0, 1] per example.

The default is top-1 correctness (right or wrong). `metric = "package.module:function"` in a
run config names the user's own: called with a batch's logits (after an evaluation set's
class-map projection; float32, on the evaluator's device) and its labels (int64), it
returns one score per example, a tensor or array of shape (N,). Every accuracy of a report
is then the mean score; paired comparisons keep the exact McNemar test only where the
scores are 0 and 1 (raysoup.stats). The function must be importable wherever evaluators
run, as Tune callbacks are.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .errors import RaysoupError

CHECK_ROWS = 8  # the small batch a metric is tried on before any cluster work


@dataclass(frozen=True)
class Metric:
    name: str  # "package.module:function"
    function: Callable
    identity: str  # what cached results are keyed on: name + source sha256
    binary: bool  # its scores on the check batch were all 0 or 1


def _source_sha256(function: Callable) -> str:
    """The sha256 of the file that defines `function`: editing the metric's module changes
    the identity, so no cached score of the old code is read back."""
    try:
        path = inspect.getsourcefile(function)
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except (TypeError, OSError):  # no source on disk (a builtin, an extension module)
        return ""


def checked_scores(scores, rows: int, name: str) -> torch.Tensor:
    """`scores` as a tensor of shape (rows,) in [0, 1]; else one line saying what is wrong."""
    try:
        scores = torch.as_tensor(scores)
    except (TypeError, ValueError, RuntimeError) as e:
        raise RaysoupError(
            f"metric {name!r} returned {type(scores).__name__}, not one score per example ({e})"
        ) from None
    if tuple(scores.shape) != (rows,):
        raise RaysoupError(
            f"metric {name!r} returned shape {tuple(scores.shape)} for a batch "
            f"of {rows} examples; it must return one score per example, "
            f"shape ({rows},)"
        )
    if scores.dtype == torch.bool:
        return scores
    if scores.is_complex() or not (
        scores.is_floating_point() or scores.dtype.is_signed or scores.dtype == torch.uint8
    ):
        raise RaysoupError(
            f"metric {name!r} returned {scores.dtype} scores; give real numbers in [0, 1]"
        )
    scores = scores.to(torch.float64)
    bad = ~((scores >= 0) & (scores <= 1))  # NaN is bad too
    if bad.any():
        value = float(scores[bad][0])
        raise RaysoupError(
            f"metric {name!r} returned a score of {value} (scores must lie in [0, 1])"
        )
    return scores


def load_metric(name: str, num_classes: int) -> Metric:
    """The config's `metric`, imported and tried on a small batch of random logits (in this
    process, before any cluster work): importable, callable, one score per example, in
    [0, 1]."""
    module_name, _, attribute = name.partition(":")
    if not module_name or not attribute:
        raise RaysoupError(f'metric = {name!r}: write it as "package.module:function"')
    try:
        function = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as e:
        raise RaysoupError(f"metric = {name!r}: cannot import it ({e})") from None
    if not callable(function):
        raise RaysoupError(
            f"metric = {name!r} is a {type(function).__name__}, not a function of (logits, labels)"
        )
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(CHECK_ROWS, num_classes, generator=generator)
    labels = torch.arange(CHECK_ROWS) % num_classes
    try:
        scores = function(logits, labels)
    except Exception as e:  # noqa: BLE001 - the user's code: any failure is theirs to see
        raise RaysoupError(
            f"metric = {name!r} fails on a batch of {CHECK_ROWS} logits "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from None
    scores = checked_scores(scores, CHECK_ROWS, name)
    binary = bool(((scores == 0) | (scores == 1)).all())
    return Metric(name, function, f"{name}@{_source_sha256(function)}", binary)


def score(metric: Metric | None, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per example: top-1 correctness (bool), or the metric's checked scores."""
    if metric is None:
        return logits.argmax(dim=1) == labels
    return checked_scores(metric.function(logits.float(), labels), len(labels), metric.name)


def as_binary(scores, name: str):
    """Scores that must be right/wrong (racing's paired counts) as booleans."""
    scores = np.asarray(scores)
    if scores.dtype != bool:
        if not np.isin(scores, (0, 1)).all():
            raise RaysoupError(
                f"metric {name!r} returned a score other than 0 or 1; "
                f"method.racing needs right/wrong scores"
            )
        scores = scores.astype(bool)
    return scores
