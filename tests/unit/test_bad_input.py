"""Bad input classes, each one clear error line naming the file, key or value, raised before
any cluster work (typed configs: raysoup.typed; zoo and data checks: validate_run)."""

import json
import os
import shutil

import numpy as np
import pytest
import ray

from raysoup.cli import main
from raysoup.config import load_config
from raysoup.errors import RaysoupError
from raysoup.inputs.data import EvalSet, write_eval_set
from raysoup.preflight import validate_run


def write(tmp_path, zoo, top="", sections=""):
    path = tmp_path / "run.toml"
    path.write_text(f'out = "out"\n{top}\n[pool]\nzoo = "{zoo}"\n{sections}\n')
    return path


# (top-level lines, section lines, the message), one distinct input class each.
CONFIG_CASES = [
    (
        "",
        "[manifold_mix]\nphase2 = 'false'",
        r'manifold_mix.phase2 = "false": expected bool \(input should be a valid boolean\)',
    ),
    ("report_ingredients = 'false'", "", r'report_ingredients = "false": expected bool'),
    (
        "",
        "[manifold_mix]\nevals_per_component = 2.5",
        (
            r"manifold_mix.evals_per_component = 2.5: expected int, >= 1 \(input should be a valid "
            r"integer\)"
        ),
    ),
    (
        "",
        "[manifold_mix]\nlater_pass_bounds = [0.3]",
        (
            r"manifold_mix.later_pass_bounds = \[0.3\]: expected tuple\[float, float\], 0 <= lower < "
            r"upper <= 1 \(too few values\)"
        ),
    ),
    (
        "",
        "[manifold_mix]\nlater_pass_bounds = [0.3, 0.6, 0.9]",
        r"manifold_mix.later_pass_bounds = \[0.3, 0.6, 0.9\]: expected tuple\[float, float\]",
    ),
    (
        "",
        "[manifold_mix]\nlater_pass_bounds = ['low', 1.0]",
        r'manifold_mix.later_pass_bounds = \["low", 1.0\]: expected tuple\[float, float\]',
    ),
    (
        "methods = 'greedy_soup'",
        "",
        (
            r'methods = "greedy_soup": expected tuple\[str, \.\.\.\], length >= 1 \(input should '
            r"be a valid array"
        ),
    ),
    ("methods = ['greedy_soup', 3]", "", r"methods = \[\"greedy_soup\", 3\]: expected tuple"),
    (
        "",
        "[manifold_mix]\nbounds_delta = 0",
        r"manifold_mix.bounds_delta = 0: expected float, > 0, <= 1 \(input should be greater than 0\)",
    ),
    ("", "[manifold_mix]\nseed = -1", r"manifold_mix.seed = -1: expected int"),
    ("", "[search]\nnum_workers = 0", r"search.num_workers = 0: expected int"),
    (
        "",
        "[manifold_mix]\nmu_bounds = [1.4, 0.7]",
        r"manifold_mix.mu_bounds = \[1.4, 0.7\]: must be \[lower, upper\] with 0 <= lower < upper",
    ),
    ("", "[manifold_mix]\nthird_pass_gain = -0.1", r"manifold_mix.third_pass_gain = -0.1"),
    (
        "",
        "[manifold_mix]\nphase2_evals_per_weight = 0",
        r"manifold_mix.phase2_evals_per_weight = 0",
    ),
    ("", "[search]\ncomponents = 5", r"search.components = 5: expected str"),
    (
        "",
        "[manifold_mix]\noptimizer = 'Cobyla'\n[search]\nnum_workers = 2",
        (
            r"manifold_mix.optimizer with search.num_workers = 2: optimizer 'Cobyla' is strictly "
            r"sequential"
        ),
    ),
    ("", "[resources]\nevaluators = -1", r"resources.evaluators = -1: expected int"),
    ("", "[resources]\ncpus_per_evaluator = 0", r"resources.cpus_per_evaluator = 0"),
    ("", "[resources]\ngpus_per_evaluator = -2", r"resources.gpus_per_evaluator = -2"),
    ("", "[resources]\neval_timeout_s = 0", r"resources.eval_timeout_s = 0"),
    ("", "[resources]\nmax_failures = -1", r"resources.max_failures = -1"),
    ("", "[resources]\nstart_timeout_s = -5", r"resources.start_timeout_s = -5"),
    ("", "[resources]\nbf16 = 'yes'", r'resources.bf16 = "yes": expected bool'),
    (
        "",
        "[resources]\nevaluation = 'sometimes'",
        r"resources.evaluation = \"sometimes\": expected 'auto' \| 'sharded' \| 'whole'",
    ),
    ("", "[task_arithmetic]\nbudget = 0", r"task_arithmetic.budget = 0: expected int"),
    ("", "[task_arithmetic]\nscale_bounds = [1.0, 0.5]", r"task_arithmetic.scale_bounds"),
    (
        "",
        "[ties_merging]\nstart = [1.0]",
        (
            r"ties_merging.start = \[1.0\]: too few|"
            r"ties_merging.start = \[1.0\]: expected"
        ),
    ),
    ("", "[ties_merging]\ndensity_bounds = [0.0, 1.5]", r"ties_merging.density_bounds"),
    ("", "[learned_soup]\nlr = 0", r"learned_soup.lr = 0: expected float"),
    ("", "[learned_soup]\nepochs = 1.5", r"learned_soup.epochs = 1.5: expected int"),
    ("", "[learned_soup]\nmax_memory_gb = -1", r"learned_soup.max_memory_gb = -1"),
    (
        "",
        "[ties_merging]\ntrim = 'layer'",
        r"ties_merging.trim = \"layer\": expected 'global' \| 'per_tensor'",
    ),
    ("", "[ties_merging]\ntopk = 'ceil'", r"ties_merging.topk = \"ceil\": expected 'round'"),
    ("", "[ties_merging]\nzero_sign = 1", r"ties_merging.zero_sign = 1: expected 'zero'"),
    ("", "[model_stock]\nclip = 'no'", r'model_stock.clip = "no": expected bool'),
    (
        "",
        "[model_stock]\naverage = 'median'",
        r"model_stock.average = \"median\": expected 'cosine' \| 'angle'",
    ),
    (
        "",
        "[learned_soup]\ngranularity = 'layer'",
        r"learned_soup.granularity = \"layer\": expected 'component' \| 'tensor'",
    ),
    ("", "[learned_soup]\nscale = 1", r"learned_soup.scale = 1: expected bool"),
    (
        "",
        "[regmean]\nalpha_bounds = [0.5, 1.5]",
        (
            r"regmean.alpha_bounds = \[0.5, 1.5\]: must be \[lower, upper\] with "
            r"0 <= lower < upper <= 1"
        ),
    ),
    ("", "[adamerging]\ninit = 2", r"adamerging.init = 2: expected float"),
    (
        "",
        "[adamerging]\ngranularity = 'layer'",
        r"adamerging.granularity = \"layer\": expected 'tensor' \| 'component'",
    ),
    ("", "[greedy_soup]\nstrict = 'true'", r'greedy_soup.strict = "true": expected bool'),
    (
        "",
        "[greedy_soup]\nrank_ties = 'random'",
        r"greedy_soup.rank_ties = \"random\": expected 'pool_order' \| 'reverse'",
    ),
    (
        "",
        "[tracking]\ncallbacks = ['json:dumps']",
        (
            r"tracking.callbacks = \[\"json:dumps\"\]: 'json:dumps' is not a ray.tune.Callback "
            r"class"
        ),
    ),
    (
        "",
        "[tracking]\ncallbacks = ['no_such_package:Logger']",
        (
            r"tracking.callbacks = \[\"no_such_package:Logger\"\]: cannot import "
            r"'no_such_package:Logger'"
        ),
    ),
    ("", "[tracking]\ntensorboard = 1", r"tracking.tensorboard = 1: expected bool"),
    ("", "[methdo]\ntau = 0.9", r"unknown key\(s\) or section\(s\) \['methdo'\]"),
    ("", "[manifold_mix]\ntau = 0\n[pool.extra]\nx = 1", r"unknown key\(s\) pool.extra"),
    ("search = 3", "", r"\[search\] must be a table of keys, got 3"),
    (
        "",
        "[method]\ntau = 0.9",
        (
            r"\[method\] is now two sections: \[manifold_mix\] \(the "
            r"method's own keys\) and \[search\] \(components, drop_unused, num_workers"
        ),
    ),
]


