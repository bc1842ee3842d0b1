"""The classifier every ingredient is an instance of: an open_clip vision tower plus a linear head.

State-dict keys follow the model soups release layout (``model.visual.*``,
``classification_head.weight``/``bias``) so that the component presets written for real
CLIP ViT checkpoints apply to the tiny zoo model unchanged.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from open_clip.transformer import VisionTransformer
from torch import nn


@dataclass(frozen=True)
class ModelSpec:
    """Architecture of an ingredient; stored in every zoo manifest and run config."""

    image_size: int = 28
    in_channels: int = 1
    patch_size: int = 7
    width: int = 96
    layers: int = 4
    heads: int = 4
    embed_dim: int = 64
    num_classes: int = 10
    normalize_features: bool = True
    mean: tuple[float, ...] = (0.2860,)
    std: tuple[float, ...] = (0.3530,)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelSpec":
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown model spec keys: {sorted(unknown)}")
        d = dict(d)
        for key in ("mean", "std"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)


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

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        visual = VisionTransformer(
            image_size=spec.image_size,
            patch_size=spec.patch_size,
            width=spec.width,
            layers=spec.layers,
            heads=spec.heads,
            mlp_ratio=4.0,
            output_dim=spec.embed_dim,
        )
        self.model = ImageEncoder(visual)
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


def build_classifier(spec: ModelSpec) -> ImageClassifier:
    return ImageClassifier(spec)


def state_dict_template(spec: ModelSpec) -> dict[str, torch.Tensor]:
    """Keys, shapes and dtypes every ingredient of this architecture must have."""
    return build_classifier(spec).state_dict()
