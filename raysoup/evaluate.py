"""How a fused model is judged: a task pool of named evaluation sets and the accuracy metric.

The Evaluator builds its model once and only swaps weights in (``load_state_dict`` copies
into the model's own parameters, so a shared or read-only input is never written).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from .data import EvalSet, read_eval_set
from .model import ModelSpec, build_classifier

VAL = "val"
ID = "id"


class Evaluator:
    def __init__(self, spec: ModelSpec, eval_sets: list[EvalSet], batch_size: int = 1000,
                 device: str | None = None, autocast_bf16: bool = False):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = build_classifier(spec).to(self.device).eval()
        self.batch_size = batch_size
        self.autocast_bf16 = autocast_bf16 and self.device.type == "cuda"
        # Resident copies: the Arrow buffers are read-only memory maps.
        self.sets = {s.name: (torch.from_numpy(np.array(s.images)).to(self.device),
                              torch.from_numpy(np.array(s.labels)).to(self.device))
                     for s in eval_sets}

    @property
    def set_names(self) -> list[str]:
        return list(self.sets)

    def load(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state_dict, strict=True)

    @torch.inference_mode()
    def correct(self, set_name: str) -> tuple[int, int]:
        """(correct, total) of the loaded weights on one set."""
        images, labels = self.sets[set_name]
        # Counted on the device and read once: a per-batch int() would stall a GPU each batch.
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        for start in range(0, len(labels), self.batch_size):
            batch = images[start:start + self.batch_size]
            with torch.autocast(self.device.type, dtype=torch.bfloat16,
                                enabled=self.autocast_bf16):
                logits = self.model(batch)
            correct += (logits.argmax(dim=1) == labels[start:start + self.batch_size]).sum()
        return int(correct), len(labels)

    def accuracy(self, state_dict: Mapping[str, torch.Tensor], set_name: str = VAL) -> float:
        self.load(state_dict)
        correct, total = self.correct(set_name)
        return correct / total

    def report(self, state_dict: Mapping[str, torch.Tensor]) -> dict:
        """val, id, each shifted set and their mean: the row every method gets in a report."""
        self.load(state_dict)
        acc = {}
        for name in self.sets:
            correct, total = self.correct(name)
            acc[name] = correct / total
        ood = {k: v for k, v in acc.items() if k not in (VAL, ID)}
        return {"val": acc.get(VAL), "id": acc.get(ID), "ood": ood,
                "ood_avg": float(np.mean(list(ood.values()))) if ood else None}


def load_eval_sets(files: Mapping[str, str | Path], num_classes: int) -> list[EvalSet]:
    sets = []
    for name, path in files.items():
        s = read_eval_set(path, num_classes)
        s.name = name
        sets.append(s)
    return sets
