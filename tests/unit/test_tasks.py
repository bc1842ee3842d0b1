"""The task pool: manifest evaluation sets with class subsets and class maps."""

import json
import logging

import numpy as np
import pytest

from raysoup.errors import RaysoupError
from raysoup.evaluate import load_eval_sets
from raysoup.inputs.data import DataError, EvalSet, read_eval_set, write_eval_set
from raysoup.inputs.tasks import eval_set_sources

CLASSES = ["cat", "dog", "car", "ship"]


@pytest.fixture
def zoo(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (12, 1, 4, 4), dtype=np.uint8)
    (tmp_path / "data" / "objects").mkdir(parents=True)
    write_eval_set(EvalSet("val", images, np.arange(12) % 4), tmp_path / "data" / "val.arrow")
    # a prepared folder whose own classes are "boat", "kitten", "rock"
    write_eval_set(
        EvalSet("objects", images, np.arange(12) % 3),
        tmp_path / "data" / "objects" / "shard-00000.arrow",
    )
    (tmp_path / "data" / "objects" / "dataset.json").write_text(
        json.dumps(
            {"classes": ["boat", "kitten", "rock"], "shards": ["shard-00000.arrow"], "rows": 12}
        )
    )
    (tmp_path / "animals.txt").write_text("cat\ndog\n")
    return tmp_path


def write_manifest(zoo, eval_sets, **extra):
    (zoo / "manifest.json").write_text(
        json.dumps(
            {
                "model": {"num_classes": 4},
                "classes": CLASSES,
                "ingredients": [],
                "eval_sets": eval_sets,
                **extra,
            }
        )
    )


def test_subset_and_map_resolve_by_name_index_and_file(zoo, caplog):
    write_manifest(
        zoo,
        {
            "val": "data/val.arrow",
            "animals": {"file": "data/val.arrow", "class_subset": "animals.txt"},
            "vehicles": {"file": "data/val.arrow", "class_subset": [2, "ship"]},
            "objects": {"file": "data/objects", "class_map": {"boat": ["ship"], "kitten": [0]}},
        },
    )
    sources = eval_set_sources(zoo)
    assert sources["val"].class_map is None
    assert sources["animals"].class_map == ((0,), (1,), (), ())
    assert sources["vehicles"].class_map == ((), (), (2,), (3,))
    assert sources["objects"].class_map == ((3,), (0,), ())
    with caplog.at_level(logging.INFO, logger="raysoup"):
        sets = {s.name: s for s in load_eval_sets(sources, 4)}
    assert len(sets["animals"]) == 6  # rows of other classes are left out
    assert len(sets["objects"]) == 8 and "4 of 12 images" in caplog.records[-1].getMessage()
    assert len(read_eval_set(sources["val"])) == 12


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"file": "data/val.arrow", "class_subset": ["cow"]}, "'cow' is not in the class list"),
        ({"file": "data/val.arrow", "class_subset": [7]}, "class index 7 out of range"),
        ({"file": "data/objects", "class_map": {"tree": ["cat"]}}, "'tree' is not in the class"),
        ({"file": "data/val.arrow", "class_subset": [0], "class_map": {}}, "not both"),
        ({"file": "data/val.arrow", "classes": [0]}, r"unknown key\(s\) \['classes'\]"),
        ({"file": "../val.arrow"}, "must be a path inside"),
        ({"file": "data/objects", "class_map": [["boat", ["cat"]]]}, "non-empty table"),
        ({"file": "data/objects", "class_map": {"boat": "cat"}}, r"must be a list.*'cat'"),
        ({"file": "data/val.arrow", "class_map": {"boat": [0]}}, "has no class names"),
        ({"class_subset": [0]}, "give a location, or a table with `file`"),
        ({"file": "data/objects"}, "prepared with another class list"),
    ],
)
def test_bad_eval_set_entries_are_named(zoo, entry, message):
    write_manifest(zoo, {"val": "data/val.arrow", "broken": entry})
    with pytest.raises(RaysoupError, match=message) as info:
        eval_set_sources(zoo)
    assert "broken" in str(info.value)


def test_class_count_must_match_the_model(zoo):
    write_manifest(zoo, {"val": "data/val.arrow"}, classes=["a", "b"])
    with pytest.raises(DataError, match="2 classes listed, but model.num_classes is 4"):
        eval_set_sources(zoo)


def test_digit_named_set_classes_map_by_name_and_plain_files_by_index(zoo):
    """Sorted folder names "0", "1", "10": the key "10" is that class, not label 10; on a
    plain Arrow file keys are label indices, and labels past the map are left out."""
    digits = zoo / "data" / "objects" / "dataset.json"
    digits.write_text(json.dumps({"classes": ["0", "1", "10"], "shards": ["shard-00000.arrow"]}))
    write_manifest(
        zoo,
        {
            "val": "data/val.arrow",
            "objects": {"file": "data/objects", "class_map": {"10": ["ship"]}},
            "plain": {"file": "data/val.arrow", "class_map": {"1": ["dog"]}},
        },
    )
    sources = eval_set_sources(zoo)
    assert sources["objects"].class_map == ((), (), (3,))
    assert sources["plain"].class_map == ((), (1,))
    plain = read_eval_set(sources["plain"])  # labels 0..3; 2 and 3 lie past the map
    assert len(plain) == 3 and set(plain.labels) == {1}
