"""Model families: tiny Hugging Face models (random init, saved with save_pretrained) through
the whole run path, LoRA adapters merged as peft merges them, and bad input in one line."""

import json
import shutil

import numpy as np
import pytest
import torch

from raysoup.errors import RaysoupError
from raysoup.families import FAMILIES, spec_from_dict
from raysoup.inputs.data import EvalSet, write_eval_set
from raysoup.inputs.pool import IngredientPool

transformers = pytest.importorskip("transformers")

WORDS = {0: "cat dog bird fish horse", 1: "car bus train plane boat", 2: "red blue green pink gold"}


def _sentences(rng, n):
    labels = rng.integers(0, 3, n)
    noise = ["the", "a", "of", "on", "in"]
    text = [" ".join(rng.choice(WORDS[int(y)].split() + noise, 6)) for y in labels]
    return text, labels.astype(np.int64)


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        *" ".join(WORDS.values()).split(),
        *["the", "a", "of", "on", "in"],
    ]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
    )


def _perturbed(model, seed, std=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return model


def _lora(base_folder, out, seed, target=("query", "value")):
    from peft import LoraConfig, get_peft_model

    base = transformers.AutoModelForSequenceClassification.from_pretrained(base_folder)
    peft_model = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, target_modules=list(target), task_type="SEQ_CLS")
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "classifier" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    peft_model.save_pretrained(out)
    return peft_model


@pytest.fixture(scope="module")
def text_zoo(tmp_path_factory):
    """pretrained + 4 ingredients: fp32, bf16, sharded, and a LoRA adapter of pretrained;
    val/id as text, one OOD set pre-tokenised."""
    zoo = tmp_path_factory.mktemp("textzoo")
    torch.manual_seed(0)
    tokenizer = _tokenizer()
    config = transformers.BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        num_labels=3,
        pad_token_id=0,
    )
    pretrained = transformers.AutoModelForSequenceClassification.from_config(config)
    pretrained.save_pretrained(zoo / "pretrained")
    tokenizer.save_pretrained(zoo / "pretrained")
    ingredients = zoo / "ingredients"
    _perturbed(pretrained, 1).save_pretrained(ingredients / "ft-00")
    pretrained = transformers.AutoModelForSequenceClassification.from_pretrained(zoo / "pretrained")
    _perturbed(pretrained, 2).to(torch.bfloat16).save_pretrained(ingredients / "ft-01")
    pretrained = transformers.AutoModelForSequenceClassification.from_pretrained(zoo / "pretrained")
    _perturbed(pretrained, 3).save_pretrained(ingredients / "ft-02", max_shard_size="40KB")
    _lora(zoo / "pretrained", ingredients / "ft-03", 4)
    rng = np.random.default_rng(0)
    (zoo / "data").mkdir()
    for name, n in (("val", 60), ("id", 40), ("typos", 40)):
        text, labels = _sentences(rng, n)
        column = {"text": np.array(text, dtype=object)}
        if name == "typos":  # pre-tokenised, as a user may ship it
            column = {
                "input_ids": np.array(
                    [np.array(tokenizer(t)["input_ids"]) for t in text] + [None], dtype=object
                )[:-1]
            }
        write_eval_set(EvalSet(name, column, labels), zoo / "data" / f"{name}.arrow")
    manifest = {
        "model": {
            "family": "transformers",
            "task": "sequence-classification",
            "path": "pretrained",
            "num_classes": 3,
            "max_length": 12,
        },
        "pretrained": {"file": "pretrained"},
        "ingredients": [{"name": f"ft-0{i}", "file": f"ingredients/ft-0{i}"} for i in range(4)],
        "eval_sets": {n: {"file": f"data/{n}.arrow"} for n in ("val", "id", "typos")},
    }
    (zoo / "manifest.json").write_text(json.dumps(manifest))
    return zoo


def test_lora_ingredient_is_peft_merge_and_unload(text_zoo, tmp_path):
    from peft import PeftModel

    pool = IngredientPool.from_zoo(text_zoo)
    ours = pool.load("ft-03")
    base = transformers.AutoModelForSequenceClassification.from_pretrained(text_zoo / "pretrained")
    merged = PeftModel.from_pretrained(base, text_zoo / "ingredients/ft-03").merge_and_unload()
    theirs = merged.state_dict()
    assert set(ours) == set(theirs)
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key].float(), rtol=1e-5, atol=1e-6)
    changed = [k for k in theirs if not torch.equal(ours[k], pool.load("ft-00")[k])]
    assert any("query" in k for k in changed) and "classifier.weight" in changed


