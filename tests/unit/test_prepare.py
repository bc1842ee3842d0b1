"""`raysoup prepare` on real image files: tiny class folders of Fashion-MNIST PNGs."""

import json
import logging

import numpy as np
import pyarrow as pa
import pyarrow.csv
import pyarrow.parquet
import pytest
from PIL import Image

from raysoup.inputs.data import DataError, read_eval_set
from raysoup.testbed.fashion_mnist import load_fashion_mnist
from raysoup.tools.prepare import prepare_dataset

CLASSES = ("dress", "pullover", "trouser")  # sorted: the folder order
FM_LABEL = {"trouser": 1, "pullover": 2, "dress": 3}
PER_CLASS = 8


@pytest.fixture(scope="module")
def fm_images():
    arrays = load_fashion_mnist()
    x, y = arrays["test_images"][:, 0], arrays["test_labels"]
    return {name: x[y == label][:PER_CLASS] for name, label in FM_LABEL.items()}


def image_folder(root, fm_images):
    """src/<class>/<i>.png, 28 px high and 28, 32 or 36 px wide (so centre-cropping
    matters); one image per class in a sub-folder (found recursively)."""
    for name, images in fm_images.items():
        for i, x in enumerate(images):
            path = root / name / ("deep" if i == 0 else "") / f"{i:02d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(x).resize((28 + 4 * (i % 3), 28)).save(path)
    return root


@pytest.fixture
def src(tmp_path, fm_images):
    return image_folder(tmp_path / "src", fm_images)


def expected(path, size):
    """Shortest side to `size` (bicubic), centre crop, RGB: computed with PIL alone."""
    img = Image.open(path)
    w, h = img.size
    scale = size / min(w, h)
    img = img.resize((int(w * scale), int(h * scale)), Image.BICUBIC)
    left, top = round((img.width - size) / 2), round((img.height - size) / 2)
    img = img.crop((left, top, left + size, top + size)).convert("RGB")
    return np.asarray(img).transpose(2, 0, 1)


def ordered_files(src):
    return [
        p
        for name in CLASSES
        for p in sorted((src / name).rglob("*.png"), key=lambda p: p.relative_to(src))
    ]


def test_folder_to_shards(src, tmp_path):
    out = tmp_path / "out"
    info = prepare_dataset(src, out, image_size=32, shard_size=10, workers=2)
    assert info == json.loads((out / "dataset.json").read_text())
    assert info["classes"] == list(CLASSES) and info["image_size"] == [32, 32]
    assert info["rows"] == 24 and info["shards"] == [f"shard-0000{i}.arrow" for i in range(3)]
    assert info["name"] == "out" and info["skipped"] == [] and info["split"] is None
    assert info["preprocess"]["interpolation"] == "bicubic"
    assert not list(out.glob("*.tmp"))

    data = read_eval_set(out, num_classes=3)
    assert data.images.shape == (24, 3, 32, 32) and data.images.dtype == np.uint8
    np.testing.assert_array_equal(data.labels, np.repeat([0, 1, 2], PER_CLASS))
    files = ordered_files(src)
    assert files[0].relative_to(src).as_posix() == "dress/01.png"
    assert files[7].relative_to(src).as_posix() == "dress/deep/00.png"  # sorted by path
    for i in (0, 1, 7, 23):  # widths 32, 36, 28, 32 px
        np.testing.assert_array_equal(data.images[i], expected(files[i], 32))


