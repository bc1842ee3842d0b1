"""How a fused model is judged: a task pool of named evaluation sets and the accuracy metric.

The Evaluator builds its model once and only swaps weights in (``load_state_dict`` copies
into the model's own parameters, so a shared or read-only input is never written).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from .data import ClassMap, EvalSet, EvalSetSource, read_eval_set
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
                              torch.from_numpy(np.array(s.labels)).to(self.device),
                              self._projection(s.class_map))
                     for s in eval_sets}

    def _projection(self, class_map: ClassMap | None):
        """(index, mask): logits[:, index] with masked entries at -inf, max over the last
        axis, gives one score per label of the set."""
        if class_map is None:
            return None
        width = max(1, max(len(g) for g in class_map))
        index = torch.zeros(len(class_map), width, dtype=torch.int64)
        mask = torch.zeros(len(class_map), width, dtype=torch.bool)
        for label, group in enumerate(class_map):
            index[label, :len(group)] = torch.tensor(group, dtype=torch.int64)
            mask[label, :len(group)] = True
        return index.to(self.device), mask.to(self.device)

    @property
    def set_names(self) -> list[str]:
        return list(self.sets)

    def load(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state_dict, strict=True)

    @torch.inference_mode()
    def correct(self, set_name: str) -> tuple[int, int]:
        """(correct, total) of the loaded weights on one set."""
        images, labels, projection = self.sets[set_name]
        # Counted on the device and read once: a per-batch int() would stall a GPU each batch.
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        for start in range(0, len(labels), self.batch_size):
            batch = images[start:start + self.batch_size]
            with torch.autocast(self.device.type, dtype=torch.bfloat16,
                                enabled=self.autocast_bf16):
                logits = self.model(batch)
            if projection is not None:
                index, mask = projection
                logits = logits[:, index].masked_fill(~mask, float("-inf")).amax(dim=2)
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


def load_eval_sets(sources: Mapping[str, EvalSetSource | str | Path], num_classes: int,
                   log=None) -> list[EvalSet]:
    sets = []
    for name, source in sources.items():
        s = read_eval_set(source, num_classes, log)
        s.name = name
        sets.append(s)
    return sets
