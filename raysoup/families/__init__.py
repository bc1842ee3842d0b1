"""Model families behind one interface (raysoup.families.base): FAMILIES[name]."""

from . import open_clip, testbed, timm, transformers  # noqa: F401  (registration)
from .base import (
    FAMILIES,
    Batch,
    Family,
    build_model,
    family_of,
    spec_from_dict,
    state_dict_template,
    take_rows,
    to_device,
)

__all__ = [
    "FAMILIES",
    "Batch",
    "Family",
    "build_model",
    "family_of",
    "spec_from_dict",
    "state_dict_template",
    "take_rows",
    "to_device",
]
