"""What a run tracks (the `[tracking]` section), checked before any cluster work; the
trackers themselves are Ray Tune callbacks and live in `distributed/tracking.py`."""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import asdict
from typing import Annotated, ClassVar

from pydantic import Field

from .errors import RaysoupError
from .typed import Rule, section_config


def mlflow_installed(on: bool) -> bool:
    if on and importlib.util.find_spec("mlflow") is None:
        raise ValueError("needs MLflow, which is not installed: pip install 'raysoup[mlflow]'")
    return on


def importable_callbacks(specs: tuple[str, ...]) -> tuple[str, ...]:
    for spec in specs:
        callback_class(spec)  # a RaysoupError is a ValueError: the key's error line
    return specs


@section_config
class TrackingConfig:
    SECTION: ClassVar[str] = "tracking"
    SUMMARY: ClassVar[str] = ""
    tensorboard: Annotated[
        bool,
        Field(
            description=(
                "TensorBoard events: each pass's trials under out/tune, the driver's step metrics "
                "under out/tracking"
            )
        ),
    ] = False
    mlflow: Annotated[
        bool,
        Rule(mlflow_installed),
        Field(
            description=(
                "MLflow: a run per optimiser pass under one for the whole run (pip install "
                "'raysoup[mlflow]')"
            )
        ),
    ] = False
    mlflow_uri: Annotated[
        str,
        Field(
            description=('tracking URI; "": $MLFLOW_TRACKING_URI, else a file store in out/mlruns')
        ),
    ] = ""
    mlflow_experiment: Annotated[
        str, Field(description=("the MLflow experiment the runs go to"))
    ] = "raysoup"
    callbacks: Annotated[
        tuple[str, ...],
        Rule(importable_callbacks, ('each "package.module:Class", a ray.tune.Callback')),
        Field(description=('more Tune callbacks, "package.module:Class" (W&B, ...)')),
    ] = ()
    progress_interval_s: Annotated[
        float, Field(gt=0, description=("a progress line per pass this often while it runs"))
    ] = 10.0

    def to_dict(self) -> dict:
        return {**asdict(self), "callbacks": list(self.callbacks)}


def callback_class(spec: str) -> type:
    """ "package.module:Class", a ray.tune.Callback built without arguments (configure it
    through its environment variables, as W&B's reads its own)."""
    from ray import tune

    module, _, name = spec.partition(":")
    try:
        cls = getattr(importlib.import_module(module), name) if name else None
    except (ImportError, AttributeError) as e:
        raise RaysoupError(f"cannot import {spec!r} ({e})") from None
    if not (isinstance(cls, type) and issubclass(cls, tune.Callback)):
        raise RaysoupError(
            f'{spec!r} is not a ray.tune.Callback class (write it as "package.module:Class")'
        )
    return cls
