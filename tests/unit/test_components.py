import pytest
import torch
from torch import nn

from raysoup.components import ComponentError, check_partition, partition, unused_keys
from raysoup.inputs.model import build_classifier

from ..conftest import TINY_SPEC


def model_soups_vit_b32_keys():
    """Keys of a model soups release checkpoint: CLIP ViT-B/32 without its text
    transformer (deleted by the image encoder wrapper), plus the classification head."""
    import open_clip

    clip = open_clip.create_model("ViT-B-32", pretrained=None)
    keys = [f"model.{k}" for k in clip.state_dict() if not k.startswith("transformer.")]
    return keys + ["classification_head.weight", "classification_head.bias"]


@pytest.fixture(scope="module")
def vit_b32_keys():
    return model_soups_vit_b32_keys()


@pytest.mark.parametrize("granularity,expected", [(0, 2), (1, 8), (2, 15), (3, 26)])
def test_reference_granularities_on_model_soups_layout(vit_b32_keys, granularity, expected):
    comps = partition(vit_b32_keys, f"granularity-{granularity}")
    assert len(comps) == expected
    check_partition(comps, vit_b32_keys)


def test_granularity_3_has_one_component_per_visual_block(vit_b32_keys):
    names = partition(vit_b32_keys, "granularity-3").names
    blocks = [n for n in names if ".resblocks." in n]
    assert blocks == [f"model.visual.transformer.resblocks.{i}" for i in range(12)]


def test_presets_on_tiny_model():
    keys = list(build_classifier(TINY_SPEC).state_dict())
    counts = {
        p: len(partition(keys, p))
        for p in ["granularity-1", "granularity-2", "granularity-3", "per-block", "whole-model"]
    }
    # 2 resblocks; granularity 2: 7 visual parts + head weight + head bias.
    assert counts == {
        "granularity-1": 3,
        "granularity-2": 9,
        "granularity-3": 10,
        "per-block": 10,
        "whole-model": 1,
    }


def test_user_rules_first_match_wins():
    keys = list(build_classifier(TINY_SPEC).state_dict())
    comps = partition(
        keys, [("head", r"^classification_head\."), ("blocks", r"resblocks"), ("rest", r".")]
    )
    assert comps.names == ("rest", "blocks", "head")
    check_partition(comps, keys)


def test_user_rules_leaving_a_key_uncovered_fail_naming_it():
    keys = list(build_classifier(TINY_SPEC).state_dict())
    with pytest.raises(ComponentError, match="classification_head.weight"):
        partition(keys, [("visual", r"^model\.visual\.")])


def test_key_in_two_components_is_rejected():
    keys = ["a.w", "b.w"]
    comps = partition(keys, "granularity-0")
    twice = type(comps)(("a", "b"), (("a.w",), ("a.w", "b.w")))
    with pytest.raises(ComponentError, match="a.w"):
        check_partition(twice, keys)


def test_unknown_preset_is_named():
    with pytest.raises(ComponentError, match="granularity-9"):
        partition(["a.w"], "granularity-9")


def test_unused_parameters_are_detected_and_left_out():
    class WithTextSide(nn.Module):
        def __init__(self):
            super().__init__()
            self.visual = nn.Linear(4, 3)
            self.text_projection = nn.Parameter(torch.zeros(3, 3))  # never used in forward

        def forward(self, x):
            return self.visual(x)

    model = WithTextSide()
    unused = unused_keys(model, torch.randn(2, 4))
    assert unused == ["text_projection"]
    keys = list(model.state_dict())
    comps = partition(keys, "granularity-0", unused=unused)
    assert comps.names == ("visual",) and comps.unmixed == ("text_projection",)
    check_partition(comps, keys)
