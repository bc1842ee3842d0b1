"""Experiment tracking: Tune's own logger callbacks on every optimiser pass (one Tune run
each), and the driver's step-level metrics as TensorBoard scalars."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from pydantic import Field

from .errors import RaysoupError

TRACKING_DIR = "tracking"  # the driver's TensorBoard events, in the run directory


@dataclass(frozen=True)
class TrackingConfig:
    tensorboard: bool = False
    callbacks: tuple[str, ...] = ()
    progress_interval_s: Annotated[float, Field(gt=0)] = 10.0

    def __post_init__(self):
        for spec in self.callbacks:
            callback_class(spec)  # fails before any cluster work

    def pass_callbacks(self) -> list:
        """Fresh Tune callbacks for one optimiser pass."""
        from ray.tune.logger import TBXLoggerCallback
        return [TBXLoggerCallback()] * self.tensorboard + \
            [callback_class(spec)() for spec in self.callbacks]

    def to_dict(self) -> dict:
        return {"tensorboard": self.tensorboard, "callbacks": list(self.callbacks),
                "progress_interval_s": self.progress_interval_s}


def callback_class(spec: str) -> type:
    """"package.module:Class", a ray.tune.Callback built without arguments (configure it
    through its environment variables, as W&B's and MLflow's read theirs)."""
    from ray import tune
    module, _, name = spec.partition(":")
    try:
        cls = getattr(importlib.import_module(module), name) if name else None
    except (ImportError, AttributeError) as e:
        raise RaysoupError(f"tracking.callbacks: cannot import {spec!r} ({e})") from None
    if not (isinstance(cls, type) and issubclass(cls, tune.Callback)):
        raise RaysoupError(f"tracking.callbacks: {spec!r} is not a ray.tune.Callback class "
                           f"(write it as \"package.module:Class\")")
    return cls


class StepMetrics:
    """The driver's metrics: per ManifoldMix candidate step (promise and pass accuracies,
    accepted, evaluations, best so far, ingredients) and per method (val, id, ood_avg,
    evaluations), as TensorBoard scalars under out/tracking."""

    def __init__(self, out: Path, enabled: bool):
        self.writer = None
        if enabled:
            from tensorboardX import SummaryWriter
            self.writer = SummaryWriter(str(Path(out) / TRACKING_DIR))

    def step(self, position: int, step: dict, best: float, ingredients: int,
             evaluations: int) -> None:
        if self.writer is None:
            return
        scalars = {"promise_accuracy": step["promise_accuracy"],
                   **{f"pass{i + 1}_accuracy": p["accuracy"]
                      for i, p in enumerate(step["passes"])},
                   "accepted": float(step["accepted"]), "evaluations": evaluations,
                   "best_so_far": best, "ingredients": ingredients}
        for key, value in scalars.items():
            self.writer.add_scalar(f"manifold_mix/{key}", value, position)
        self.writer.add_text("manifold_mix/candidate", step["candidate"], position)
        self.writer.flush()

    def method(self, name: str, row: dict) -> None:
        if self.writer is None:
            return
        for key in ("val", "id", "ood_avg", "evaluations"):
            if row.get(key) is not None:
                self.writer.add_scalar(f"methods/{name}/{key}", row[key], 0)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
