"""How a fused model is judged: a task pool of named evaluation sets and the metric
(raysoup.metrics: top-1 correctness, or the user's score in [0, 1]).

The Evaluator builds its model once and only swaps weights in (``load_state_dict`` copies
into the model's own parameters, so a shared or read-only input is never written).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import torch

from .cache import JudgementCache, set_key
from .families import Batch, build_model, family_of, take_rows, to_device
from .inputs.data import ClassMap, EvalSet, EvalSetSource, read_eval_set
from .metrics import Metric, score
from .numerics import describe

VAL = "val"
ID = "id"


class Evaluator:
    def __init__(
        self,
        spec,
        eval_sets: list[EvalSet],
        batch_size: int = 1000,
        device: str | None = None,
        autocast_bf16: bool = False,
        cache: JudgementCache | None = None,
        domain: str | None = None,
        metric: Metric | None = None,
    ):
        """`domain`: the numeric domain this process was set up for (raysoup.numerics);
        default, this process's own kernels as they are. `metric`: default top-1."""
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        domain = domain or describe("native", torch.get_num_threads(), str(self.device))
        self.spec, self.family = spec, family_of(spec)
        self.model = build_model(spec).to(self.device).eval()
        self.batch_size = batch_size
        self.autocast_bf16 = autocast_bf16 and self.device.type == "cuda"
        # Resident copies (encode copies: the Arrow buffers are read-only memory maps).
        self.sets = {
            s.name: (
                self.encode(s.inputs),
                torch.from_numpy(np.array(s.labels)).to(self.device),
                s.class_map,
            )
            for s in eval_sets
        }
        self.cache, self.metric = cache, metric
        self.set_keys = {
            s.name: key
            for s in eval_sets
            if (key := set_key(s.sha256, spec, s.class_map, self.autocast_bf16, domain, metric))
        }
        self._projections: dict = {}

    def _projection(self, class_map: ClassMap | None):
        """(index, mask): logits[:, index] with masked entries at -inf, max over the last
        axis, gives one score per label of the set."""
        if class_map is None:
            return None
        if class_map not in self._projections:
            width = max(1, max(len(g) for g in class_map))
            index = torch.zeros(len(class_map), width, dtype=torch.int64)
            mask = torch.zeros(len(class_map), width, dtype=torch.bool)
            for label, group in enumerate(class_map):
                index[label, : len(group)] = torch.tensor(group, dtype=torch.int64)
                mask[label, : len(group)] = True
            self._projections[class_map] = index.to(self.device), mask.to(self.device)
        return self._projections[class_map]

    def project(self, logits: torch.Tensor, class_map: ClassMap | None) -> torch.Tensor:
        """The model's logits as one score per label of a set with this class map."""
        projection = self._projection(class_map)
        if projection is None:
            return logits
        index, mask = projection
        return logits[:, index].masked_fill(~mask, float("-inf")).amax(dim=2)

    def encode(self, inputs) -> Batch:
        """A set's rows (images, or text columns: tokenised here) as tensors on the device."""
        return to_device(self.family.encode(self.spec, inputs), self.device)

    def logits(
        self, batch: Batch, params: Mapping[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """The model's per-example logits (with `params` in place of its weights)."""
        return self.family.forward(self.spec, self.model, batch, params)

    @property
    def set_names(self) -> list[str]:
        return list(self.sets)

    def load(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state_dict, strict=True)

    @torch.inference_mode()
    def score(self, batches: Iterable[tuple], class_map: ClassMap | None) -> torch.Tensor:
        """Per row of (inputs, labels) batches (inputs encoded), on the device: does the
        loaded model get it right (bool), or the metric's score."""
        hits = []
        for inputs, labels in batches:
            inputs = to_device(inputs, self.device)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast_bf16):
                logits = self.project(self.logits(inputs), class_map)
            labels = torch.as_tensor(labels).to(self.device)
            hits.append(score(self.metric, logits, labels).to(self.device))
        return (
            torch.cat(hits)
            if hits
            else torch.zeros(0, dtype=torch.bool if self.metric is None else torch.float64)
        )

    def hits(self, set_name: str, rows: np.ndarray | None = None) -> torch.Tensor:
        """Per image of a set (or of its `rows`, in that order): right or wrong, or the
        metric's score."""
        inputs, labels, class_map = self.sets[set_name]
        if rows is not None:
            index = torch.as_tensor(rows, device=self.device)
            inputs, labels = take_rows(inputs, index), labels[index]
        return self.score(
            (
                (take_rows(inputs, slice(i, i + self.batch_size)), labels[i : i + self.batch_size])
                for i in range(0, len(labels), self.batch_size)
            ),
            class_map,
        )

    def correct(self, set_name: str) -> tuple[int | float, int]:
        """(correct, total) of the loaded weights on one set; with a metric, (the sum of
        the scores, total)."""
        # Counted on the device and read once: a per-batch int() would stall a GPU each batch.
        hits = self.hits(set_name)
        return hits.sum().item(), len(hits)

    def accuracy(self, state_dict: Mapping[str, torch.Tensor], set_name: str = VAL) -> float:
        return float(self.correctness(state_dict, [set_name])[set_name].mean())

    def correctness(
        self, state_dict: Mapping[str, torch.Tensor], sets: list[str] | None = None
    ) -> dict[str, np.ndarray]:
        """Per set (default: all), per image: right or wrong, or the metric's score (what
        paired comparisons need); read from the cache where these weights were judged on that set before."""
        sets = list(self.sets) if sets is None else sets

        def judge(missing: list[str]) -> dict[str, np.ndarray]:
            self.load(state_dict)
            return {name: self.hits(name).cpu().numpy() for name in missing}

        if self.cache is None:
            return judge(sets)
        return self.cache.correctness(state_dict, self.set_keys, sets, judge)

    def report(self, state_dict: Mapping[str, torch.Tensor]) -> dict:
        return accuracy_row(self.correctness(state_dict))


def ood_sets(set_names) -> list[str]:
    """The sets that only report distribution shift: all but val and id."""
    return [name for name in set_names if name not in (VAL, ID)]


def accuracy_row(correctness: Mapping[str, np.ndarray]) -> dict:
    """val, id, each shifted set and their mean (accuracies, or mean scores): the row every
    model gets in a report."""
    acc = {name: float(hits.mean()) for name, hits in correctness.items()}
    ood = {name: acc[name] for name in ood_sets(acc)}
    return {
        "val": acc.get(VAL),
        "id": acc.get(ID),
        "ood": ood,
        "ood_avg": float(np.mean(list(ood.values()))) if ood else None,
    }


def load_eval_sets(
    sources: Mapping[str, EvalSetSource | str | Path],
    num_classes: int,
) -> list[EvalSet]:
    sets = []
    for name, source in sources.items():
        s = read_eval_set(source, num_classes)
        s.name = name
        if isinstance(source, EvalSetSource):
            s.sha256 = source.sha256
        sets.append(s)
    return sets