def test_csv_and_parquet_give_the_folder_result(src, tmp_path):
    prepare_dataset(src, tmp_path / "ref", image_size=32)
    reference = read_eval_set(tmp_path / "ref")
    files = ordered_files(src)
    rows = [p.relative_to(src).as_posix() for p in files[::-1]]  # any row order
    names = [p.relative_to(src).parts[0] for p in files[::-1]]
    pyarrow.csv.write_csv(pa.table({"path": rows, "label": names}), src / "list.csv")
    # Parquet: integer labels into a class list, in a folder of its own (absolute paths)
    (tmp_path / "tables").mkdir()
    table = pa.table(
        {"path": [str(p) for p in files[::-1]], "label": [CLASSES.index(n) for n in names]}
    )
    pyarrow.parquet.write_table(table, tmp_path / "tables/list.parquet")
    # Parquet from pandas: a categorical label column is dictionary-encoded
    pyarrow.parquet.write_table(
        pa.table({"path": rows, "label": pa.array(names).dictionary_encode()}),
        src / "categorical.parquet",
    )

    for i, (table_file, classes) in enumerate(
        [
            (src / "list.csv", None),
            (tmp_path / "tables/list.parquet", CLASSES),
            (src / "categorical.parquet", None),
        ]
    ):
        out = tmp_path / f"out{i}"
        info = prepare_dataset(table_file, out, image_size=32, classes=classes)
        assert info["classes"] == list(CLASSES) and info["rows"] == 24
        data = read_eval_set(out)
        np.testing.assert_array_equal(data.images, reference.images)
        np.testing.assert_array_equal(data.labels, reference.labels)


def test_arch_gives_its_input_resolution(src, tmp_path):
    small = tmp_path / "small"
    (small / "dress").mkdir(parents=True)
    (small / "trouser").mkdir()
    for name in ("dress/01.png", "trouser/05.png"):  # 32 and 36 px wide
        (small / name).write_bytes((src / name).read_bytes())
    info = prepare_dataset(small, tmp_path / "out", arch="ViT-B-32")
    assert info["image_size"] == [224, 224] and info["preprocess"]["mean"][0] == 0.48145466
    data = read_eval_set(tmp_path / "out")
    assert data.images.shape == (2, 3, 224, 224)
    np.testing.assert_array_equal(data.images[1], expected(small / "trouser/05.png", 224))


def test_validation_split(src, tmp_path):
    info = prepare_dataset(
        src, tmp_path / "a", image_size=16, val_fraction=0.3, seed=7, workers=2, shard_size=4
    )
    split = info["split"]
    assert (split["seed"], split["fraction"]) == (7, 0.3)
    # round(0.3 * 8) = 2 per class held out; together the lists cover every image once
    assert sorted(split["val"] + split["train"]) == sorted(
        p.relative_to(src).as_posix() for p in ordered_files(src)
    )
    assert [sum(p.startswith(c) for p in split["val"]) for c in CLASSES] == [2, 2, 2]
    assert info["rows"] == 6
    data = read_eval_set(tmp_path / "a")
    np.testing.assert_array_equal(data.labels, [0, 0, 1, 1, 2, 2])  # only val is written
    np.testing.assert_array_equal(data.images[0], expected(src / split["val"][0], 16))

    again = prepare_dataset(src, tmp_path / "b", image_size=16, val_fraction=0.3, seed=7)
    assert again["split"] == split
    other = prepare_dataset(src, tmp_path / "c", image_size=16, val_fraction=0.3, seed=8)
    assert other["split"]["val"] != split["val"]
    # at least one per class, however small the fraction
    tiny = prepare_dataset(src, tmp_path / "d", image_size=16, val_fraction=0.01)
    assert tiny["rows"] == 3


