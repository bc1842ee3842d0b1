"""The text testbed: its shifts' properties, a tiny build that transformers loads offline,
and the sha256 check of its evaluation sets."""

import json
import os
import re
import shutil

import numpy as np
import pyarrow as pa
import pytest

from raysoup.errors import RaysoupError
from raysoup.testbed import fortunes
from raysoup.testbed.fortunes import (
    TextSet,
    make_shift,
    read_text_set,
    text_content_sha256,
    write_text_set,
)
from raysoup.testbed.text import (
    SHIPPED_TEXT_ZOO,
    TINY_TEXT_ZOO,
    build_text_zoo,
    install_shipped_text_zoo,
)


@pytest.fixture(scope="module")
def splits():
    return fortunes.topic_splits()


@pytest.fixture(scope="module")
def texts(splits):
    return splits["id"].texts[:400]


def test_splits_are_disjoint_stratified_and_fixed(splits):
    seen = [set(s.texts) for s in splits.values()]
    assert all(not (a & b) for i, a in enumerate(seen) for b in seen[i + 1 :])
    counts = {
        name: np.bincount(s.labels, minlength=len(fortunes.CLASSES)) for name, s in splits.items()
    }
    assert (counts["val"] > 0).all() and (counts["id"] > 0).all()
    share = counts["val"] / sum(counts.values())
    assert np.allclose(share, fortunes.VAL_FRACTION, atol=0.01)
    again = fortunes.topic_splits()
    assert again["val"].texts == splits["val"].texts


def test_typos_only_swap_or_drop(texts):
    shifted = make_shift(texts, "typos", seed=1)
    changed = 0
    for before, after in zip(texts, shifted):
        assert len(after) <= len(before)
        assert sorted(after) == sorted(before) or len(after) < len(before)
        # a character is dropped with chance about TYPO_RATE / 2: a text keeps most of it
        assert len(after) >= 0.8 * len(before) - 3
        changed += after != before
    assert changed > 0.8 * len(texts)
    assert make_shift(texts, "typos", seed=1) == shifted
    assert make_shift(texts, "typos", seed=2) != shifted


def test_casing_changes_only_case(texts):
    shifted = make_shift(texts, "casing", seed=1)
    for before, after in zip(texts, shifted):
        assert len(after) == len(before)
        assert after.lower() == before.lower()
    assert sum(a != b for a, b in zip(texts, shifted)) > 0.9 * len(texts)
    upper = sum(a == a.upper() for a in shifted) / len(shifted)
    assert abs(upper - (1 - fortunes.RANDOM_CASE_SHARE)) < 0.1


def test_word_dropout_removes_about_its_rate(texts):
    shifted = make_shift(texts, "word_dropout", seed=1)
    before_words = after_words = 0
    for before, after in zip(texts, shifted):
        words, kept = before.split(" "), after.split(" ")
        assert kept and len(kept) <= len(words)
        it = iter(words)
        assert all(w in it for w in kept)  # a subsequence: order kept, nothing new
        before_words += len(words)
        after_words += len(kept)
    assert abs(1 - after_words / before_words - fortunes.WORD_DROPOUT) < 0.03


def test_sources_are_unseen_and_labelled_by_topic(splits):
    every = {t for s in splits.values() for t in s.texts}
    sources = fortunes.held_out_sources(every)
    assert len(sources) > 500 and not (set(sources.texts) & every)
    topics = {fortunes.CLASSES.index(t) for t in fortunes.HELD_OUT_SOURCES.values()}
    assert set(np.unique(sources.labels)) == topics


def test_arrow_round_trip_and_fingerprint(tmp_path, texts):
    labels = np.arange(len(texts), dtype=np.int64) % 8
    write_text_set(TextSet("x", texts, labels), tmp_path / "x.arrow")
    back = read_text_set(tmp_path / "x.arrow")
    assert back.texts == texts and (back.labels == labels).all()
    schema = pa.ipc.open_file(str(tmp_path / "x.arrow")).schema
    assert schema.field("text").type == pa.string() and schema.field("label").type == pa.int64()
    sha = text_content_sha256(texts, labels)
    assert text_content_sha256(texts[:-1] + [texts[-1] + " "], labels) != sha
    assert text_content_sha256(texts, np.roll(labels, 1)) != sha


def test_missing_fortunes_names_the_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYSOUP_FORTUNES_DIR", str(tmp_path))
    with pytest.raises(RaysoupError, match=rf"fortunes not found in {re.escape(str(tmp_path))}"):
        fortunes.topic_splits()


@pytest.fixture(scope="module")
def tiny_text_zoo(tmp_path_factory):
    return build_text_zoo(tmp_path_factory.mktemp("textzoo") / "zoo", TINY_TEXT_ZOO)


