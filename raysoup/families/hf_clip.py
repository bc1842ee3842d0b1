"""Hugging Face CLIP as an image classifier (the transformers family's
``task = "clip-classification"``): CLIPVisionModelWithProjection's tower and projection,
the image embedding L2-normalised, then a linear head. Keys are the vision model's own
(``vision_model.*``, ``visual_projection.weight``) plus ``head.weight`` and ``head.bias``, so
an ingredient is one state-dict file. The zero-shot head of a CLIPModel (its text tower on
class-name prompts) makes the pretrained ingredient."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import RaysoupError


def vision_config(config):
    """The vision config (with the projection width) of a CLIPConfig or CLIPVisionConfig."""
    if hasattr(config, "vision_config"):
        vision = config.vision_config
        vision.projection_dim = config.projection_dim
        return vision
    if not hasattr(config, "projection_dim") or config.model_type != "clip_vision_model":
        raise RaysoupError(
            f"a {type(config).__name__} is not a CLIP config (task "
            f'"clip-classification" takes a CLIPConfig or CLIPVisionConfig)'
        )
    return config


class ClipClassifier(nn.Module):
    """CLIP vision tower -> projection -> L2-normalised embedding -> linear head."""

    def __init__(self, config, num_classes: int):
        super().__init__()
        from transformers import CLIPVisionModelWithProjection

        tower = CLIPVisionModelWithProjection(vision_config(config))
        self.vision_model, self.visual_projection = tower.vision_model, tower.visual_projection
        self.head = nn.Linear(tower.config.projection_dim, num_classes)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        embeds = self.visual_projection(self.vision_model(pixel_values=pixel_values).pooler_output)
        return self.head(embeds / embeds.norm(dim=-1, keepdim=True))