@pytest.mark.parametrize("top, sections, message", CONFIG_CASES)
def test_a_bad_config_value_names_file_key_type_and_value(
    tiny_zoo, tmp_path, top, sections, message
):
    path = write(tmp_path, tiny_zoo, top, sections)
    with pytest.raises(RaysoupError, match=message) as error:
        validate_run(load_config(path), resume=False)
    assert str(path) in str(error.value)
    assert not ray.is_initialized()


def test_a_config_without_pool_or_out(tmp_path):
    (tmp_path / "a.toml").write_text('out = "x"\n')
    with pytest.raises(RaysoupError, match=r"needs `out = \"DIR\"` and a \[pool\] section"):
        load_config(tmp_path / "a.toml")
    (tmp_path / "b.toml").write_text('out = 3\n[pool]\nzoo = "z"\n')
    with pytest.raises(RaysoupError, match=r"out = 3: expected str"):
        load_config(tmp_path / "b.toml")


def test_a_config_that_is_not_utf8_or_is_a_folder(tmp_path):
    (tmp_path / "latin.toml").write_bytes('out = "caf\xe9"\n'.encode("latin-1"))
    with pytest.raises(RaysoupError, match=r"latin.toml is not UTF-8 text"):
        load_config(tmp_path / "latin.toml")
    with pytest.raises(RaysoupError, match="cannot read config"):
        load_config(tmp_path)


