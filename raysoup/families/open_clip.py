"""`open_clip`: an open_clip CLIP-layout vision tower by name (``arch``) plus a linear head,
the model soups layout (raysoup.inputs.model). A manifest `model` entry with `arch` and no
`family` means this family."""

from __future__ import annotations

from pathlib import Path

from .base import Family, StateDict, export_state_dict_like, register


class ImageClassifierFamily(Family):
    """raysoup's own image classifier (inputs.model.ImageClassifier) and its files: one
    safetensors or torch.save'd state dict per ingredient."""

    def spec_from_dict(self, entry: dict, where: str):
        from ..inputs.model import ModelSpec

        return ModelSpec.from_dict(entry, where)

    def build(self, spec, device: str = "cpu"):
        from ..inputs.model import build_classifier

        return build_classifier(spec, device)

    def inputs(self, spec) -> tuple[int, ...]:
        return (spec.in_channels, spec.image_size, spec.image_size)

    def load_ingredient(self, spec, path: str) -> StateDict:
        from ..inputs.model import to_classifier_layout
        from ..inputs.weights import load_state_dict

        return to_classifier_layout(load_state_dict(path))

    def export(self, spec, fused: StateDict, like: str, out: Path) -> Path:
        return export_state_dict_like(fused, like, out)


class OpenClip(ImageClassifierFamily):
    name = "open_clip"

    def spec_from_dict(self, entry: dict, where: str):
        if not entry.get("arch"):
            from ..errors import RaysoupError

            raise RaysoupError(
                f"{where}: model.family = 'open_clip' needs model.arch, an "
                f'open_clip architecture name (e.g. "ViT-B-32")'
            )
        return super().spec_from_dict(entry, where)

    def describe(self, spec) -> str:
        return spec.arch


register(OpenClip())
