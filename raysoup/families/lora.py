"""PEFT LoRA adapters as ingredients: an adapter folder (adapter_config.json and
adapter_model.safetensors) of the pool's model is the model's own weights plus the
adapter's delta, B @ A * scaling on every adapted weight, and the adapter's own copies
of its `modules_to_save` (a new classifier head)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from ..inputs.weights import CheckpointError, load_state_dict
from .base import StateDict

PEFT_PREFIX = "base_model.model."


def adapter_config(folder: Path) -> dict:
    try:
        config = json.loads((folder / "adapter_config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{folder}/adapter_config.json: cannot read it ({e})") from None
    if config.get("peft_type") != "LORA":
        raise CheckpointError(
            f"{folder}/adapter_config.json: peft_type = "
            f"{config.get('peft_type')!r}; raysoup merges LORA adapters"
        )
    if config.get("alpha_pattern") or config.get("rank_pattern") or config.get("use_dora"):
        raise CheckpointError(
            f"{folder}/adapter_config.json: alpha_pattern, rank_pattern and "
            f"use_dora are not supported; merge it with peft's "
            f"merge_and_unload and give the merged folder"
        )
    return config


def _base_name(folder: Path, config: dict) -> str:
    """The adapter's base model as a comparable name: the real path where it names a
    folder that exists, else the name as written (a Hub id)."""
    name = str(config.get("base_model_name_or_path") or "")
    for candidate in (Path(name), folder / name):
        if name and candidate.is_dir():
            return os.path.realpath(candidate)
    return name


def check_adapters(spec, adapters: dict[str, Path]) -> None:
    """One base model for every adapter of the pool."""
    bases = {name: _base_name(folder, adapter_config(folder)) for name, folder in adapters.items()}
    if len(set(bases.values())) > 1:
        (a, base_a), (b, base_b) = [
            next((n, v) for n, v in bases.items() if v == base)
            for base in list(dict.fromkeys(bases.values()))[:2]
        ]
        raise CheckpointError(
            f"LoRA adapters of different base models: {adapters[a]} is of "
            f"{base_a!r}, {adapters[b]} of {base_b!r}; a pool's adapters "
            f"must share one base (the model at {spec.path})"
        )


def _adapter_weights(folder: Path) -> StateDict:
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        if (folder / name).is_file():
            return load_state_dict(folder / name)
    raise CheckpointError(f"{folder}: no adapter_model.safetensors")


def merged_adapter(spec, folder: Path, base: StateDict) -> StateDict:
    """base + B @ A * scaling per adapted weight (fp32); modules_to_save taken whole."""
    config = adapter_config(folder)
    weights = {k.removeprefix(PEFT_PREFIX): v.float() for k, v in _adapter_weights(folder).items()}
    alpha = config.get("lora_alpha", 8)
    merged = dict(base)
    for key, tensor in weights.items():
        for a_name, b_name, transpose in (
            (".lora_A.weight", ".lora_B.weight", False),
            (".lora_embedding_A", ".lora_embedding_B", True),
        ):
            if key.endswith(a_name):
                module = key[: -len(a_name)]
                a, b = tensor, weights[module + b_name]
                if a.dim() != 2:
                    raise CheckpointError(
                        f"{folder}: {key} is a {a.dim()}-d LoRA factor; "
                        f"only linear and embedding layers are supported"
                    )
                rank = a.shape[0]
                scaling = alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
                delta = (b @ a) * scaling
                if transpose != bool(config.get("fan_in_fan_out")):
                    delta = delta.T
                target = module + ".weight"
                if target not in base or base[target].shape != delta.shape:
                    raise CheckpointError(
                        f"{folder}: adapts {target} with a {tuple(delta.shape)} delta; the "
                        f"model at {spec.path} has "
                        + (
                            f"shape {tuple(base[target].shape)}"
                            if target in base
                            else "no such key"
                        )
                        + " (an adapter of another base model?)"
                    )
                merged[target] = base[target] + delta
                break
        else:
            if ".lora_" not in key:  # modules_to_save: the adapter's own copy
                if key not in base:
                    raise CheckpointError(
                        f"{folder}: {key} is not a key of the model at "
                        f"{spec.path} (an adapter of another base model?)"
                    )
                merged[key] = tensor
    return merged