def test_ingredients_of_every_dtype_and_layout_load_in_fp32(text_zoo):
    pool = IngredientPool.from_zoo(text_zoo)
    pool.validate()
    fp32 = transformers.AutoModelForSequenceClassification.from_pretrained(
        text_zoo / "ingredients/ft-02"
    ).state_dict()  # sharded
    loaded = pool.load("ft-02")
    assert all(torch.equal(loaded[k], fp32[k]) for k in fp32)
    assert all(
        v.dtype == torch.float32 for v in pool.load("ft-01").values() if v.is_floating_point()
    )


def test_text_set_batches_match_the_model_called_directly(text_zoo):
    from raysoup.evaluate import Evaluator, load_eval_sets
    from raysoup.inputs.tasks import eval_set_sources

    pool = IngredientPool.from_zoo(text_zoo)
    sets = load_eval_sets(eval_set_sources(text_zoo), 3)
    evaluator = Evaluator(pool.spec, sets, batch_size=7)
    weights = pool.load("ft-00")
    hits = evaluator.correctness(weights)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        text_zoo / "ingredients/ft-00"
    ).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(text_zoo / "pretrained")
    val = next(s for s in sets if s.name == "val")
    enc = tokenizer(
        list(val.inputs["text"]),
        padding="max_length",
        truncation=True,
        max_length=12,
        return_tensors="pt",
    )
    with torch.no_grad():
        direct = model(**enc).logits.argmax(1).numpy() == val.labels
    np.testing.assert_array_equal(hits["val"], direct)
    assert len(hits["typos"]) == 40


def _run_config(tmp_path, zoo, methods, out="out"):
    from raysoup.config import load_config

    path = tmp_path / "run.toml"
    path.write_text(
        "\n".join(
            [
                f'out = "{tmp_path / out}"',
                f"methods = {json.dumps(methods)}",
                "[pool]",
                f'zoo = "{zoo}"',
                "[search]",
                'components = "per-block"',
                "[manifold_mix]",
                "evals_per_component = 2",
                "tau = 0.9",
                "[task_arithmetic]",
                "budget = 3",
                "[ties_merging]",
                "budget = 3",
                "[learned_soup]",
                "epochs = 2",
                "[resources]",
                "evaluators = 2",
                "cpus_per_evaluator = 0.5",
                "gpus_per_evaluator = 0",
            ]
        )
        + "\n"
    )
    return load_config(path)


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.slow
def test_text_pool_runs_every_method_and_exports_a_from_pretrained_folder(
    text_zoo, tmp_path, local_ray
):
    from raysoup.export import export_like
    from raysoup.methods import METHODS
    from raysoup.runner import execute

    config = _run_config(tmp_path, text_zoo, list(METHODS))
    report = execute(config)
    assert set(report["methods"]) == set(METHODS)
    for row in report["methods"].values():
        assert 0 <= row["val"] <= 1 and set(row["ood"]) == {"typos"}
    out = export_like(config.out, "ft-01", tmp_path / "exported")  # a bf16 ingredient
    model = transformers.AutoModelForSequenceClassification.from_pretrained(out)
    assert next(model.parameters()).dtype == torch.bfloat16
    out = export_like(config.out, "ft-00", tmp_path / "exported32")
    model = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)  # copied beside it
    from raysoup.inputs.data import read_eval_set

    val = read_eval_set(text_zoo / "data/val.arrow")
    enc = tokenizer(
        list(val.inputs["text"]),
        padding="max_length",
        truncation=True,
        max_length=12,
        return_tensors="pt",
    )
    with torch.no_grad():
        accuracy = float((model(**enc).logits.argmax(1).numpy() == val.labels).mean())
    assert accuracy == pytest.approx(report["methods"]["manifold_mix"]["val"])