@pytest.fixture
def zoo(tiny_zoo, tmp_path):
    copy = tmp_path / "zoo"
    shutil.copytree(tiny_zoo, copy)
    return copy


def edit_manifest(zoo, change):
    manifest = json.loads((zoo / "manifest.json").read_text())
    change(manifest)
    (zoo / "manifest.json").write_text(json.dumps(manifest))


def set_key(key, value):
    return lambda m: m.__setitem__(key, value)


def model_key(key, value):
    return lambda m: m["model"].__setitem__(key, value)


def first_ingredient(change):
    return lambda m: change(m["ingredients"][0])


MANIFEST_CASES = [
    (
        first_ingredient(lambda e: e.pop("name")),
        (
            r"ingredients\[0\] = .*needs \"name\" and "
            r"\"file\" strings"
        ),
    ),
    (first_ingredient(lambda e: e.pop("file")), r"ingredients\[0\] = .*needs \"name\""),
    (first_ingredient(lambda e: e.__setitem__("name", 7)), r"ingredients\[0\] = .*strings"),
    (set_key("ingredients", 5), r"ingredients must be a list .* got int"),
    (set_key("ingredients", "nothing/*.safetensors"), r"matches no file"),
    (
        first_ingredient(lambda e: e.__setitem__("file", "../elsewhere.safetensors")),
        r"must be a path inside .*no absolute paths, URIs or '\.\.'",
    ),
    (
        first_ingredient(lambda e: e.__setitem__("file", "ingredients/gone.safetensors")),
        r"gone.safetensors",
    ),
    (model_key("widht", 32), r"unknown key\(s\) model.widht; known keys of model"),
    (model_key("width", "32"), r'model.width = "32": expected int'),
    (
        model_key("num_classes", 1),
        (
            r"model.num_classes = 1: expected int, >= 2 \(input should "
            r"be greater than or equal to 2\)"
        ),
    ),
    (model_key("mean", []), r"model.mean = \[\]: expected tuple\[float, \.\.\.\]"),
    (set_key("model", "vit"), r"model must be a table of keys"),
    (set_key("pretrained", 5), r"manifest.json pretrained = 5: give a file in the zoo"),
    (lambda m: m["eval_sets"].pop("val"), r"has no 'val' evaluation set"),
    (lambda m: m.pop("eval_sets"), r"lacks key\(s\) \['eval_sets'\]"),
]


@pytest.mark.parametrize("change, message", MANIFEST_CASES)
def test_a_bad_manifest_entry_is_refused_naming_it(zoo, tmp_path, change, message):
    edit_manifest(zoo, change)
    with pytest.raises(RaysoupError, match=message):
        validate_run(load_config(write(tmp_path, zoo)), resume=False)
    assert not ray.is_initialized()