def test_tiny_build_loads_offline_with_transformers(tiny_text_zoo):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from raysoup.inputs.weights import file_sha256

    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    manifest = json.loads((tiny_text_zoo / "manifest.json").read_text())
    model = manifest["model"]
    assert model == {
        "family": "transformers",
        "task": "sequence-classification",
        "path": "pretrained",
        "num_classes": len(fortunes.CLASSES),
        "max_length": TINY_TEXT_ZOO.max_length,
    }
    assert len(manifest["ingredients"]) == TINY_TEXT_ZOO.ingredients
    tokenizer = AutoTokenizer.from_pretrained(tiny_text_zoo / model["path"])
    batch = tokenizer(["Hello world", "A second, longer text"], padding=True, return_tensors="pt")
    for entry in [manifest["pretrained"], *manifest["ingredients"]]:
        folder = tiny_text_zoo / entry["file"]
        assert file_sha256(folder / "model.safetensors") == entry["sha256"]
        assert 0 <= entry["val_acc"] <= 1
        classifier = AutoModelForSequenceClassification.from_pretrained(folder)
        assert classifier.forward(**batch).logits.shape == (2, model["num_classes"])
    for name in ("val", "id", *fortunes.SHIFT_NAMES):
        entry = manifest["eval_sets"][name]
        text_set = read_text_set(tiny_text_zoo / entry["file"])
        assert len(text_set) == entry["rows"]
        assert text_content_sha256(text_set.texts, text_set.labels) == entry["sha256"]
    assert set(manifest["calibration"]["uniform soup"]) == set(manifest["eval_sets"])


def test_install_refuses_a_tampered_set(tiny_text_zoo, tmp_path, monkeypatch):
    """An install whose made sets differ from the manifest's sha256 fails with one line."""
    shipped = tmp_path / "shipped"
    shutil.copytree(tiny_text_zoo, shipped, ignore=shutil.ignore_patterns("data"))
    manifest = json.loads((shipped / "manifest.json").read_text())
    install_shipped_text_zoo(tmp_path / "ok", shipped)
    assert (tmp_path / "ok" / "data" / "casing.arrow").is_file()
    manifest["eval_sets"]["casing"]["sha256"] = "0" * 64
    (shipped / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RaysoupError) as err:
        install_shipped_text_zoo(tmp_path / "bad", shipped)
    assert "\n" not in str(err.value)
    assert re.match(
        r"text set 'casing' made on this machine differs from the shipped zoo's", str(err.value)
    )
    assert not (tmp_path / "bad").exists()


def test_tampered_set_fails_its_check(tiny_text_zoo, tmp_path):
    manifest = json.loads((tiny_text_zoo / "manifest.json").read_text())
    entry = manifest["eval_sets"]["val"]
    path = tmp_path / "val.arrow"
    shutil.copy(tiny_text_zoo / entry["file"], path)
    fortunes.verify_text_set(path, entry["sha256"], "val")
    text_set = read_text_set(path)
    text_set.texts[0] = text_set.texts[0].upper()
    write_text_set(text_set, path)
    with pytest.raises(RaysoupError) as err:
        fortunes.verify_text_set(path, entry["sha256"], "val")
    assert "\n" not in str(err.value) and "text set 'val'" in str(err.value)


@pytest.mark.skipif(
    not (SHIPPED_TEXT_ZOO / "manifest.json").is_file(), reason="no shipped text zoo"
)
def test_shipped_text_zoo_installs(tmp_path):
    """Its sets, made on this machine from the fortunes package, match its sha256, and its
    pretrained model scores on val what the manifest recorded (to a row: CPU float sums
    may differ across machines)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from raysoup.inputs.weights import file_sha256
    from raysoup.testbed.text import correct, encode

    zoo = install_shipped_text_zoo(tmp_path / "zoo")
    manifest = json.loads((zoo / "manifest.json").read_text())
    assert len(manifest["ingredients"]) == 12
    for entry in [manifest["pretrained"], *manifest["ingredients"]]:
        assert file_sha256(zoo / entry["file"] / "model.safetensors") == entry["sha256"]
    val = read_text_set(zoo / manifest["eval_sets"]["val"]["file"])
    tokenizer = AutoTokenizer.from_pretrained(zoo / manifest["model"]["path"])
    model = AutoModelForSequenceClassification.from_pretrained(zoo / "pretrained")
    acc = correct(model, encode(tokenizer, val.texts), val.labels).mean()
    assert abs(acc - manifest["pretrained"]["val_acc"]) <= 1.5 / len(val)