@pytest.fixture(scope="module")
def vit_zoo(tmp_path_factory):
    zoo = tmp_path_factory.mktemp("vitzoo")
    torch.manual_seed(0)
    config = transformers.ViTConfig(
        image_size=8,
        patch_size=4,
        num_channels=1,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=3,
    )
    model = transformers.AutoModelForImageClassification.from_config(config)
    model.save_pretrained(zoo / "pretrained")
    for i in range(3):
        _perturbed(model, 10 + i, 0.2).save_pretrained(
            zoo / f"ingredients/ft-0{i}", max_shard_size="20KB" if i else "1GB"
        )
    rng = np.random.default_rng(1)
    (zoo / "data").mkdir()
    for name in ("val", "id", "noise"):
        write_eval_set(
            EvalSet(
                name, rng.integers(0, 256, (30, 1, 8, 8), dtype=np.uint8), rng.integers(0, 3, 30)
            ),
            zoo / "data" / f"{name}.arrow",
        )
    (zoo / "manifest.json").write_text(
        json.dumps(
            {
                "model": {
                    "family": "transformers",
                    "task": "image-classification",
                    "path": "pretrained",
                    "num_classes": 3,
                },
                "pretrained": "pretrained",
                "ingredients": [
                    {"name": f"ft-0{i}", "file": f"ingredients/ft-0{i}"} for i in range(3)
                ],
                "eval_sets": {n: f"data/{n}.arrow" for n in ("val", "id", "noise")},
            }
        )
    )
    return zoo


@pytest.mark.slow
def test_image_pool_runs_every_method_and_exports(vit_zoo, tmp_path, local_ray):
    from raysoup.export import export_like
    from raysoup.methods import METHODS
    from raysoup.runner import execute

    config = _run_config(tmp_path, vit_zoo, list(METHODS))
    report = execute(config)
    assert set(report["methods"]) == set(METHODS)
    out = export_like(config.out, "ft-01", tmp_path / "exported")  # a sharded ingredient
    model = transformers.AutoModelForImageClassification.from_pretrained(out)
    fused = IngredientPool.from_zoo(vit_zoo)  # the exported weights are the fused model's
    from safetensors.torch import load_file

    for key, value in load_file(config.out / "fused.safetensors").items():
        assert torch.equal(model.state_dict()[key], value)
    assert fused.spec.task == "image-classification"


def _edit(zoo, tmp_path, change):
    copy = tmp_path / "zoo"
    shutil.copytree(zoo, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    change(manifest, copy)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


def test_unknown_family_suggests_the_close_one(tmp_path):
    with pytest.raises(RaysoupError, match=r"model.family = 'transformer' .*'transformers'"):
        spec_from_dict({"family": "transformer", "num_classes": 3}, str(tmp_path / "m.json"))
    assert {"testbed", "open_clip", "transformers"} <= set(FAMILIES)


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda m, z: (z / "pretrained/config.json").write_text('{"model_type": "nonsense"}'),
            "config.json does not build",
        ),
        (lambda m, z: m["model"].update(num_classes=5), "num_classes = 5, but .* 3 labels"),
        (lambda m, z: m["model"].update(path="nowhere"), "model.path = 'nowhere': no such folder"),
        (lambda m, z: m["model"].update(task="translation"), 'model.task = "translation"'),
    ],
)
def test_a_bad_model_entry_is_one_line(text_zoo, tmp_path, change, message):
    zoo = _edit(text_zoo, tmp_path, change)
    with pytest.raises(RaysoupError, match=message) as e:
        IngredientPool.from_zoo(zoo).validate()
    assert "\n" not in str(e.value)


def _other_base_adapter(m, zoo):
    other = zoo / "other"
    shutil.copytree(zoo / "pretrained", other)
    _lora(other, zoo / "ingredients/ft-04", 5)
    m["ingredients"].append({"name": "ft-04", "file": "ingredients/ft-04"})


def _wider_ingredient(m, zoo):
    config = transformers.AutoConfig.from_pretrained(zoo / "pretrained")
    config.intermediate_size = 48
    transformers.AutoModelForSequenceClassification.from_config(config).save_pretrained(
        zoo / "ingredients/ft-00"
    )


