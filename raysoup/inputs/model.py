"""The classifier every ingredient is an instance of: an open_clip vision tower plus a linear head.

Two kinds of tower: an open_clip architecture by name (``arch = "ViT-B-32"``, ...), or the
small custom ViT of the Fashion-MNIST testbed (``arch = ""``, shaped by the other fields).
State-dict keys follow the model soups release layout (``model.visual.*``, the CLIP
text-side tensors ``model.token_embedding.weight`` etc. without the text transformer, and
``classification_head.weight``/``bias``), so a model soups checkpoint loads without
renaming and the component presets written for it apply to every model here.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
from contextlib import contextmanager
from dataclasses import asdict, replace
from typing import Annotated

import open_clip
import torch
from open_clip.transformer import VisionTransformer
from pydantic import Field
from torch import nn

from ..errors import RaysoupError
from ..typed import section_config, validate

# The model soups wrapper deletes CLIP's text transformer; checkpoints saved with it kept
# ("keep_lang") carry these keys, which no image classifier uses.
TEXT_TRANSFORMER_PREFIX = "model.transformer."
DATA_PARALLEL_PREFIX = "module."


@section_config
class ModelSpec:
    """Architecture of an ingredient; stored in every zoo manifest (`model`)."""

    arch: Annotated[
        str,
        Field(
            description='an open_clip model name (e.g. "ViT-B-32"); "" = the testbed\'s '
            "custom ViT tower, shaped by the keys below"
        ),
    ] = ""
    image_size: Annotated[
        int,
        Field(
            ge=1, description="input images' height and width (with arch: open_clip's config of it)"
        ),
    ] = 28
    in_channels: Annotated[
        int, Field(ge=1, description="input images' channels (with arch: 3)")
    ] = 1
    patch_size: Annotated[int, Field(ge=1, description="the custom tower's patch size")] = 7
    width: Annotated[int, Field(ge=1, description="the custom tower's width")] = 96
    layers: Annotated[int, Field(ge=1, description="the custom tower's transformer blocks")] = 4
    heads: Annotated[int, Field(ge=1, description="the custom tower's attention heads")] = 4
    embed_dim: Annotated[
        int,
        Field(
            ge=1, description="the tower's output features (with arch: open_clip's config of it)"
        ),
    ] = 64
    num_classes: Annotated[int, Field(ge=2, description="the linear head's classes")] = 10
    normalize_features: Annotated[
        bool, Field(description="L2-normalise the tower's features before the head")
    ] = True
    mean: Annotated[
        tuple[float, ...],
        Field(
            min_length=1,
            description="per-channel mean the images are normalised with (with "
            "arch: open_clip's preprocessing, unless given)",
        ),
    ] = (0.2860,)
    std: Annotated[
        tuple[float, ...],
        Field(
            min_length=1,
            description="per-channel std the images are normalised with (with "
            "arch: open_clip's preprocessing, unless given)",
        ),
    ] = (0.3530,)

    @property
    def family(self) -> str:
        return "open_clip" if self.arch else "testbed"

    def to_dict(self) -> dict:
        d = asdict(self)
        if not self.arch:  # the testbed's tower: the form every zoo manifest (and cache key) has
            del d["arch"]
        return d

    @classmethod
    def from_dict(cls, d: dict, where: str = "manifest.json") -> ModelSpec:
        """A manifest's `model` entry, validated strictly (types, bounds, no unknown keys)."""
        spec = validate(cls, d, where, "model.", "model")
        return spec.with_arch_defaults() if spec.arch else spec

    def with_arch_defaults(self) -> ModelSpec:
        """Input size and embedding width from open_clip's config of `arch`; mean and std
        too, unless given (weights trained with other values need them in the manifest)."""
        config = arch_config(self.arch)
        preprocess = preprocess_config(self.arch)
        given = ModelSpec()  # a mean/std that differs from the testbed default was given
        return replace(
            self,
            image_size=preprocess["size"],
            in_channels=3,
            embed_dim=config["embed_dim"],
            mean=self.mean if self.mean != given.mean else tuple(preprocess["mean"]),
            std=self.std if self.std != given.std else tuple(preprocess["std"]),
        )


