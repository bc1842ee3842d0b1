"""Weights files: state dicts written as safetensors, and read without ever executing code
(safetensors, or torch.load with weights_only=True), from a local path or a URI."""

from __future__ import annotations

import hashlib
import io
import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import load_file, save_file

from ..errors import RaysoupError
from . import storage

StateDict = dict[str, torch.Tensor]


class CheckpointError(RaysoupError):
    """A checkpoint that cannot be used; the message names the file and key."""


def save_state_dict(state_dict: StateDict, path: Path, metadata: dict | None = None) -> None:
    """A safetensors file, written atomically."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    with storage.atomic(path) as tmp:
        save_file(tensors, str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()})


def load_state_dict(path: str | Path) -> StateDict:
    """A local path (memory-mapped) or a URI (read through pyarrow.fs)."""
    path = str(path)
    if not storage.is_file(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    remote = storage.is_uri(path)
    if path.endswith(".safetensors"):
        try:
            if not remote:
                return load_file(path)
            # Sorted like load_file: from bytes, safetensors yields a hash order that
            # changes per process, and the component order (so a search's meaning) with it.
            return dict(sorted(load_safetensors_bytes(storage.read_bytes(path)).items()))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"cannot read checkpoint {path}: {e}") from e
    try:
        source = io.BytesIO(storage.read_bytes(path)) if remote else path
        obj = torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"refusing to load {path}: it holds objects other than tensors, and loading it "
            f"would execute code from the file (torch.load weights_only=True said: "
            f"{str(e).splitlines()[0]})"
        ) from e
    except (OSError, RuntimeError, EOFError) as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from e
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"checkpoint {path} is not a state dict of tensors")
    return obj


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