@pytest.mark.parametrize(
    "change, message",
    [
        (_other_base_adapter, "LoRA adapters of different base models"),
        (_wider_ingredient, "ft-00: key .*intermediate.dense.weight has shape"),
    ],
)
def test_a_pool_that_disagrees_is_refused_in_one_line(text_zoo, tmp_path, change, message):
    zoo = _edit(text_zoo, tmp_path, change)
    with pytest.raises(RaysoupError, match=message) as e:
        IngredientPool.from_zoo(zoo).validate()
    assert "\n" not in str(e.value)


def test_a_text_set_without_a_tokenizer_is_refused_before_ray(text_zoo, tmp_path):
    from raysoup.preflight import validate_run

    def drop_tokenizer(m, zoo):
        for f in ("tokenizer.json", "tokenizer_config.json"):
            (zoo / "pretrained" / f).unlink()

    zoo = _edit(text_zoo, tmp_path, drop_tokenizer)
    with pytest.raises(RaysoupError, match="no tokenizer for the text sets") as e:
        validate_run(_run_config(tmp_path, zoo, ["uniform_soup"]), resume=False)
    assert "\n" not in str(e.value)


TIMM_MODEL = {
    "family": "timm",
    "arch": "vit_tiny_patch16_224",
    "num_classes": 3,
    "img_size": 8,
    "in_chans": 1,
    "kwargs": {"patch_size": 4, "embed_dim": 16, "depth": 2, "num_heads": 2},
}


@pytest.fixture(scope="module")
def timm_zoo(tmp_path_factory):
    """A tiny timm ViT: pretrained + 3 ingredients as safetensors (fp32, fp16) and a timm
    train.py-style torch.save checkpoint ({"state_dict": ...} of a DataParallel model)."""
    import timm
    from safetensors.torch import save_file

    zoo = tmp_path_factory.mktemp("timmzoo")
    torch.manual_seed(0)
    kwargs = {k: v for k, v in TIMM_MODEL.items() if k not in ("family", "arch", "kwargs")}
    model = timm.create_model(
        TIMM_MODEL["arch"], pretrained=False, **kwargs, **TIMM_MODEL["kwargs"]
    )
    (zoo / "ingredients").mkdir()
    save_file(model.state_dict(), zoo / "pretrained.safetensors")
    save_file(_perturbed(model, 20, 0.2).state_dict(), zoo / "ingredients/ft-00.safetensors")
    save_file(
        {k: v.half() for k, v in _perturbed(model, 21, 0.2).state_dict().items()},
        zoo / "ingredients/ft-01.safetensors",
    )
    torch.save(
        {
            "epoch": 3,
            "state_dict": {
                f"module.{k}": v for k, v in _perturbed(model, 22, 0.2).state_dict().items()
            },
        },
        zoo / "ingredients/ft-02.pth.tar",
    )
    rng = np.random.default_rng(2)
    (zoo / "data").mkdir()
    for name in ("val", "id", "noise"):
        write_eval_set(
            EvalSet(
                name, rng.integers(0, 256, (30, 1, 8, 8), dtype=np.uint8), rng.integers(0, 3, 30)
            ),
            zoo / "data" / f"{name}.arrow",
        )
    (zoo / "manifest.json").write_text(
        json.dumps(
            {
                "model": TIMM_MODEL,
                "pretrained": "pretrained.safetensors",
                "ingredients": [
                    {"name": "ft-00", "file": "ingredients/ft-00.safetensors"},
                    {"name": "ft-01", "file": "ingredients/ft-01.safetensors"},
                    {"name": "ft-02", "file": "ingredients/ft-02.pth.tar"},
                ],
                "eval_sets": {n: f"data/{n}.arrow" for n in ("val", "id", "noise")},
            }
        )
    )
    return zoo