@pytest.mark.parametrize(
    "content, message",
    [
        (b"\xff\xfe{}", r"manifest .* is not UTF-8 text"),
        (b"[1, 2]", r"must be a JSON object .* got a list"),
        (b'"a zoo"', r"must be a JSON object .* got a str"),
        (b"{not json", r"cannot read zoo manifest"),
    ],
)
def test_a_manifest_that_is_not_a_json_object(zoo, tmp_path, content, message):
    (zoo / "manifest.json").write_bytes(content)
    with pytest.raises(RaysoupError, match=message):
        validate_run(load_config(write(tmp_path, zoo)), resume=False)


def test_a_symlink_out_of_the_zoo_is_refused_after_resolving_it(zoo, tmp_path):
    outside = tmp_path / "outside.safetensors"
    shutil.copy(zoo / "ingredients" / "ft-00.safetensors", outside)
    link = zoo / "ingredients" / "ft-00.safetensors"
    link.unlink()
    os.symlink(outside, link)
    with pytest.raises(RaysoupError, match=r"a symlink to .*outside.safetensors, outside"):
        validate_run(load_config(write(tmp_path, zoo)), resume=False)


def test_a_symlink_matched_by_a_glob_is_refused_too(zoo, tmp_path):
    os.symlink(tmp_path / "run.toml", zoo / "ingredients" / "zz.safetensors")
    edit_manifest(zoo, set_key("ingredients", "ingredients/*.safetensors"))
    with pytest.raises(RaysoupError, match=r"zz.safetensors.*a symlink to .*run.toml"):
        validate_run(load_config(write(tmp_path, zoo)), resume=False)


def test_a_validation_set_of_one_class_is_refused(zoo, tmp_path):
    write_eval_set(
        EvalSet("val", np.zeros((20, 1, 28, 28), np.uint8), np.full(20, 3)),
        zoo / "data" / "one.arrow",
    )
    edit_manifest(zoo, lambda m: m["eval_sets"].__setitem__("val", {"file": "data/one.arrow"}))
    with pytest.raises(
        RaysoupError,
        match=r"evaluation set 'val': its 20 rows hold 1 "
        r"class\(es\); it needs at least 2",
    ):
        validate_run(load_config(write(tmp_path, zoo)), resume=False)


def test_out_naming_an_existing_file_is_refused(tiny_zoo, tmp_path):
    (tmp_path / "out").write_text("not a folder")
    with pytest.raises(RaysoupError, match=r"out = .*out': cannot write there \(.*out is a file"):
        validate_run(load_config(write(tmp_path, tiny_zoo)), resume=False)


def test_a_cache_under_a_file_is_refused(tiny_zoo, tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    cache = tmp_path / "a-file" / "cache"
    with pytest.raises(
        RaysoupError,
        match=rf"cache = '{cache}': cannot write there "
        rf"\({tmp_path / 'a-file'} is a file",
    ):
        validate_run(load_config(write(tmp_path, tiny_zoo, f'cache = "{cache}"')), resume=False)
    assert not (tmp_path / "out").exists()  # nothing was created


def test_check_prints_the_plan_without_starting_ray(tiny_zoo, tmp_path, capsys):
    path = write(
        tmp_path,
        tiny_zoo,
        "methods = ['greedy_soup', 'ties_merging', 'manifold_mix']",
        "[manifold_mix]\nevals_per_component = 3\n[ties_merging]\nbudget = 7",
    )
    assert main(["check", str(path)]) == 0
    out = capsys.readouterr().out
    assert "components (granularity-1, 3)" in out and "ties_merging: NGOpt, 7 evaluations" in out
    # 3 of 4 candidates after the best: a promise test and up to 3 passes of 3 x 3 each
    assert "at most 84 evaluations after the ranking" in out and "greedy_soup: 3 " in out
    assert "nothing was started" in out and not ray.is_initialized()
    assert not (tmp_path / "out").exists()


def test_check_turns_a_bad_config_into_one_line(tiny_zoo, tmp_path, capsys):
    path = write(tmp_path, tiny_zoo, "", "[manifold_mix]\nphase2 = 'no'")
    assert main(["check", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "manifold_mix.phase2" in err and "Traceback" not in err


def test_an_unreachable_cluster_address_is_one_line_not_a_hang(tiny_zoo, tmp_path, capsys):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = write(tmp_path, tiny_zoo)
    assert main(["run", str(path), "--address", f"127.0.0.1:{port}"]) == 2
    err = capsys.readouterr().err
    assert f"cannot connect to the Ray cluster at '127.0.0.1:{port}'" in err
    assert not ray.is_initialized()