def test_corrupt_images_are_skipped_or_fatal_when_strict(src, tmp_path, caplog):
    (src / "pullover/zz-garbage.png").write_bytes(b"not a png at all")
    good = (src / "trouser/03.png").read_bytes()
    (src / "trouser/03-truncated.png").write_bytes(good[: len(good) // 2])
    with caplog.at_level(logging.INFO, logger="raysoup"):
        info = prepare_dataset(src, tmp_path / "out", image_size=32, shard_size=10, workers=2)
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert info["rows"] == 24
    assert [s["path"] for s in info["skipped"]] == [
        "pullover/zz-garbage.png",
        "trouser/03-truncated.png",
    ]
    warning = next(line for line in lines if "warning" in line)
    assert "skipped 2" in warning and "pullover/zz-garbage.png" in warning
    assert read_eval_set(tmp_path / "out").images.shape[0] == 24

    with pytest.raises(DataError, match="zz-garbage.png"):
        prepare_dataset(src, tmp_path / "strict", image_size=32, strict=True)
    assert not (tmp_path / "strict/dataset.json").exists()


def test_empty_class_folder_is_named(src, tmp_path):
    (src / "coat").mkdir()
    (src / "coat/readme.txt").write_text("no images here")
    with pytest.raises(DataError, match="class folder .*coat has no images"):
        prepare_dataset(src, tmp_path / "out", image_size=32)
    assert not (tmp_path / "out").exists()  # refused before any work


def test_labels_outside_the_class_list(src, tmp_path):
    classes = tmp_path / "classes.txt"
    classes.write_text("trouser\npullover\n\n")
    with pytest.raises(
        DataError,
        match=r"folder 'dress' .* not in the class list "
        r"\(2 classes from classes.txt\)",
    ):
        prepare_dataset(src, tmp_path / "out", image_size=32, classes=classes)
    (src / "list.csv").write_text("path,label\ntrouser/01.png,trouser\ndress/01.png,foo\n")
    with pytest.raises(
        DataError,
        match=r"label 'foo' \(row 2 of list.csv\) is not in the "
        r"class list \(2 classes from classes.txt\)",
    ):
        prepare_dataset(src / "list.csv", tmp_path / "out", image_size=32, classes=classes)
    (src / "list.csv").write_text("path,label\ntrouser/01.png,0\ndress/01.png,2\n")
    with pytest.raises(DataError, match=r"label 2 \(row 2 of list.csv\) is out of range"):
        prepare_dataset(src / "list.csv", tmp_path / "out", image_size=32, classes=classes)
    (src / "list.csv").write_text("path,label\ntrouser/01.png,0\ndress/missing.png,1\n")
    with pytest.raises(DataError, match=r"dress/missing.png \(row 2\)"):
        prepare_dataset(src / "list.csv", tmp_path / "out", image_size=32, classes=classes)


def test_bad_settings_are_refused(src, tmp_path):
    for kwargs, message in [
        ({}, "exactly one of arch"),
        ({"arch": "ViT-B-32", "image_size": 32}, "exactly one of arch"),
        ({"arch": "ViT-Nope"}, "unknown open_clip architecture 'ViT-Nope'"),
        ({"image_size": 32, "val_fraction": 1.0}, "val_fraction = 1.0"),
        ({"image_size": 32, "shard_size": 0}, "shard_size = 0"),
    ]:
        with pytest.raises(DataError, match=message):
            prepare_dataset(src, tmp_path / "out", **kwargs)
    with pytest.raises(DataError, match="does not exist"):
        prepare_dataset(tmp_path / "nowhere", tmp_path / "out", image_size=32)
    with pytest.raises(DataError, match="inside the image folder"):
        prepare_dataset(src, src / "prepared", image_size=32)


def test_resume_redoes_only_missing_shards(src, tmp_path, caplog):
    out = tmp_path / "out"
    first = prepare_dataset(src, out, image_size=32, shard_size=10, workers=2)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    # an interrupted run: the last shard and dataset.json never written
    (out / "shard-00002.arrow").unlink()
    (out / "shard-00002.json").unlink()
    (out / "dataset.json").unlink()
    mtime = (out / "shard-00000.arrow").stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="raysoup"):
        assert prepare_dataset(src, out, image_size=32, shard_size=10) == first
    assert "resuming: 2 of 3 shards already done" in caplog.text
    assert (out / "shard-00000.arrow").stat().st_mtime_ns == mtime
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    with pytest.raises(DataError, match="differs in preprocess.*pick another --out"):
        prepare_dataset(src, out, image_size=48, shard_size=10)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy/notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not a `raysoup prepare` output"):
        prepare_dataset(src, tmp_path / "busy", image_size=32)


TEXTS = ["a cat sat", "buses run, late", 'red "and" blue', "dogs bark", "trains", "pink"]
NAMES = ["animal", "vehicle", "colour", "animal", "vehicle", "colour"]


def _text_files(root):
    """The same texts and class-name labels as CSV, JSONL and Parquet."""
    table = pa.table({"sentence": TEXTS, "topic": NAMES, "n": list(range(6))})
    pyarrow.csv.write_csv(table, root / "t.csv")
    (root / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in table.to_pylist()))
    pyarrow.parquet.write_table(table, root / "t.parquet")
    return [root / "t.csv", root / "t.jsonl", root / "t.parquet"]


