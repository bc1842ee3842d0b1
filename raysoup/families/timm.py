"""`timm`: a timm model by name with its head size, built without pretrained weights.

    "model": {"family": "timm", "arch": "vit_tiny_patch16_224", "num_classes": 10,
              "img_size": 32, "in_chans": 1, "kwargs": {"depth": 4}}

The skeleton is ``timm.create_model(arch, pretrained=False, num_classes=..., in_chans=...,
**kwargs)``; a model with a fixed input size (timm's pretrained_cfg ``fixed_input_size``:
ViT, Swin, ...) is built for ``img_size`` too, others (CNNs) take any size. ``img_size`` is
the evaluation images' size (default: the pretrained config's input size); mean and std
are the pretrained config's (no download: the config ships inside timm) unless given.
Ingredients are the model's state dict as safetensors or a torch.save'd file (timm's
train.py checkpoints included: their ``state_dict``), in fp32, fp16 or bf16 (mixed in
fp32); export writes the fused weights in the ingredient's keys, dtypes and container.
"""

from __future__ import annotations

import difflib
import functools
from dataclasses import asdict, field
from pathlib import Path
from typing import Annotated, Any, ClassVar

import torch
from pydantic import Field

from ..components import TIMM_PRESETS
from ..errors import RaysoupError
from ..typed import section_config, validate
from .base import Batch, Family, StateDict, as_float32, export_state_dict_like, register

# Keys of the model entry itself; kwargs must not repeat them.
OWN_KEYS = ("pretrained", "num_classes", "in_chans", "img_size")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@section_config
class TimmSpec:
    arch: Annotated[
        str,
        Field(
            description="a timm model name (timm.list_models()), optionally with a .tag; built "
            "without pretrained weights"
        ),
    ]
    num_classes: Annotated[int, Field(ge=2, description="the classifier head's classes")]
    img_size: Annotated[
        int | None,
        Field(
            ge=1,
            description="the evaluation images' size, which a fixed-input-size model (ViT, "
            "Swin, ...) is built for; default: the pretrained config's",
        ),
    ] = None
    in_chans: Annotated[
        int | None, Field(ge=1, description="input channels; default: the pretrained config's")
    ] = None
    kwargs: Annotated[
        dict[str, Any],
        Field(
            description="further timm.create_model arguments (not pretrained, num_classes, "
            "in_chans or img_size)"
        ),
    ] = field(default_factory=dict, hash=False)
    mean: Annotated[
        tuple[float, ...] | None,
        Field(
            description="per-channel mean the images are normalised with; default: the "
            "pretrained config's"
        ),
    ] = None
    std: Annotated[
        tuple[float, ...] | None,
        Field(
            description="per-channel std the images are normalised with; default: the "
            "pretrained config's"
        ),
    ] = None
    family: ClassVar[str] = "timm"

    def to_dict(self) -> dict:
        return {"family": self.family, **asdict(self)}


def _timm():
    import timm

    return timm


@functools.cache
def pretrained_cfg(arch: str) -> dict:
    """timm's pretrained config of `arch` (a name, optionally with a .tag): input size, mean,
    std; it ships inside timm, nothing is downloaded."""
    timm = _timm()
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=3)
        raise RaysoupError(
            f"model.arch = {arch!r} is not a timm model"
            + (f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()")
        )
    cfg = timm.models.get_pretrained_cfg(arch)
    return cfg.to_dict() if cfg is not None else {}


def _normalisation(spec: TimmSpec, channels: int) -> tuple[tuple, tuple]:
    """The spec's mean/std, else the pretrained config's; a config for another channel
    count (grayscale into an RGB config) gives each channel the mean of its values."""
    cfg = pretrained_cfg(spec.arch)
    mean = spec.mean or cfg.get("mean") or IMAGENET_MEAN
    std = spec.std or cfg.get("std") or IMAGENET_STD

    def fit(values: tuple) -> tuple:
        return tuple(values) if len(values) == channels else (sum(values) / len(values),) * channels

    return fit(mean), fit(std)


class Timm(Family):
    name = "timm"
    presets = TIMM_PRESETS

    def spec_from_dict(self, entry: dict, where: str) -> TimmSpec:
        spec = validate(TimmSpec, entry, where, "model.", "model")
        repeated = sorted(set(spec.kwargs) & set(OWN_KEYS))
        if repeated:
            raise RaysoupError(
                f"{where}: model.kwargs.{repeated[0]}: give it as model.{repeated[0]}"
                if repeated[0] != "pretrained"
                else f"{where}: model.kwargs.pretrained: raysoup never downloads "
                f"weights (the ingredients hold them)"
            )
        try:
            pretrained_cfg(spec.arch)
        except RaysoupError as e:
            raise RaysoupError(f"{where}: {e}") from None
        for name, values in (("mean", spec.mean), ("std", spec.std)):
            if values is not None and len(values) != self.inputs(spec)[0]:
                raise RaysoupError(
                    f"{where}: model.{name} has {len(values)} value(s), the "
                    f"model takes {self.inputs(spec)[0]} channel(s)"
                )
        try:
            self.template(spec)  # arguments the model does not take fail here, in one line
        except RaysoupError as e:
            raise RaysoupError(f"{where}: {e}") from None
        return spec

    def build(self, spec: TimmSpec, device: str = "cpu"):
        kwargs = dict(spec.kwargs)
        if spec.in_chans is not None:
            kwargs["in_chans"] = spec.in_chans
        if spec.img_size is not None and pretrained_cfg(spec.arch).get("fixed_input_size"):
            kwargs["img_size"] = spec.img_size
        try:
            with torch.device(device):
                return _timm().create_model(
                    spec.arch, pretrained=False, num_classes=spec.num_classes, **kwargs
                )
        except (TypeError, ValueError, AssertionError, RuntimeError, KeyError) as e:
            arguments = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
            raise RaysoupError(
                f"model: timm.create_model({spec.arch!r}, num_classes="
                f"{spec.num_classes}, {arguments}) fails: "
                f"{(str(e) or type(e).__name__).splitlines()[0]}"
            ) from None

    def inputs(self, spec: TimmSpec) -> tuple[int, int, int]:
        channels, *size = pretrained_cfg(spec.arch).get("input_size", (3, 224, 224))
        if spec.img_size is not None:
            size = (spec.img_size, spec.img_size)
        return (spec.in_chans or channels, *size)

    def arguments(self, spec: TimmSpec, batch: Batch) -> tuple[tuple, dict]:
        mean, std = _normalisation(spec, batch.shape[1])
        shape = (1, -1, 1, 1)
        x = batch.float() / 255.0
        x = (x - torch.tensor(mean, device=x.device).view(shape)) / torch.tensor(
            std, device=x.device
        ).view(shape)
        return (x,), {}

    def load_ingredient(self, spec: TimmSpec, path: str) -> StateDict:
        from ..inputs.model import DATA_PARALLEL_PREFIX
        from ..inputs.weights import load_state_dict

        state = load_state_dict(path)
        if state and all(k.startswith(DATA_PARALLEL_PREFIX) for k in state):
            state = {k[len(DATA_PARALLEL_PREFIX) :]: v for k, v in state.items()}
        return as_float32(state)

    def export(self, spec: TimmSpec, fused: StateDict, like: str, out: Path) -> Path:
        return export_state_dict_like(fused, like, out)

    def describe(self, spec: TimmSpec) -> str:
        return f"timm {spec.arch}"


register(Timm())
