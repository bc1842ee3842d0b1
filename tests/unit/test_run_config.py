"""`raysoup run` refuses bad input with a clear message, before any cluster work."""

import json
import shutil

import numpy as np
import pytest
import ray
import torch

from raysoup.cli import main
from raysoup.config import load_config
from raysoup.errors import RaysoupError
from raysoup.inputs.data import EvalSet, write_eval_set
from raysoup.inputs.weights import load_state_dict, save_state_dict
from raysoup.preflight import validate_run

DOMAIN = "a numeric domain"  # what the evaluators of the saved run computed in


def config_text(zoo, out="out", method="", resources="", extra=""):
    return (
        f'out = "{out}"\n{extra}\n[pool]\nzoo = "{zoo}"\n[manifold_mix]\n{method}\n'
        f"[resources]\n{resources}\n"
    )


@pytest.mark.parametrize(
    "method, resources, extra, message",
    [
        ("optimizer = 'NGOptt'", "", "", "unknown nevergrad optimizer 'NGOptt'"),
        (
            "evals_per_component = 0",
            "",
            "",
            (
                r"manifold_mix.evals_per_component = 0: expected int, >= 1 \(input should be greater than or "
                r"equal to 1\)"
            ),
        ),
        (
            "tau = 1.5",
            "",
            "",
            r"manifold_mix.tau = 1.5: expected float, > 0, <= 1 \(input should be less than or equal to 1\)",
        ),
        ("later_pass_bounds = [0.3, 1.5]", "", "", "later_pass_bounds"),
        (
            "[search]\ncomponents = 'granularity-9'",
            "",
            "",
            "unknown components preset 'granularity-9'",
        ),
        ("optimiser = 'NGOpt'", "", "", "unknown key.*manifold_mix.optimiser"),
        ("", "evaluation = 'sometimes'", "", "resources.evaluation"),
        ("", "", "seed = 3", r"unknown key\(s\) or section\(s\) \['seed'\]"),
        (
            "",
            "",
            "methods = ['greedy_soup', 'greedier_soup']",
            r"unknown method\(s\) \['greedier_soup'\]",
        ),
        (
            "",
            "",
            "methods = []",
            r"methods = \[\]: expected tuple\[str, \.\.\.\], length >= 1 \(tuple should have at least",
        ),
        ("", "", "[ties_merging]\ndensity = 0.3", r"unknown key.*ties_merging.density"),
        ("", "", "[task_arithmetic]\nscale_bounds = [0.5, 0.5]", "task_arithmetic.scale_bounds"),
    ],
)
def test_bad_config_names_the_key_or_value(tiny_zoo, tmp_path, method, resources, extra, message):
    path = tmp_path / "run.toml"
    path.write_text(config_text(tiny_zoo, method=method, resources=resources, extra=extra))
    with pytest.raises(RaysoupError, match=message):
        validate_run(load_config(path), resume=False)
    assert not ray.is_initialized()


def test_cli_turns_bad_input_into_one_line_and_exit_2(tiny_zoo, tmp_path, capsys):
    path = tmp_path / "run.toml"
    path.write_text(config_text(tiny_zoo, method="tau = 0"))
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("raysoup: error:") and "tau" in err and "Traceback" not in err
    assert not ray.is_initialized()


def test_fewer_than_two_ingredients_is_refused(tiny_zoo, tmp_path):
    zoo = tmp_path / "zoo"
    shutil.copytree(tiny_zoo, zoo)
    manifest = json.loads((zoo / "manifest.json").read_text())
    manifest["ingredients"] = manifest["ingredients"][:1]
    (zoo / "manifest.json").write_text(json.dumps(manifest))
    path = tmp_path / "run.toml"
    path.write_text(config_text(zoo))
    with pytest.raises(RaysoupError, match="at least 2 ingredients"):
        validate_run(load_config(path), resume=False)


def bad_id_set(zoo, manifest):
    """An ID set whose labels the 10-class model cannot have."""
    write_eval_set(
        EvalSet("id", np.zeros((3, 1, 28, 28), np.uint8), np.array([0, 12, 3])),
        zoo / "data" / "bad.arrow",
    )
    manifest["eval_sets"]["id"] = {"file": "data/bad.arrow"}


def headless_pretrained(zoo, manifest):
    state = load_state_dict(zoo / manifest["ingredients"][0]["file"])
    save_state_dict({k: v for k, v in state.items() if "head" not in k}, zoo / "zs.safetensors")
    manifest["pretrained"] = {"file": "zs.safetensors"}


def unmapped_val(zoo, manifest):
    manifest["eval_sets"]["val"] = {
        "file": manifest["eval_sets"]["val"]["file"],
        "class_map": {"0": [], "1": []},
    }


