"""`testbed`: the Fashion-MNIST testbed's small custom ViT tower plus a linear head (a
manifest `model` entry without `arch` or `family`)."""

from __future__ import annotations

from .base import register
from .open_clip import ImageClassifierFamily


class Testbed(ImageClassifierFamily):
    name = "testbed"

    def spec_from_dict(self, entry: dict, where: str):
        if entry.get("arch"):
            from ..errors import RaysoupError

            raise RaysoupError(
                f"{where}: model.arch = {entry['arch']!r} names an open_clip "
                f"architecture; the testbed family has none (family = "
                f'"open_clip", or leave out family)'
            )
        return super().spec_from_dict(entry, where)

    def describe(self, spec) -> str:
        return "the testbed ViT"

    def architecture(self, spec) -> str:
        return ""


register(Testbed())
