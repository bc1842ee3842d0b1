"""The real-user path on CLIP: open_clip ViT-B-32 ingredients in the model soups format,
image folders prepared to Arrow, a zero-shot reference, class subsets, and greedy soup plus
ManifoldMix end to end through `raysoup run`.

Weights are random (no CLIP weights are reachable offline); the images are real
Fashion-MNIST, written as PNG folders the way users hold their data.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from raysoup.components import partition, unused_keys
from raysoup.errors import RaysoupError
from raysoup.evaluate import Evaluator
from raysoup.families import state_dict_template
from raysoup.inputs.data import EvalSetSource, read_eval_set
from raysoup.inputs.model import ModelSpec, build_classifier, clip_model
from raysoup.inputs.pool import IngredientPool, check_state_dict
from raysoup.inputs.weights import CheckpointError, load_state_dict
from raysoup.testbed.fashion_mnist import load_fashion_mnist
from raysoup.tools.zeroshot import resolve_pretrained, zeroshot_classifier

CLASSES = ["t-shirt", "trouser", "pullover"]
VIT_B_32 = ModelSpec.from_dict({"arch": "ViT-B-32", "num_classes": len(CLASSES)})


def write_image_folder(
    root: Path, images: np.ndarray, labels: np.ndarray, per_class: int, invert: bool = False
) -> Path:
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i, row in enumerate(np.flatnonzero(labels == c)[:per_class]):
            pixels = 255 - images[row, 0] if invert else images[row, 0]
            Image.fromarray(pixels).save(root / name / f"{i:03d}.png")
    return root


def raysoup(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "raysoup.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
        check=False,
    )


def test_model_soups_layout_presets():
    """The reference's granularities give 2 / 8 / 15 / 26 components on the model soups
    ViT-B/32 layout, and dropping unused weights leaves out the text-side tensors."""
    keys = list(state_dict_template(VIT_B_32))
    assert [len(partition(keys, f"granularity-{g}")) for g in range(4)] == [2, 8, 15, 26]
    assert "model.token_embedding.weight" in keys and "classification_head.bias" in keys
    assert not any(k.startswith("model.transformer.") for k in keys)  # as model soups saves
    model = build_classifier(VIT_B_32)
    unused = unused_keys(model, torch.zeros(1, 3, 224, 224, dtype=torch.uint8))
    assert sorted(unused) == sorted(
        [
            "model.positional_embedding",
            "model.text_projection",
            "model.logit_scale",
            "model.token_embedding.weight",
            "model.ln_final.weight",
            "model.ln_final.bias",
        ]
    )
    assert partition(keys, "granularity-1", unused).names == (
        "model.visual",
        "classification_head.weight",
        "classification_head.bias",
    )


def test_zeroshot_head_is_open_clips_normalised_prompt_mean():
    torch.manual_seed(0)
    clip = clip_model("ViT-B-32").eval()
    templates = ["a photo of a {}.", "a blurry photo of a {}."]
    state = zeroshot_classifier(clip, "ViT-B-32", CLASSES, templates)
    head = state["classification_head.weight"]
    tokenizer = __import__("open_clip").get_tokenizer("ViT-B-32")
    with torch.no_grad():
        for c, name in enumerate(CLASSES):
            emb = clip.encode_text(tokenizer([t.format(name) for t in templates]))
            emb = emb / emb.norm(dim=-1, keepdim=True)
            mean = emb.mean(0)
            expected = mean / mean.norm() * clip.logit_scale.exp()
            torch.testing.assert_close(head[c], expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(state["classification_head.bias"], torch.zeros(len(CLASSES)))
    check_state_dict(state, state_dict_template(VIT_B_32), "zero-shot", "ViT-B-32")


def test_pretrained_tag_offline_fails_fast(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache
    with pytest.raises(RaysoupError, match="not on this machine.*never downloads"):
        resolve_pretrained("ViT-B-32-quickgelu", "openai")
    with pytest.raises(RaysoupError, match="QuickGELU"):
        resolve_pretrained("ViT-B-32", "openai")
    with pytest.raises(RaysoupError, match="neither a file nor an open_clip tag"):
        resolve_pretrained("ViT-B-32", "no-such-tag")


def test_bad_checkpoints_are_named():
    template = state_dict_template(VIT_B_32)  # shapes only (meta tensors)
    headless = {k: v for k, v in template.items() if not k.startswith("classification_head.")}
    with pytest.raises(CheckpointError, match="ft.pt: no classification head"):
        check_state_dict(headless, template, "ft.pt", "ViT-B-32")
    other = state_dict_template(ModelSpec.from_dict({"arch": "ViT-B-16", "num_classes": 3}))
    with pytest.raises(CheckpointError, match="ft16.pt.*'ViT-B-32'.*another architecture"):
        check_state_dict(other, template, "ft16.pt", "ViT-B-32")
    partial = {k: v for k, v in template.items() if not k.startswith("model.visual.ln_post")}
    with pytest.raises(CheckpointError, match="missing.*model.visual.ln_post.bias"):
        check_state_dict(partial, template, "ft.pt", "ViT-B-32")


def test_data_parallel_and_kept_text_tower_are_mapped_not_refused(tmp_path):
    """Saved from DataParallel (`module.`), with the text transformer kept (keep_lang):
    loaded with the same tensors; ingredients found by a glob, named by file stem."""
    spec = ModelSpec(width=32, layers=1, heads=2, embed_dim=8, num_classes=3)
    state = build_classifier(spec).state_dict()
    text_tower = {"model.transformer.resblocks.0.attn.in_proj_weight": torch.ones(3, 3)}
    torch.save({f"module.{k}": v for k, v in {**state, **text_tower}.items()}, tmp_path / "dp.pt")
    torch.save(state, tmp_path / "plain.pt")
    (tmp_path / "manifest.json").write_text(
        json.dumps({"model": spec.to_dict(), "ingredients": "*.pt", "eval_sets": {}})
    )
    pool = IngredientPool.from_zoo(tmp_path)
    assert pool.names == ["dp", "plain"]
    pool.validate()
    loaded = pool.load("dp")
    assert list(loaded) == list(state) and all(torch.equal(loaded[k], v) for k, v in state.items())


def test_class_map_projects_logits():
    """ObjectNet-style: set label e scores the max logit over its model classes; labels
    without a counterpart are left out. ImageNet-R-style: predictions within a subset."""
    spec = ModelSpec(width=32, layers=1, heads=2, embed_dim=8, num_classes=4)
    model = build_classifier(spec)
    images = torch.randint(0, 255, (40, 1, 28, 28), dtype=torch.uint8)
    with torch.no_grad():
        logits = model(images)
    class_map = ((0, 2), (3,), ())
    proj = torch.stack([logits[:, [0, 2]].amax(1), logits[:, 3]], dim=1)
    labels = np.arange(40) % 3
    from raysoup.inputs.data import EvalSet

    keep = labels != 2
    evaluator = Evaluator(spec, [EvalSet("m", images.numpy()[keep], labels[keep], class_map)])
    evaluator.load(model.state_dict())
    correct, total = evaluator.correct("m")
    assert total == keep.sum()
    assert correct == int((proj[keep].argmax(1).numpy() == labels[keep]).sum())


@pytest.mark.slow
def test_clip_workflow_end_to_end(tmp_path):
    """Folders -> `raysoup prepare` -> two random ViT-B-32 ingredients in the model soups
    format + a zero-shot reference -> `raysoup run` with greedy soup and ManifoldMix."""
    fm = load_fashion_mnist()
    train = write_image_folder(tmp_path / "train", fm["train_images"], fm["train_labels"], 8)
    test = write_image_folder(tmp_path / "test", fm["test_images"], fm["test_labels"], 4)
    inverted = write_image_folder(
        tmp_path / "inverted", fm["test_images"], fm["test_labels"], 4, invert=True
    )
    (tmp_path / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    zoo = tmp_path / "zoo"
    for name, src, extra in [
        ("val", train, ["--val-fraction", "0.5", "--seed", "3"]),
        ("id", test, []),
        ("inverted", inverted, []),
    ]:
        done = raysoup(
            "prepare",
            str(src),
            "--out",
            str(zoo / "data" / name),
            "--arch",
            "ViT-B-32",
            "--classes",
            str(tmp_path / "classes.txt"),
            *extra,
            cwd=tmp_path,
        )
        assert done.returncode == 0, done.stderr
    val = read_eval_set(EvalSetSource(str(zoo / "data" / "val")))
    assert val.images.shape == (12, 3, 224, 224) and sorted(np.bincount(val.labels)) == [4] * 3

    # The zero-shot classifier of a (random) CLIP: reference row and init of the fine-tunes.
    torch.manual_seed(0)
    torch.save(clip_model("ViT-B-32").state_dict(), tmp_path / "clip.pt")
    done = raysoup(
        "zeroshot",
        "--arch",
        "ViT-B-32",
        "--pretrained",
        str(tmp_path / "clip.pt"),
        "--classes",
        str(tmp_path / "classes.txt"),
        "--templates",
        "simple",
        "--out",
        str(zoo / "zeroshot.safetensors"),
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    base = load_state_dict(zoo / "zeroshot.safetensors")
    (zoo / "ingredients").mkdir()
    for i in range(2):  # "fine-tunes": the zero-shot model moved in two directions
        g = torch.Generator().manual_seed(i)
        torch.save(
            {
                k: v + 0.02 * v.std() * torch.randn(v.shape, generator=g)
                if v.is_floating_point() and v.numel() > 1
                else v
                for k, v in base.items()
            },
            zoo / "ingredients" / f"ft-{i}.pt",
        )
    (zoo / "manifest.json").write_text(
        json.dumps(
            {
                "model": {"arch": "ViT-B-32", "num_classes": 3},
                "classes": CLASSES,
                "ingredients": "ingredients/*.pt",
                "pretrained": {"file": "zeroshot.safetensors"},
                "eval_sets": {
                    "val": "data/val",
                    "id": "data/id",
                    "inverted": {"file": "data/inverted", "class_subset": ["t-shirt", "pullover"]},
                },
            }
        )
    )
    (tmp_path / "run.toml").write_text(
        'out = "run"\nmethods = ["greedy_soup", "manifold_mix"]\n'
        '[pool]\nzoo = "zoo"\n'
        '[search]\ncomponents = "granularity-1"\ndrop_unused = true\n'
        "[manifold_mix]\nevals_per_component = 2\ntau = 0.5\n"
        "[resources]\nevaluators = 1\ncpus_per_evaluator = 1\n"
    )
    done = raysoup("run", "run.toml", cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert set(report["methods"]) == {"greedy_soup", "manifold_mix"}
    mix = report["methods"]["manifold_mix"]
    assert sorted(mix["components"]) == [
        "classification_head.bias",  # text tower dropped
        "classification_head.weight",
        "model.visual",
    ]
    assert report["methods"]["greedy_soup"]["val"] >= max(a for _, a in report["ranking"])
    assert mix["val"] >= max(a for _, a in report["ranking"])
    assert set(report["references"]["pretrained"]["ood"]) == {"inverted"}
    assert report["data"]["val"]["split"] == {"seed": 3, "fraction": 0.5, "val": 12, "train": 12}
    fused = load_state_dict(tmp_path / "run" / "fused.safetensors")
    check_state_dict(fused, state_dict_template(VIT_B_32), "fused", "ViT-B-32")


def test_spec_round_trips_and_testbed_manifests_keep_their_form():
    """A testbed spec serialises as before `arch` existed, so zoo manifests and the zoo
    cache key stay valid; an arch spec round-trips with its open_clip-derived fields."""
    assert "arch" not in ModelSpec().to_dict()
    assert ModelSpec.from_dict(ModelSpec().to_dict()) == ModelSpec()
    assert ModelSpec.from_dict(VIT_B_32.to_dict()) == VIT_B_32
    assert (VIT_B_32.image_size, VIT_B_32.in_channels, VIT_B_32.embed_dim) == (224, 3, 512)


def test_unsupported_architectures_and_given_normalisation():
    with pytest.raises(RaysoupError, match="custom text tower"):
        ModelSpec.from_dict({"arch": "ViT-B-16-SigLIP", "num_classes": 3})
    with pytest.raises(RaysoupError, match="did you mean ViT-B-32"):
        ModelSpec.from_dict({"arch": "ViT-B-32x", "num_classes": 3})
    spec = ModelSpec.from_dict(
        {"arch": "ViT-B-32", "num_classes": 3, "mean": [0.5] * 3, "std": [0.5] * 3}
    )
    assert spec.mean == (0.5,) * 3 and spec.std == (0.5,) * 3


def test_examples_parse():
    from raysoup.config import load_config

    examples = Path(__file__).parents[2] / "examples" / "clip"
    config = load_config(examples / "run.toml")
    assert config.methods == ("greedy_soup", "manifold_mix") and config.search.drop_unused
    manifest = json.loads((examples / "manifest.json").read_text())
    assert ModelSpec.from_dict(manifest["model"]).arch == "ViT-B-32-quickgelu"