def test_timm_batches_match_the_model_called_directly(timm_zoo):
    import timm

    from raysoup.components import partition
    from raysoup.evaluate import Evaluator, load_eval_sets
    from raysoup.inputs.tasks import eval_set_sources

    pool = IngredientPool.from_zoo(timm_zoo)
    pool.validate()
    weights = pool.load("ft-02")  # the train.py checkpoint, "module." stripped
    sets = load_eval_sets(eval_set_sources(timm_zoo), 3)
    hits = Evaluator(pool.spec, sets, batch_size=7).correctness(weights)
    model = timm.create_model(
        "vit_tiny_patch16_224", num_classes=3, img_size=8, in_chans=1, **TIMM_MODEL["kwargs"]
    ).eval()
    model.load_state_dict(weights)
    val = next(s for s in sets if s.name == "val")
    x = (torch.tensor(np.array(val.inputs)).float() / 255 - 0.5) / 0.5  # the config's mean/std
    with torch.no_grad():
        direct = model(x).argmax(1).numpy() == val.labels
    np.testing.assert_array_equal(hits["val"], direct)
    family = FAMILIES["timm"]
    names = partition(list(weights), "per-block", presets=family.presets).names
    assert names == (
        "cls_token",
        "pos_embed",
        "patch_embed",
        "blocks.0",
        "blocks.1",
        "norm",
        "head",
    )
    assert len(partition(list(weights), "whole-model", presets=family.presets)) == 1


def test_timm_cnn_blocks_and_any_image_size():
    from raysoup.components import partition

    family = FAMILIES["timm"]
    spec = spec_from_dict(
        {"family": "timm", "arch": "resnet10t", "num_classes": 4, "img_size": 16}, "m.json"
    )
    assert family.inputs(spec) == (3, 16, 16)  # a CNN is built as is, fed 16 px images
    model = family.build(spec).eval()
    with torch.no_grad():
        assert family.forward(spec, model, torch.zeros(2, 3, 16, 16, dtype=torch.uint8)).shape == (
            2,
            4,
        )
    names = partition(list(family.template(spec)), "per-block", presets=family.presets).names
    assert names == ("conv1", "bn1", "layer1.0", "layer2.0", "layer3.0", "layer4.0", "fc")


@pytest.mark.parametrize(
    "entry, message",
    [
        (
            {"arch": "vit_tiny_patch16_22"},
            ("'vit_tiny_patch16_22' is not a timm model; did you mean vit_tiny_patch16_224"),
        ),
        (
            {"arch": "resnet10t", "kwargs": {"depht": 2}},
            ("timm.create_model.*unexpected keyword argument 'depht'"),
        ),
        ({"arch": "resnet10t", "kwargs": {"pretrained": True}}, "raysoup never downloads"),
        ({"arch": "resnet10t", "kwargs": {"num_classes": 5}}, "give it as model.num_classes"),
        ({"arch": "resnet10t", "in_chans": 1, "mean": [0.1, 0.2]}, "model.mean has 2 value"),
    ],
)
def test_a_bad_timm_entry_is_one_line(entry, message):
    with pytest.raises(RaysoupError, match=message) as e:
        spec_from_dict({"family": "timm", "num_classes": 3, **entry}, "m.json")
    assert "\n" not in str(e.value) and str(e.value).startswith("m.json: ")


@pytest.mark.slow
def test_timm_pool_runs_every_method_and_exports(timm_zoo, tmp_path, local_ray):
    import timm
    from safetensors.torch import load_file

    from raysoup.export import export_like
    from raysoup.methods import METHODS
    from raysoup.runner import execute

    config = _run_config(tmp_path, timm_zoo, list(METHODS))
    report = execute(config)
    assert set(report["methods"]) == set(METHODS)
    for row in report["methods"].values():
        assert 0 <= row["val"] <= 1 and set(row["ood"]) == {"noise"}
    fused = load_file(config.out / "fused.safetensors")
    out = export_like(config.out, "ft-01", tmp_path / "soup.safetensors")  # the fp16 one
    exported = load_file(out)
    assert set(exported) == set(fused) and all(v.dtype == torch.float16 for v in exported.values())
    out = export_like(config.out, "ft-02", tmp_path / "soup.pth")  # the train.py one
    exported = torch.load(out, weights_only=True)
    model = timm.create_model(
        "vit_tiny_patch16_224", num_classes=3, img_size=8, in_chans=1, **TIMM_MODEL["kwargs"]
    )
    model.load_state_dict({k.removeprefix("module."): v for k, v in exported.items()})
    assert all(torch.equal(model.state_dict()[k], v) for k, v in fused.items())


