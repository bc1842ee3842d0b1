import json
import os
import shutil
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Judgements are cached by content; the tests keep theirs apart from the user's cache.
os.environ["RAYSOUP_CACHE"] = tempfile.mkdtemp(prefix="raysoup-test-cache-")

import pytest
import torch

from raysoup.inputs.model import ModelSpec
from raysoup.inputs.pool import IngredientPool
from raysoup.methods import SoupContext, ValidationJudge
from raysoup.testbed.image import ZooConfig, build_zoo

from .helpers import val_evaluator

# A zoo small enough to build once per test run in seconds, on real Fashion-MNIST.
TINY_SPEC = ModelSpec(width=32, layers=2, heads=2, embed_dim=32)
TINY_ZOO = ZooConfig(
    ingredients=4,
    val_size=500,
    train_size=3000,
    test_size=500,
    pretrain_epochs=4.0,
    pretrain_lr=3e-3,
    finetune_epochs=(1.0, 1.0),
    finetune_lr=(3e-4, 1e-3),
    finetune_data_fraction=0.5,
    model=TINY_SPEC,
)


GROUPS = ("unit", "ray", "cluster")  # the folders; each test gets its folder's marker


def pytest_collection_modifyitems(items):
    for item in items:
        group = item.path.parent.name
        if group in GROUPS:
            item.add_marker(group)


@pytest.fixture(scope="session", autouse=True)
def _threads():
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory):
    return build_zoo(tmp_path_factory.mktemp("zoo"), TINY_ZOO)


@pytest.fixture(scope="session")
def soup_zoo(tiny_zoo, tmp_path_factory):
    """The tiny zoo plus an exact copy of its best ingredient, which ManifoldMix must
    accept (a tie is accepted), so runs have a real accepted step to checkpoint."""
    zoo = tmp_path_factory.mktemp("soupzoo") / "zoo"
    shutil.copytree(tiny_zoo, zoo)
    pool = IngredientPool.from_zoo(zoo)
    evaluator = val_evaluator(zoo)
    best = SoupContext.rank(pool, ValidationJudge(evaluator.accuracy)).ranking[0][0]
    manifest = json.loads((zoo / "manifest.json").read_text())
    shutil.copy(zoo / f"ingredients/{best}.safetensors", zoo / "ingredients/twin.safetensors")
    manifest["ingredients"].append({"name": "twin", "file": "ingredients/twin.safetensors"})
    (zoo / "manifest.json").write_text(json.dumps(manifest))
    return zoo
