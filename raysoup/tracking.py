"""What a run tracks (the `[tracking]` section), checked before any cluster work; the
trackers themselves are Ray Tune callbacks and live in `distributed/tracking.py`."""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import asdict, dataclass
from typing import Annotated

from pydantic import Field

from .errors import RaysoupError


@dataclass(frozen=True)
class TrackingConfig:
    tensorboard: bool = False
    mlflow: bool = False
    mlflow_uri: str = ""
    mlflow_experiment: str = "raysoup"
    callbacks: tuple[str, ...] = ()
    progress_interval_s: Annotated[float, Field(gt=0)] = 10.0

    def __post_init__(self):
        if self.mlflow and importlib.util.find_spec("mlflow") is None:
            raise RaysoupError("tracking.mlflow = true needs MLflow, which is not installed: "
                               "pip install 'raysoup[mlflow]'")
        for spec in self.callbacks:
            callback_class(spec)  # fails before any cluster work

    def to_dict(self) -> dict:
        return {**asdict(self), "callbacks": list(self.callbacks)}


def callback_class(spec: str) -> type:
    """"package.module:Class", a ray.tune.Callback built without arguments (configure it
    through its environment variables, as W&B's reads its own)."""
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