def arch_config(arch: str) -> dict:
    """open_clip's config of a CLIP-layout architecture; a clear error for anything else."""
    config = open_clip.get_model_config(arch)
    if config is None:
        close = difflib.get_close_matches(arch, open_clip.list_models(), n=3)
        raise RaysoupError(
            f"model.arch: unknown open_clip architecture {arch!r}"
            + (f"; did you mean {', '.join(close)}?" if close else "; see open_clip.list_models()")
        )
    if (
        config.get("custom_text")
        or "hf_model_name" in config.get("text_cfg", {})
        or "multimodal_cfg" in config
    ):
        raise RaysoupError(
            f"model.arch {arch!r} has a custom text tower or a multimodal "
            f"decoder (SigLIP, EVA, CoCa, ...); raysoup's classifier takes "
            f"CLIP-layout models (ViT-*, RN*, convnext_*, ...)"
        )
    return config


def preprocess_config(arch: str) -> dict:
    """open_clip's eval preprocessing of `arch` without pretrained weights (JSON form): the
    model config's values, at the tower's input size."""
    config = arch_config(arch)
    size = config["vision_cfg"]["image_size"]
    cfg = open_clip.transform.PreprocessCfg(
        **{**config.get("preprocess_cfg", {}), "size": size if isinstance(size, int) else size[0]}
    )
    return json.loads(json.dumps(asdict(cfg)))


@contextmanager
def _quiet_open_clip():
    """open_clip warns that a model built without pretrained weights is random; here the
    weights always come from an ingredient right after."""
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def clip_model(arch: str, pretrained: str | None = None, device: str = "cpu") -> nn.Module:
    """An open_clip CLIP model with its text transformer (zero-shot heads need it)."""
    with _quiet_open_clip():
        return open_clip.create_model(arch, pretrained=pretrained, device=device)


class ImageEncoder(nn.Module):
    """Holds the tower under the attribute name open_clip's CLIP uses (``visual``)."""

    def __init__(self, visual: nn.Module):
        super().__init__()
        self.visual = visual


class ImageClassifier(nn.Module):
    """open_clip vision tower -> (optionally L2-normalised) features -> linear head.

    Input: uint8 images (N, C, H, W); normalisation happens here so that evaluation sets
    stay as raw uint8 on disk and in memory.
    """

    def __init__(self, spec: ModelSpec, device: str = "cpu"):
        super().__init__()
        self.spec = spec
        if spec.arch:
            self.model = clip_model(spec.arch, device=device)
            del self.model.transformer  # as the model soups wrapper does
        else:
            self.model = ImageEncoder(
                VisionTransformer(
                    image_size=spec.image_size,
                    patch_size=spec.patch_size,
                    width=spec.width,
                    layers=spec.layers,
                    heads=spec.heads,
                    mlp_ratio=4.0,
                    output_dim=spec.embed_dim,
                )
            )
        self.classification_head = nn.Linear(spec.embed_dim, spec.num_classes)
        self.register_buffer("_mean", torch.tensor(spec.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(spec.std).view(1, -1, 1, 1), persistent=False)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()
        x = (x - self._mean) / self._std
        if x.shape[1] == 1:  # grayscale data through the 3-channel patch embedding
            x = x.expand(-1, 3, -1, -1)
        return x

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.model.visual(self.preprocess(images))
        if self.spec.normalize_features:
            features = features / features.norm(dim=-1, keepdim=True)
        return self.classification_head(features)


# Set to 1 where every forward pass must run in the evaluator actors (a deployment whose
# driver sits on a CPU-only head; the tests prove the run path with it): building a model
# with real weights anywhere else then raises. Shape-only (meta) models are always allowed.
EVALUATORS_ONLY = "RAYSOUP_MODELS_IN_EVALUATORS_ONLY"
_models_allowed_here = False


def allow_models_here() -> None:
    """Called by an evaluator actor: this process is where models are built."""
    global _models_allowed_here
    _models_allowed_here = True


def check_models_allowed(device: str) -> None:
    if device != "meta" and os.environ.get(EVALUATORS_ONLY) == "1" and not _models_allowed_here:
        raise RuntimeError(
            f"a model was built outside the evaluator actors while {EVALUATORS_ONLY}=1"
        )


def build_classifier(spec: ModelSpec, device: str = "cpu") -> ImageClassifier:
    check_models_allowed(device)
    return ImageClassifier(spec, device)


def to_classifier_layout(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A checkpoint's keys in our layout; tensors untouched.

    Model soups files already use it. Accepted variants: keys saved from a DataParallel
    wrapper (``module.``), and the text transformer kept by ``keep_lang`` (left out here).
    """
    if state_dict and all(k.startswith(DATA_PARALLEL_PREFIX) for k in state_dict):
        state_dict = {k[len(DATA_PARALLEL_PREFIX) :]: v for k, v in state_dict.items()}
    return {k: v for k, v in state_dict.items() if not k.startswith(TEXT_TRANSFORMER_PREFIX)}
