"""Inputs on a shared path or behind a URI (pyarrow.fs), and no path escapes from a zoo."""

import json
import shutil

import numpy as np
import pytest
import torch

from raysoup.config import load_config
from raysoup.errors import RaysoupError
from raysoup.evaluate import load_eval_sets
from raysoup.inputs.pool import IngredientPool
from raysoup.inputs.tasks import eval_set_sources
from raysoup.preflight import validate_run


def test_a_zoo_behind_a_uri_reads_the_same_as_its_path(tiny_zoo):
    by_path = IngredientPool.from_zoo(tiny_zoo)
    by_uri = IngredientPool.from_zoo(f"file://{tiny_zoo}")
    assert all(i.path.startswith("file://") for i in by_uri.ingredients.values())
    for name in by_path.names:
        a, b = by_path.load(name), by_uri.load(name)
        # Same order too: the component order, and so a search's meaning, depends on it.
        assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    files = eval_set_sources(f"file://{tiny_zoo}")
    assert all(f.location.startswith("file://") for f in files.values())
    for a, b in zip(load_eval_sets(eval_set_sources(tiny_zoo), 10), load_eval_sets(files, 10)):
        assert np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels)


def test_config_keeps_a_uri_and_resolves_a_path_against_the_config_file(tmp_path):
    (tmp_path / "sub").mkdir()
    for zoo, expected in [
        ("s3://bucket/zoo", "s3://bucket/zoo"),
        ("../zoo", str(tmp_path / "zoo")),
    ]:
        path = tmp_path / "sub" / "run.toml"
        path.write_text(f'out = "out"\n[pool]\nzoo = "{zoo}"\n')
        assert load_config(path).pool.zoo == expected


@pytest.mark.parametrize(
    "section, bad",
    [
        ("ingredients", "../../outside.safetensors"),
        ("ingredients", "/etc/passwd"),
        ("eval_sets", "../val.arrow"),
    ],
)
def test_manifest_paths_cannot_leave_the_zoo(tiny_zoo, tmp_path, section, bad):
    zoo = tmp_path / "zoo"
    shutil.copytree(tiny_zoo, zoo)
    manifest = json.loads((zoo / "manifest.json").read_text())
    entry = manifest[section][0] if section == "ingredients" else manifest[section]["val"]
    entry["file"] = bad
    (zoo / "manifest.json").write_text(json.dumps(manifest))
    config = tmp_path / "run.toml"
    config.write_text(f'out = "out"\n[pool]\nzoo = "{zoo}"\n')
    with pytest.raises(RaysoupError, match=f"{bad!r}: must be a path inside"):
        validate_run(load_config(config), resume=False)


def test_an_unknown_uri_scheme_is_a_clear_error():
    with pytest.raises(RaysoupError, match="cannot open nosuch://bucket/zoo"):
        IngredientPool.from_zoo("nosuch://bucket/zoo")


def test_atomic_writes_replace_whole_or_not_at_all(tmp_path):
    """A file or a folder appears whole; a block that fails leaves the old one and no
    temporary beside it."""
    from raysoup.inputs.storage import atomic, write_json

    write_json(tmp_path / "a.json", {"v": 1})
    with pytest.raises(RuntimeError), atomic(tmp_path / "a.json") as tmp:
        tmp.write_text('{"v": 2, "half": ')
        raise RuntimeError("the writer failed half-way")
    assert json.loads((tmp_path / "a.json").read_text()) == {"v": 1}
    for round_ in (1, 2):  # the second replaces a whole folder
        with atomic(tmp_path / "folder") as tmp:
            tmp.mkdir()
            (tmp / f"file{round_}").write_text("x")
        assert [p.name for p in (tmp_path / "folder").iterdir()] == [f"file{round_}"]
    with atomic(tmp_path / "figure.png") as tmp:
        assert tmp.suffix == ".png"  # writers that choose a format by suffix still do
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "folder"]
