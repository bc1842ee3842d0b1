"""The CLI end to end on the tiny zoo: outputs, determinism, and bad input."""

import json

import pyarrow.parquet as pq
import pytest
import ray
from safetensors.torch import load_file, save_file

from raysoup.cli import main
from raysoup.methods import METHODS
from raysoup.testbed.image import build_zoo
from raysoup.tools.demo import ALL_METHODS, DEMO_METHODS

from ..conftest import TINY_ZOO

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def _ray_stops_after():
    yield
    ray.shutdown()  # the demo starts a local Ray for manifold_mix


def test_demo_quick_writes_report_parquet_and_scatter(tiny_zoo, tmp_path, capsys, monkeypatch):
    """`raysoup demo --quick` as typed, with the quick zoo shrunk to the tests' tiny one
    (the real quick zoo trains for minutes on 2 cores), found where a first demo --quick
    builds and caches it (under RAYSOUP_CACHE)."""
    import shutil

    from raysoup.tools import demo

    monkeypatch.setattr(demo, "QUICK_ZOO", TINY_ZOO)
    monkeypatch.setenv("RAYSOUP_CACHE", str(tmp_path / "cache"))
    cached = demo.default_zoo_dir(TINY_ZOO)
    shutil.copytree(tiny_zoo, cached)
    out = tmp_path / "run"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["quick"] is True and report["config"]["pool"] == str(cached)
    assert tuple(report["methods"]) == ALL_METHODS and set(ALL_METHODS) == set(METHODS)
    assert set(DEMO_METHODS) < set(ALL_METHODS) and "manifold_mix" in DEMO_METHODS
    for row in report["methods"].values():
        assert {"val", "id", "ood", "ood_avg", "ingredients", "evaluations", "wall_s"} <= set(row)
        assert all(0 <= v <= 1 for v in [row["val"], row["id"], *row["ood"].values()])
    assert report["methods"]["uniform_soup"]["ingredients"] == ["ft-00", "ft-01", "ft-02", "ft-03"]
    table = pq.read_table(out / "results.parquet").to_pylist()
    assert {r["name"] for r in table if r["kind"] == "method"} == set(report["methods"])
    assert len([r for r in table if r["kind"] == "ingredient"]) == 4
    assert (out / "scatter.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "beta.png").read_bytes()[:4] == b"\x89PNG"
    mm = report["methods"]["manifold_mix"]
    betas = pq.read_table(out / "beta.parquet").to_pylist()
    assert [b["ingredient"] for b in betas] == mm["ingredients"]
    assert len(mm["history"]) == 3 and all("promise_accuracy" in s for s in mm["history"])
    assert report["config"]["manifold_mix"]["evals_per_component"] == demo.QUICK_EVALS_PER_COMPONENT
    assert report["config"]["search"]["components"] == "granularity-1"
    assert all(
        p["evaluations"] == demo.QUICK_EVALS_PER_COMPONENT * len(mm["components"])
        for s in mm["history"]
        for p in s["passes"]
    )
    # Every method against the best ingredient and greedy soup, paired on the same images.
    assert set(report["methods"]["uniform_soup"]["vs"]) == {"best_individual", "greedy_soup"}
    assert set(report["methods"]["best_individual"]["vs"]) == {"greedy_soup"}
    for c in mm["vs"]["greedy_soup"].values():
        assert c["lo"] <= c["diff"] <= c["hi"] and 0 <= c["p"] <= 1
    hits = {
        (r["name"], r["set"]): r["correct"]
        for r in pq.read_table(out / "correctness.parquet").to_pylist()
    }
    greedy = report["methods"]["greedy_soup"]
    assert sum(hits["greedy_soup", "val"]) / len(hits["greedy_soup", "val"]) == greedy["val"]
    columns = pq.read_schema(out / "results.parquet").names
    assert {"best_individual.ood_avg.lo", "greedy_soup.val.p"} <= set(columns)
    printed = capsys.readouterr().out
    assert "greedy_soup" in printed and "ood_avg" in printed and "McNemar" in printed
    # A second run into the same folder is refused rather than overwriting results.
    assert main(["demo", "--quick", "--out", str(out)]) == 2


def test_zoo_build_is_deterministic(tiny_zoo, tmp_path):
    again = build_zoo(tmp_path / "again", TINY_ZOO)
    first = json.loads((tiny_zoo / "manifest.json").read_text())
    second = json.loads((again / "manifest.json").read_text())
    assert [i["sha256"] for i in first["ingredients"]] == [
        i["sha256"] for i in second["ingredients"]
    ]


def test_corrupt_ingredient_fails_before_any_output(tiny_zoo, tmp_path, capsys):
    zoo = tmp_path / "zoo"
    import shutil

    shutil.copytree(tiny_zoo, zoo)
    path = zoo / "ingredients" / "ft-02.safetensors"
    sd = load_file(str(path))
    sd["classification_head.weight"][0, 0] = float("nan")
    save_file(sd, str(path))
    out = tmp_path / "run"
    # The manifest's sha256 catches it first, naming the file.
    assert main(["demo", "--zoo", str(zoo), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "ft-02.safetensors" in err and "sha256" in err and "--no-verify" in err
    # Skipping that check, the weight check names the file and the key.
    assert main(["demo", "--zoo", str(zoo), "--out", str(out), "--no-verify"]) == 2
    err = capsys.readouterr().err
    assert "ft-02.safetensors" in err and "classification_head.weight" in err
    assert not (out / "report.json").exists() and not (out / "results.parquet").exists()


def test_changed_evaluation_set_is_refused_naming_it(tiny_zoo, tmp_path, capsys):
    import shutil

    from raysoup.inputs.data import read_eval_set, write_eval_set

    zoo = tmp_path / "zoo"
    shutil.copytree(tiny_zoo, zoo)
    blur = read_eval_set(zoo / "data" / "blur.arrow")
    blur.labels = blur.labels.copy()
    blur.labels[0] = (blur.labels[0] + 1) % 10  # one label changed, still a valid class
    write_eval_set(blur, zoo / "data" / "blur.arrow")
    assert main(["demo", "--zoo", str(zoo), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "'blur'" in err and "sha256" in err and err.count("\n") == 1


def test_zoo_build_rejects_too_few_ingredients(tmp_path, capsys):
    assert main(["zoo", "build", "--out", str(tmp_path / "z"), "--ingredients", "1"]) == 2
    assert "at least 2" in capsys.readouterr().err


def test_zoo_build_quick_through_the_cli(tiny_zoo, tmp_path, monkeypatch, capsys):
    """`raysoup zoo build --quick` with the quick zoo shrunk to the tests' tiny config (the
    real quick zoo trains for minutes on 2 cores): the CLI builds the API's zoo file for
    file."""
    from raysoup.inputs.weights import file_sha256
    from raysoup.testbed import image

    monkeypatch.setattr(image, "QUICK_ZOO", TINY_ZOO)
    built = tmp_path / "built"
    assert main(["zoo", "build", "--quick", "--ingredients", "2", "--out", str(built)]) == 0
    assert f"[zoo] ready: {built}/manifest.json" in capsys.readouterr().out
    manifest = json.loads((built / "manifest.json").read_text())
    quick = image.with_overrides(TINY_ZOO, ingredients=2)
    assert manifest["config"] == json.loads(json.dumps(quick.to_dict()))
    assert [i["name"] for i in manifest["ingredients"]] == ["ft-00", "ft-01"]
    for entry in [manifest["pretrained"], *manifest["ingredients"]]:
        assert file_sha256(built / entry["file"]) == entry["sha256"]
    # One seed: the same pretrained model, fine-tunes and evaluation sets as the 4-ingredient
    # tiny zoo built through the API.
    reference = json.loads((tiny_zoo / "manifest.json").read_text())
    assert manifest["pretrained"]["sha256"] == reference["pretrained"]["sha256"]
    assert [i["sha256"] for i in manifest["ingredients"]] == [
        i["sha256"] for i in reference["ingredients"][:2]
    ]
    assert manifest["eval_sets"] == reference["eval_sets"]
    # Another config into a built zoo is refused, before any training.
    assert main(["zoo", "build", "--quick", "--seed", "1", "--out", str(built)]) == 2
    assert "different config" in capsys.readouterr().err


def test_the_shipped_zoo_installs_with_the_same_evaluation_sets_here(tmp_path):
    """The default zoo ships its weights; its evaluation sets are made here from the Debian
    package's Fashion-MNIST and must match the sha256 the shipped manifest records (the
    check that the README's figures hold on this machine), and a changed weight file is
    refused by name."""
    from raysoup.inputs.pool import IngredientPool
    from raysoup.inputs.weights import CheckpointError
    from raysoup.testbed.image import SHIPPED_ZOO, install_shipped_zoo

    zoo = install_shipped_zoo(tmp_path / "zoo")
    shipped = json.loads((SHIPPED_ZOO / "manifest.json").read_text())
    installed = json.loads((zoo / "manifest.json").read_text())
    assert installed == shipped and len(shipped["ingredients"]) >= 12
    pool = IngredientPool.from_zoo(zoo)
    pool.validate()  # every weight file against its recorded sha256
    first = zoo / shipped["ingredients"][0]["file"]
    sd = load_file(str(first))
    sd["classification_head.bias"][0] += 1e-3
    save_file(sd, str(first))
    with pytest.raises(CheckpointError, match=f"{first.name}.*sha256"):
        IngredientPool.from_zoo(zoo).validate()