@pytest.mark.parametrize(
    "change, message",
    [
        (unmapped_val, "no row has a label that the class map sends"),
        (bad_id_set, r"bad.arrow: label 12 out of range \[0, 10\)"),
        (headless_pretrained, "manifest.json pretrained: no classification head"),
    ],
)
def test_eval_sets_and_pretrained_are_checked_before_ray(tiny_zoo, tmp_path, change, message):
    """What only the evaluators or the final report would read fails in validate_run()."""
    zoo = tmp_path / "zoo"
    shutil.copytree(tiny_zoo, zoo)
    manifest = json.loads((zoo / "manifest.json").read_text())
    change(zoo, manifest)
    (zoo / "manifest.json").write_text(json.dumps(manifest))
    path = tmp_path / "run.toml"
    path.write_text(config_text(zoo))
    with pytest.raises(RaysoupError, match=message):
        validate_run(load_config(path), resume=False)
    assert not ray.is_initialized()


def test_resume_from_a_run_with_another_config_is_refused(tiny_zoo, tmp_path):
    from raysoup.checkpoint import save_ranking

    path = tmp_path / "run.toml"
    path.write_text(config_text(tiny_zoo, method="tau = 0.99"))
    config = load_config(path)
    save_ranking(config.out / "driver", [("ft-00", 0.5)], config.fingerprint(), DOMAIN)
    with pytest.raises(RaysoupError, match="unfinished run; continue it with --resume"):
        validate_run(config, resume=False)
    validate_run(config, resume=True)  # same config: fine
    path.write_text(config_text(tiny_zoo, method="tau = 0.95"))
    with pytest.raises(RaysoupError, match="different config.*manifold_mix"):
        validate_run(load_config(path), resume=True)


def test_resume_of_a_run_without_manifold_mix_is_refused(tiny_zoo, tmp_path):
    from raysoup.runner import execute

    path = tmp_path / "run.toml"
    path.write_text(config_text(tiny_zoo, extra="methods = ['greedy_soup', 'uniform_soup']"))
    with pytest.raises(
        RaysoupError,
        match=r"--resume continues .*resumable method.*"
        r"\['greedy_soup', 'uniform_soup'\] keep none",
    ):
        execute(load_config(path), resume=True)
    assert not ray.is_initialized()


def test_missing_or_broken_config_file(tmp_path):
    with pytest.raises(RaysoupError, match="cannot read config"):
        load_config(tmp_path / "nope.toml")
    (tmp_path / "bad.toml").write_text("out = [unclosed")
    with pytest.raises(RaysoupError, match="not valid TOML"):
        load_config(tmp_path / "bad.toml")


def test_the_example_config_is_generated_and_every_key_is_at_its_default():
    """examples/run.toml is written from the typed models (scripts/config_reference.py):
    every key there with its meaning, each at its default."""
    import tomllib
    from dataclasses import fields
    from pathlib import Path

    from raysoup.config import RUN_SECTIONS, example_config, method_sections

    path = Path(__file__).parents[2] / "examples" / "run.toml"
    assert path.read_text() == example_config(), "run scripts/config_reference.py"
    raw = tomllib.loads(path.read_text())
    config = load_config(path)
    sections = method_sections()
    assert set(raw) == {
        "out",
        "methods",
        "report_ingredients",
        "cache",
        "metric",
        *RUN_SECTIONS,
        *sections,
    }
    for name, cls, parsed in [
        *((n, c, getattr(config, n)) for n, c in RUN_SECTIONS.items() if n != "pool"),
        *((n, c, config.options[n]) for n, c in sections.items()),
    ]:
        assert set(raw[name]) == {f.name for f in fields(cls)}, name
        assert parsed == cls(), name
    assert config.methods == ("manifold_mix",) and config.report_ingredients is False