@pytest.fixture(scope="module")
def clip_zoo(tmp_path_factory):
    """A tiny HF CLIPModel (random init) with its tokenizer; the pretrained ingredient is its
    zero-shot classifier, the fine-tunes perturbations of it, as safetensors files."""
    from safetensors.torch import save_file

    from raysoup.tools.zeroshot import hf_zeroshot_classifier

    zoo = tmp_path_factory.mktemp("clipzoo")
    torch.manual_seed(0)
    tokenizer = _tokenizer()
    config = transformers.CLIPConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 16,
            "eos_token_id": 3,
            "pad_token_id": 0,
        },
        vision_config={
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 8,
            "patch_size": 4,
        },
        projection_dim=8,
    )
    transformers.CLIPModel(config).save_pretrained(zoo / "clip")
    tokenizer.save_pretrained(zoo / "clip")
    pretrained = hf_zeroshot_classifier(
        str(zoo / "clip"), ["cat", "car", "red"], ["a {} .", "the {}"]
    )
    save_file(pretrained, zoo / "pretrained.safetensors")
    (zoo / "ingredients").mkdir()
    for i in range(3):
        g = torch.Generator().manual_seed(30 + i)
        save_file(
            {k: v + torch.randn(v.shape, generator=g) * 0.1 for k, v in pretrained.items()},
            zoo / f"ingredients/ft-0{i}.safetensors",
        )
    rng = np.random.default_rng(3)
    (zoo / "data").mkdir()
    for name in ("val", "id", "noise"):
        write_eval_set(
            EvalSet(
                name, rng.integers(0, 256, (30, 3, 8, 8), dtype=np.uint8), rng.integers(0, 3, 30)
            ),
            zoo / "data" / f"{name}.arrow",
        )
    (zoo / "manifest.json").write_text(
        json.dumps(
            {
                "model": {
                    "family": "transformers",
                    "task": "clip-classification",
                    "path": "clip",
                    "num_classes": 3,
                },
                "pretrained": "pretrained.safetensors",
                "ingredients": "ingredients/*.safetensors",
                "eval_sets": {n: f"data/{n}.arrow" for n in ("val", "id", "noise")},
            }
        )
    )
    return zoo, tokenizer


def test_clip_zero_shot_head_is_the_text_towers_class_embeddings(clip_zoo):
    zoo, tokenizer = clip_zoo
    clip = transformers.CLIPModel.from_pretrained(zoo / "clip").eval()
    pool = IngredientPool.from_zoo(zoo)
    pool.validate()
    from raysoup.inputs.weights import load_state_dict

    state = load_state_dict(zoo / "pretrained.safetensors")
    with torch.no_grad():
        tokens = tokenizer(["a cat .", "the cat"], padding=True, return_tensors="pt")
        text = clip.get_text_features(**tokens)
        text = getattr(text, "pooler_output", text)
        text = torch.nn.functional.normalize(text, dim=-1).mean(0)
        row = torch.nn.functional.normalize(text, dim=0) * clip.logit_scale.exp()
    torch.testing.assert_close(state["head.weight"][0], row)
    # The classifier's logits: CLIP's own image embeds, normalised, through the head.
    family = FAMILIES["transformers"]
    model = family.build(pool.spec).eval()
    model.load_state_dict(state)
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    with torch.no_grad():
        ours = family.forward(pool.spec, model, images)
        pixels = (images.float() / 255 - 0.5) / 0.5  # no preprocessor_config: 0.5 / 0.5
        embeds = clip.get_image_features(pixel_values=pixels)
        embeds = getattr(embeds, "pooler_output", embeds)
        theirs = torch.nn.functional.normalize(embeds, dim=-1) @ state["head.weight"].T
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_clip_pool_runs_and_exports_a_state_dict(clip_zoo, tmp_path, local_ray):
    from safetensors.torch import load_file

    from raysoup.export import export_like
    from raysoup.methods import METHODS
    from raysoup.runner import execute

    zoo, _ = clip_zoo
    methods = list(METHODS)  # every method, as for the other families
    config = _run_config(tmp_path, zoo, methods)
    report = execute(config)
    assert set(report["methods"]) == set(methods) and "pretrained" in report["references"]
    out = export_like(config.out, "ft-00", tmp_path / "soup.safetensors")
    exported, fused = load_file(out), load_file(config.out / "fused.safetensors")
    assert set(exported) == set(fused) and all(torch.equal(exported[k], fused[k]) for k in fused)
    assert "head.weight" in exported and any(k.startswith("vision_model.") for k in exported)