def test_text_files_to_sharded_text_sets(tmp_path):
    from raysoup.evaluate import load_eval_sets
    from raysoup.inputs.data import EvalSetSource, check_eval_set, iter_shard
    from raysoup.tools.prepare_text import prepare_text

    for src in _text_files(tmp_path):
        out = tmp_path / f"out-{src.suffix[1:]}"
        info = prepare_text(src, out, text_column="sentence", label_column="topic", shard_size=4)
        assert info["classes"] == ["animal", "colour", "vehicle"]  # sorted, recorded
        assert info["shards"] == ["shard-00000.arrow", "shard-00001.arrow"]
        s = read_eval_set(out)
        assert list(s.inputs["text"]) == TEXTS
        assert s.labels.tolist() == [info["classes"].index(n) for n in NAMES]
        assert check_eval_set(EvalSetSource(str(out)), 3, "text") == 6
        streamed = list(iter_shard(EvalSetSource(str(out)), 3, 1, 2, 2))  # 2nd of 2 shards
        assert [t for inputs, _ in streamed for t in inputs["text"]] == TEXTS[3:]
        assert load_eval_sets({"val": str(out)}, 3)[0].labels.tolist() == s.labels.tolist()
    prepare_text(
        tmp_path / "t.csv",
        tmp_path / "given",
        text_column="sentence",
        label_column="topic",
        classes=["vehicle", "colour", "animal"],
    )
    assert read_eval_set(tmp_path / "given").labels.tolist() == [2, 0, 1, 2, 0, 1]
    ints = prepare_text(
        tmp_path / "t.parquet", tmp_path / "ints", text_column="sentence", label_column="n"
    )
    assert ints["classes"] is None and read_eval_set(tmp_path / "ints").labels.tolist() == list(
        range(6)
    )


def test_cli_prepares_a_text_set(tmp_path, capsys):
    from raysoup.cli import main

    _text_files(tmp_path)
    main(
        [
            "prepare",
            str(tmp_path / "t.jsonl"),
            "--out",
            str(tmp_path / "out"),
            "--text",
            "--text-column",
            "sentence",
            "--label-column",
            "topic",
        ]
    )
    assert "ready" in capsys.readouterr().out
    assert len(read_eval_set(tmp_path / "out").labels) == 6


@pytest.mark.parametrize(
    "write, kwargs, message",
    [
        (lambda p: p.write_text(""), {}, r"t.csv: empty"),
        (lambda p: p.write_text("text,label\n"), {}, r"t.csv: no rows"),
        (
            lambda p: p.write_text("sentence,label\na,0\n"),
            {},
            r"t.csv: no text column 'text' \(columns: sentence, label\); name it with --text-column",
        ),
        (
            lambda p: p.write_text("text,topic\na,0\n"),
            {},
            r"t.csv: no label column 'label' \(columns: text, topic\)",
        ),
        (
            lambda p: p.write_text("text,label\na,cat\nb,dog\n"),
            {"classes": ["cat"]},
            r"t.csv: column 'label' holds label 'dog', which is not one of the 1 classes",
        ),
        (lambda p: p.write_text("text,label\na,0\nb,-1\n"), {}, r"column 'label' holds label -1"),
        (
            lambda p: p.write_text("text,label\na,0\nb,3\n"),
            {"classes": ["x", "y"]},
            r"column 'label' holds label 3, outside \[0, 2\)",
        ),
        (lambda p: p.write_text("text,label\na,0\n,1\n"), {}, r"column 'text' is empty in row 2"),
        (lambda p: p.write_text("text,label\n1,0\n2,1\n"), {}, r"column 'text' holds int64, not"),
    ],
)
def test_bad_text_input_is_one_line_naming_file_and_column(tmp_path, write, kwargs, message):
    from raysoup.tools.prepare_text import prepare_text

    write(tmp_path / "t.csv")
    with pytest.raises(DataError, match=message) as e:
        prepare_text(tmp_path / "t.csv", tmp_path / "out", **kwargs)
    assert "\n" not in str(e.value) and str(tmp_path / "t.csv") in str(e.value)