def test_a_report_set_of_another_image_size_is_refused_naming_it(tiny_zoo, tmp_path):
    zoo = tmp_path / "zoo"
    shutil.copytree(tiny_zoo, zoo)
    rng = np.random.default_rng(0)
    write_eval_set(
        EvalSet(
            "rgb", rng.integers(0, 255, (20, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, 20)
        ),
        zoo / "data" / "rgb.arrow",
    )
    manifest = json.loads((zoo / "manifest.json").read_text())
    manifest["eval_sets"]["rgb"] = "data/rgb.arrow"
    (zoo / "manifest.json").write_text(json.dumps(manifest))
    path = tmp_path / "run.toml"
    path.write_text(config_text(zoo))
    with pytest.raises(
        RaysoupError,
        match=r"evaluation set 'rgb': images are 3x32x32 .*"
        r"the model takes 1x28x28",
    ):
        validate_run(load_config(path), resume=False)
    assert not ray.is_initialized()


@pytest.mark.parametrize(
    "method",
    [
        "model_stock",
        "task_arithmetic",
        "ties_merging",
        "tsv_merge",
        "iso_c",
        "iso_cts",
        "adamerging",
    ],
)
def test_a_method_that_needs_pretrained_refuses_a_pool_without_it(tiny_zoo, tmp_path, method):
    zoo = tmp_path / "zoo"
    shutil.copytree(tiny_zoo, zoo)
    manifest = json.loads((zoo / "manifest.json").read_text())
    del manifest["pretrained"]
    (zoo / "manifest.json").write_text(json.dumps(manifest))
    path = tmp_path / "run.toml"
    path.write_text(config_text(zoo, extra=f"methods = ['greedy_soup', '{method}']"))
    with pytest.raises(
        RaysoupError,
        match=rf"methods {method} need the pretrained weights, "
        r"but .*manifest.json has no `pretrained` entry",
    ):
        validate_run(load_config(path), resume=False)
    assert not ray.is_initialized()


def test_the_conventions_are_read_from_the_config_and_checked(tiny_zoo, tmp_path, capsys):
    """`raysoup check` accepts every convention option; the run hands them to the methods."""
    path = tmp_path / "run.toml"
    path.write_text(
        config_text(
            tiny_zoo,
            extra="methods = ['greedy_soup', 'model_stock', 'ties_merging', 'learned_soup']",
        )
        + "[greedy_soup]\nstrict = true\nrank_ties = 'reverse'\n"
        "[model_stock]\nclip = false\naverage = 'angle'\n"
        "[ties_merging]\ntrim = 'per_tensor'\ntopk = 'floor_plus_one'\n"
        "zero_sign = 'majority'\n"
        "[learned_soup]\ngranularity = 'tensor'\nscale = true\n"
    )
    assert main(["check", str(path)]) == 0
    assert "nothing was started" in capsys.readouterr().out and not ray.is_initialized()
    configs = load_config(path).method_configs()
    assert (configs["greedy_soup"].strict, configs["greedy_soup"].rank_ties) == (True, "reverse")
    assert (configs["model_stock"].clip, configs["model_stock"].average) == (False, "angle")
    ties = configs["ties_merging"]
    assert (ties.trim, ties.topk, ties.zero_sign) == ("per_tensor", "floor_plus_one", "majority")
    assert (configs["learned_soup"].granularity, configs["learned_soup"].scale) == ("tensor", True)
    path.write_text(path.read_text().replace("'angle'", "'mean'"))
    assert main(["check", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model_stock.average" in err and "Traceback" not in err


@pytest.mark.parametrize("method", ["learned_soup", "adamerging"])
def test_a_learner_too_large_for_its_memory_limit_is_refused_before_ray(tiny_zoo, tmp_path, method):
    path = tmp_path / "run.toml"
    path.write_text(
        config_text(tiny_zoo, extra=f"methods = ['{method}']")
        + f"[{method}]\nmax_memory_gb = 0.000001\n"
    )
    with pytest.raises(RaysoupError, match=f"{method} holds every ingredient"):
        validate_run(load_config(path), resume=False)
    assert not ray.is_initialized()


def test_the_documented_configuration_reference_is_the_typed_models_table():
    """docs/configuration.md's table of every key (type, bounds, default, meaning) is
    generated from the typed config models (scripts/config_reference.py); it must not
    drift from them."""
    from pathlib import Path

    from raysoup.config import reference_table

    doc = (Path(__file__).parents[2] / "docs" / "configuration.md").read_text()
    begin, end = "<!-- config-reference:begin -->\n", "\n<!-- config-reference:end -->"
    assert begin in doc and end in doc
    assert doc.split(begin)[1].split(end)[0] == reference_table()


def test_a_step_checkpoint_writes_the_weights_only_when_they_change(tiny_zoo, tmp_path):
    """A step that keeps the weights' version rewrites only state.json; a new version writes
    the new weights and removes the old; another config's checkpoint is never reused."""
    from raysoup.checkpoint import StepCheckpoint
    from raysoup.inputs.pool import IngredientPool

    pool = IngredientPool.from_zoo(tiny_zoo)
    a, b = pool.load("ft-00"), pool.load("ft-01")
    checkpoint = StepCheckpoint(tmp_path / "mm", {"manifold_mix": {"tau": 0.99}}, DOMAIN)
    checkpoint.save({"step": 1}, a, version=1)
    first = tmp_path / "mm" / "weights-0001.safetensors"
    written = first.stat().st_mtime_ns
    checkpoint.save({"step": 2}, a, version=1)
    assert [p.name for p in (tmp_path / "mm").glob("weights-*")] == [first.name]
    assert first.stat().st_mtime_ns == written
    state, weights = checkpoint.load()
    assert state == {"step": 2} and all(torch.equal(weights[k], a[k]) for k in a)
    checkpoint.save({"step": 3}, b, version=2)
    assert [p.name for p in (tmp_path / "mm").glob("weights-*")] == ["weights-0002.safetensors"]
    assert all(torch.equal(checkpoint.load()[1][k], b[k]) for k in b)
    other = StepCheckpoint(tmp_path / "mm", {"manifold_mix": {"tau": 0.9}}, DOMAIN)
    with pytest.raises(RaysoupError, match=r"different config \(differs in: manifold_mix\)"):
        other.load()
    with pytest.raises(RaysoupError, match="numeric domain 'a numeric domain'"):
        StepCheckpoint(tmp_path / "mm", {"manifold_mix": {"tau": 0.99}}, "another").load()
