"""The driver's step checkpoints: accumulator weights (safetensors) plus state (JSON).

The JSON names the weights file it belongs to and is renamed into place last, so a run
killed at any instant resumes from a consistent last completed step.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import RaysoupError
from .inputs import storage
from .inputs.pool import load_state_dict, save_state_dict
from .inputs.storage import write_json
from .methods.manifold_mix import MixState

STATE_FILE = "state.json"


def save_state(directory: Path, state: MixState, fingerprint: dict, ranking: list,
               domain: str) -> None:
    """`domain`: the numeric domain the steps were evaluated in (raysoup.numerics)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / STATE_FILE
    previous = json.loads(path.read_text()) if path.is_file() else None
    if (previous and previous["fingerprint"] == fingerprint and
            previous["state"]["accepted"] == state.accepted and
            (directory / previous["weights"]).is_file()):
        # The accumulator changes only when a candidate is accepted: after a rejected or
        # skipped step only the JSON is rewritten (a model-sized write saved per step).
        weights = previous["weights"]
    else:
        weights = f"accumulator-{state.next_candidate:04d}.safetensors"
        save_state_dict(state.accumulator, directory / weights)
    write_json(directory / STATE_FILE, {"fingerprint": fingerprint, "numerics": domain,
                                        "ranking": ranking, "weights": weights,
                                        "state": state.summary()}, indent=1)
    for old in directory.glob("accumulator-*.safetensors"):
        if old.name != weights:
            old.unlink()


def saved_state(directory: Path | str, fingerprint: dict, domain: str | None = None
                ) -> dict | None:
    """The last completed step's state.json (`directory` a path or a URI), or None when the
    run has not completed one yet. With `domain`, a run whose steps were evaluated in
    another numeric domain is refused: its decisions would not be the ones this domain
    makes."""
    path = storage.join(str(directory), STATE_FILE)
    if not storage.is_file(path):
        return None
    saved = json.loads(storage.read_bytes(path))
    if saved["fingerprint"] != fingerprint:
        changed = sorted(k for k in set(fingerprint) | set(saved["fingerprint"])
                         if fingerprint.get(k) != saved["fingerprint"].get(k))
        raise RaysoupError(f"cannot resume {directory}: it was started with a different "
                           f"config (differs in: {', '.join(changed)})")
    if domain is not None and saved.get("numerics") != domain:
        raise RaysoupError(f"cannot resume {directory}: its steps were evaluated in the "
                           f"numeric domain {saved.get('numerics')!r}, but the evaluators "
                           f"now compute in {domain!r}; resume with the same "
                           f"resources.numerics on the same kind of CPU (\"portable\" "
                           f"runs on any AVX2 CPU), or start a fresh run")
    return saved


def load_state(directory: Path, fingerprint: dict, domain: str | None = None
               ) -> tuple[MixState, list] | None:
    """The last completed step (saved_state's checks), or None."""
    saved = saved_state(directory, fingerprint, domain)
    if saved is None:
        return None
    state = MixState(accumulator=load_state_dict(storage.join(str(directory), saved["weights"])),
                     **saved["state"])
    return state, [tuple(r) for r in saved["ranking"]]
