"""Experiment tracking: Tune's own logger callbacks on every optimiser pass (one Tune run
each), an MLflow run per pass under one for the whole run, and the driver's step-level
metrics as TensorBoard scalars and MLflow metrics."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from ray import tune

from ..tracking import TrackingConfig, callback_class
from .workers import told_accuracies

TRACKING_DIR = "tracking"  # the driver's TensorBoard events, in the run directory
MLFLOW_DIR = "mlruns"  # the default MLflow file store, in the run directory


@cache
def mlflow_client(uri: str):
    from mlflow.tracking import MlflowClient

    if uri.startswith("file:"):
        # MLflow 3 refuses its file store unless asked for it; it is the store that needs
        # no server or database, which is why raysoup defaults to one in the run directory.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return MlflowClient(uri)


@dataclass(frozen=True)
class MlflowRun:
    """One MLflow run, by id only (picklable: Tune keeps its callbacks with the run)."""

    uri: str
    experiment_id: str
    run_id: str

    @classmethod
    def start(
        cls, uri: str, experiment: str, name: str, params: dict, parent: MlflowRun | None = None
    ) -> MlflowRun:
        client = mlflow_client(uri)
        found = client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else client.create_experiment(experiment)
        tags = {"mlflow.parentRunId": parent.run_id} if parent else {}
        run = client.create_run(experiment_id, run_name=name, tags=tags)
        for key, value in params.items():
            client.log_param(run.info.run_id, key, value)
        return cls(uri, experiment_id, run.info.run_id)

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        mlflow_client(self.uri).log_batch(
            self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()]
        )

    def end(self) -> None:
        mlflow_client(self.uri).set_terminated(self.run_id)


class MlflowPass(tune.Callback):
    """One optimiser pass as an MLflow run, a child of the whole run's: every evaluated
    point's accuracy (as told to the optimiser) and the best so far, by evaluation index,
    and the pass's settings."""

    def __init__(self, parent: MlflowRun, name: str, params: dict):
        self.parent, self.name, self.params = parent, name, params
        self.run: MlflowRun | None = None
        self.evaluations, self.best = 0, float("-inf")

    def setup(self, **info):
        p = self.parent
        experiment = mlflow_client(p.uri).get_experiment(p.experiment_id).name
        self.run = MlflowRun.start(p.uri, experiment, self.name, self.params, parent=p)

    def on_trial_complete(self, iteration, trials, trial, **info):
        # A raced point stopped early is told (and logged as) its paired estimate.
        for accuracy in told_accuracies(trial.last_result) or []:
            self.evaluations += 1
            self.best = max(self.best, accuracy)
            self.run.log({"accuracy": accuracy, "best_so_far": self.best}, self.evaluations)

    def on_experiment_end(self, trials, **info):
        self.run.end()


class Tracker:
    """What a run tracks: the driver's metrics per ManifoldMix candidate step (promise and
    pass accuracies, accepted, evaluations, best so far, ingredients) and per method (val,
    id, ood_avg, evaluations), as TensorBoard scalars under out/tracking and as metrics of
    an MLflow run named after the run directory; and fresh Tune callbacks for each
    optimiser pass (Tune's TBX logger, an MLflow child run, any by name)."""

    def __init__(self, out: Path, config: TrackingConfig, params: dict | None = None):
        self.config = config
        self.writer, self.mlflow = None, None
        if config.tensorboard:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(str(Path(out) / TRACKING_DIR))
        if config.mlflow:
            uri = (
                config.mlflow_uri
                or os.environ.get("MLFLOW_TRACKING_URI")
                or (Path(out) / MLFLOW_DIR).resolve().as_uri()
            )
            self.mlflow = MlflowRun.start(
                uri, config.mlflow_experiment, Path(out).name, params or {}
            )

    def pass_callbacks(self, name: str, params: dict) -> list:
        """Fresh Tune callbacks for the optimiser pass `name`."""
        from ray.tune.logger import TBXLoggerCallback

        return (
            [TBXLoggerCallback()] * self.config.tensorboard
            + [MlflowPass(self.mlflow, name, params)] * (self.mlflow is not None)
            + [callback_class(spec)() for spec in self.config.callbacks]
        )

    def _scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)
            self.writer.flush()
        if self.mlflow is not None:
            self.mlflow.log(values, step)

    def step(self, method: str, position: int, values: dict) -> None:
        """A method's metrics after one of its steps: numbers as scalars, text as text."""
        self._scalars(
            {f"{method}/{k}": v for k, v in values.items() if not isinstance(v, str)}, position
        )
        if self.writer is not None:
            for key, text in values.items():
                if isinstance(text, str):
                    self.writer.add_text(f"{method}/{key}", text, position)

    def method(self, name: str, row: dict) -> None:
        self._scalars(
            {
                f"methods/{name}/{key}": row[key]
                for key in ("val", "id", "ood_avg", "evaluations")
                if row.get(key) is not None
            },
            0,
        )

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.mlflow is not None:
            self.mlflow.end()
