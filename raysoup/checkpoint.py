"""What a run keeps for `--resume`, under `out/driver/`: the ranking (ranking.json) and
each resumable method's last completed step (`<method>/state.json` and the weights it
names, safetensors).

Every JSON records the config's fingerprint and the numeric domain its accuracies were
measured in; a resume under another config or domain is refused. A step's JSON names its
weights file and is renamed into place last, so a run killed at any instant resumes from
a consistent last completed step.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from .errors import RaysoupError
from .inputs import storage
from .inputs.storage import write_json
from .inputs.weights import load_state_dict, save_state_dict
from .mixing import StateDict

STATE_FILE = "state.json"
RANKING_FILE = "ranking.json"


def read_checked(path: str, fingerprint: dict, domain: str | None = None) -> dict | None:
    """The JSON at `path` (a path or a URI), or None when absent. Refused when it was
    written under another config or, with `domain`, another numeric domain: its decisions
    would not be the ones this run makes."""
    if not storage.is_file(path):
        return None
    saved = json.loads(storage.read_bytes(path))
    where = path.rsplit("/", 1)[0]
    if saved["fingerprint"] != fingerprint:
        changed = sorted(
            k
            for k in set(fingerprint) | set(saved["fingerprint"])
            if fingerprint.get(k) != saved["fingerprint"].get(k)
        )
        raise RaysoupError(
            f"cannot resume {where}: it was started with a different "
            f"config (differs in: {', '.join(changed)})"
        )
    if domain is not None and saved.get("numerics") != domain:
        raise RaysoupError(
            f"cannot resume {where}: its steps were evaluated in the "
            f"numeric domain {saved.get('numerics')!r}, but the evaluators "
            f"now compute in {domain!r}; resume with the same "
            f'resources.numerics on the same kind of CPU ("portable" '
            f"runs on any AVX2 CPU), or start a fresh run"
        )
    return saved


def save_ranking(directory: Path, ranking: list, fingerprint: dict, domain: str) -> None:
    write_json(
        Path(directory) / RANKING_FILE,
        {"fingerprint": fingerprint, "numerics": domain, "ranking": ranking},
        indent=1,
    )


def load_ranking(
    directory: Path | str, fingerprint: dict, domain: str | None = None
) -> list[tuple[str, float]] | None:
    saved = read_checked(storage.join(str(directory), RANKING_FILE), fingerprint, domain)
    return None if saved is None else [tuple(r) for r in saved["ranking"]]


class StepCheckpoint:
    """One method's last completed step in `directory`: a JSON state and one state dict.
    `version` names the weights' content (it changes whenever they do), so a step that
    leaves them as they were rewrites only the JSON, not a model-sized file. `on_save`
    runs after every save (the run uploads the step when `out` is a URI)."""

    def __init__(
        self,
        directory: Path,
        fingerprint: dict,
        domain: str,
        on_save: Callable[[], None] | None = None,
    ):
        self.directory, self.fingerprint, self.domain = Path(directory), fingerprint, domain
        self.on_save = on_save

    def save(self, state: dict, weights: StateDict, version: int) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / STATE_FILE
        previous = json.loads(path.read_text()) if path.is_file() else None
        name = f"weights-{version:04d}.safetensors"
        if not (previous and previous["weights"] == name and (self.directory / name).is_file()):
            save_state_dict(weights, self.directory / name)
        write_json(
            path,
            {
                "fingerprint": self.fingerprint,
                "numerics": self.domain,
                "weights": name,
                "state": state,
            },
            indent=1,
        )
        for old in self.directory.glob("weights-*.safetensors"):
            if old.name != name:
                old.unlink()
        if self.on_save is not None:
            self.on_save()

    def load(self) -> tuple[dict, StateDict] | None:
        """The last completed step's state and weights, or None before the first."""
        saved = read_checked(str(self.directory / STATE_FILE), self.fingerprint, self.domain)
        if saved is None:
            return None
        return saved["state"], load_state_dict(self.directory / saved["weights"])
