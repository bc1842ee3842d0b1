import pickle

import pytest
import torch
from safetensors.torch import save_file

from raysoup.inputs.model import build_classifier
from raysoup.inputs.pool import Ingredient, IngredientPool
from raysoup.inputs.weights import CheckpointError, load_state_dict, save_state_dict

from ..conftest import TINY_SPEC


def good_state_dict():
    return build_classifier(TINY_SPEC).state_dict()


def pool_with(tmp_path, bad):
    good = tmp_path / "good.safetensors"
    save_state_dict(good_state_dict(), good)
    return IngredientPool(TINY_SPEC, [Ingredient("good", good), Ingredient("bad", bad)])


def test_round_trip_and_torch_weights_only(tmp_path):
    sd = good_state_dict()
    save_state_dict(sd, tmp_path / "a.safetensors")
    torch.save(sd, tmp_path / "b.pt")
    for name in ("a.safetensors", "b.pt"):
        back = load_state_dict(tmp_path / name)
        assert all(torch.equal(back[k], sd[k]) for k in sd)


class Payload:
    def __reduce__(self):
        return (print, ("code ran from a checkpoint",))


def test_pickle_with_code_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"w": Payload()}, f)
    with pytest.raises(CheckpointError, match="refusing to load .*evil.pt"):
        load_state_dict(path)
    assert "code ran" not in capsys.readouterr().out


@pytest.mark.parametrize(
    "corrupt,match",
    [
        (lambda sd: sd.pop("classification_head.bias"), "missing.*classification_head.bias"),
        (lambda sd: sd.update(extra=torch.zeros(1)), "unexpected.*extra"),
        (
            lambda sd: sd.update({"classification_head.bias": torch.zeros(3)}),
            "classification_head.bias has shape",
        ),
        (
            lambda sd: sd.update(
                {"classification_head.bias": torch.zeros(10, dtype=torch.float64)}
            ),
            "classification_head.bias has dtype",
        ),
        (
            lambda sd: sd["model.visual.proj"].view(-1).__setitem__(0, float("nan")),
            "model.visual.proj holds NaN",
        ),
        (
            lambda sd: sd["model.visual.proj"].view(-1).__setitem__(0, float("inf")),
            "model.visual.proj holds NaN or Inf",
        ),
    ],
)
def test_bad_ingredients_are_named(tmp_path, corrupt, match):
    sd = {k: v.clone() for k, v in good_state_dict().items()}
    corrupt(sd)
    bad = tmp_path / "bad.safetensors"
    save_file(sd, str(bad))
    with pytest.raises(CheckpointError, match=f"bad.safetensors.*{match}"):
        pool_with(tmp_path, bad).validate()


def test_unreadable_checkpoint_is_named(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="bad.safetensors"):
        pool_with(tmp_path, bad).validate()


def test_pool_needs_two_distinct_ingredients(tmp_path):
    with pytest.raises(CheckpointError, match="at least 2"):
        IngredientPool(TINY_SPEC, [Ingredient("a", tmp_path / "a.safetensors")])
    with pytest.raises(CheckpointError, match="duplicate"):
        IngredientPool(TINY_SPEC, [Ingredient("a", tmp_path / "a"), Ingredient("a", tmp_path)])
