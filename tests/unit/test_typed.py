"""raysoup.typed: config sections as strict pydantic dataclasses, one error line per bad
value (from a file or built in Python), and the reference rows and example TOML generated
from the fields."""

import dataclasses
import pickle
import tomllib
from typing import Annotated

import pytest
from pydantic import Field

from raysoup.errors import RaysoupError
from raysoup.families.timm import TimmSpec
from raysoup.families.transformers import TransformersSpec
from raysoup.inputs.model import ModelSpec
from raysoup.methods import METHOD_INFO
from raysoup.methods.learned_soup import LearnedSoupConfig
from raysoup.methods.regmean import RegMeanConfig
from raysoup.methods.task_arithmetic import TaskArithmeticConfig
from raysoup.methods.ties_merging import TiesMergingConfig
from raysoup.tools.bench import BenchGrid
from raysoup.tracking import TrackingConfig
from raysoup.typed import (
    COMMENT_COLUMN,
    WIDTH,
    Interval,
    describe,
    example_toml,
    section_config,
    validate,
)

SECTIONS = {
    **{
        name: info.config
        for name, info in METHOD_INFO.items()
        if info.config is not None and name != "manifold_mix"
    },
    "tracking": TrackingConfig,
}


def error(cls, table, section):
    with pytest.raises(RaysoupError) as raised:
        validate(cls, table, "run.toml", f"{section}.")
    return str(raised.value)


def test_unknown_keys_are_one_line_with_the_known_keys():
    line = error(TiesMergingConfig, {"density": 0.3, "budget": 4, "zz": 1}, "ties_merging")
    known = ", ".join(sorted(f.name for f in dataclasses.fields(TiesMergingConfig)))
    assert line == (
        "run.toml: unknown key(s) ties_merging.density, ties_merging.zz; known "
        f"keys of [ties_merging]: {known}"
    )


def test_a_value_out_of_bounds_names_key_type_bounds_and_value():
    assert error(TaskArithmeticConfig, {"budget": 0}, "task_arithmetic") == (
        "run.toml: task_arithmetic.budget = 0: expected int, >= 1 (input should be greater "
        "than or equal to 1)"
    )
    assert error(LearnedSoupConfig, {"lr": 0}, "learned_soup") == (
        "run.toml: learned_soup.lr = 0: expected float, > 0 (input should be greater than 0)"
    )
    assert error(TiesMergingConfig, {"budget": True}, "ties_merging").startswith(
        "run.toml: ties_merging.budget = true: expected int, >= 1"
    )


@pytest.mark.parametrize(
    "cls, table, message",
    [
        (
            TaskArithmeticConfig,
            {"scale_bounds": [1.0, 0.5]},
            "task_arithmetic.scale_bounds = [1.0, 0.5]: must be [lower, upper] with lower < upper",
        ),
        (
            TiesMergingConfig,
            {"scale_bounds": [1.0, 1.0]},
            "ties_merging.scale_bounds = [1.0, 1.0]: must be [lower, upper] with lower < upper",
        ),
        (
            RegMeanConfig,
            {"alpha_bounds": [0.5, 1.5]},
            (
                "regmean.alpha_bounds = [0.5, 1.5]: must be [lower, upper] with 0 <= lower < upper "
                "<= 1"
            ),
        ),
        (
            TiesMergingConfig,
            {"dare_bounds": [-0.1, 0.5]},
            (
                "ties_merging.dare_bounds = [-0.1, 0.5]: must be [lower, upper] with 0 <= lower < "
                "upper <= 0.99"
            ),
        ),
    ],
)
def test_an_interval_out_of_order_or_range_is_one_line(cls, table, message):
    assert error(cls, table, cls.SECTION) == f"run.toml: {message}"
    with pytest.raises(RaysoupError) as raised:
        cls(**{k: tuple(v) for k, v in table.items()})
    assert str(raised.value) == message


def test_an_interval_within_its_range_is_taken():
    assert validate(
        RegMeanConfig, {"alpha_bounds": [0, 1]}, "run.toml", "regmean."
    ).alpha_bounds == (0.0, 1.0)


def test_an_unknown_optimizer_is_refused_with_the_closest_name():
    assert error(TaskArithmeticConfig, {"optimizer": "ngopt"}, "task_arithmetic") == (
        "run.toml: task_arithmetic.optimizer = \"ngopt\": unknown nevergrad optimizer 'ngopt'; "
        "did you mean 'NGOpt'?"
    )
    with pytest.raises(
        RaysoupError,
        match=r"^regmean.optimizer = \"NoSuchOpt\": unknown "
        r"nevergrad optimizer 'NoSuchOpt' \(see nevergrad",
    ):
        RegMeanConfig(optimizer="NoSuchOpt")
    assert TaskArithmeticConfig(optimizer="Cobyla").optimizer == "Cobyla"


@pytest.mark.parametrize(
    "build, message",
    [
        (
            lambda: TiesMergingConfig(budget=0),
            "ties_merging.budget = 0: expected int, >= 1 (input should be greater than or equal to 1)",
        ),
        (
            lambda: TiesMergingConfig(density=0.3),
            "unknown key(s) ties_merging.density; known keys of [ties_merging]: ",
        ),
        (
            lambda: TiesMergingConfig(start=[1.0, 0.2]),
            (
                "ties_merging.start = [1.0, 0.2]: expected tuple[float, float] (input should be a "
                "valid tuple)"
            ),
        ),
        (
            lambda: TiesMergingConfig("NGOpt", "20"),  # positional: the key is still named
            'ties_merging.budget = "20": expected int, >= 1 (input should be a valid integer)',
        ),
        (
            lambda: LearnedSoupConfig(granularity="layer"),
            (
                "learned_soup.granularity = \"layer\": expected 'component' | 'tensor' (input should "
                "be 'component' or 'tensor')"
            ),
        ),
    ],
)
def test_a_bad_config_built_in_python_is_one_raysoup_error_line(build, message):
    with pytest.raises(RaysoupError) as raised:
        build()
    assert type(raised.value) is RaysoupError  # not pydantic's ValidationError
    assert str(raised.value).startswith(message) and "\n" not in str(raised.value)


def test_a_section_stays_a_frozen_dataclass_checked_on_replace_and_pickled_whole():
    config = TiesMergingConfig(budget=4, trim="per_tensor")
    assert dataclasses.asdict(config)["budget"] == 4
    assert [f.default for f in dataclasses.fields(TiesMergingConfig)][:3] == ["NGOpt", 20, 0]
    assert dataclasses.replace(config, seed=3) == TiesMergingConfig(
        budget=4, seed=3, trim="per_tensor"
    )
    with pytest.raises(RaysoupError, match=r"ties_merging.seed = -1: expected int, >= 0"):
        dataclasses.replace(config, seed=-1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.budget = 5
    assert pickle.loads(pickle.dumps(config)) == config


@pytest.mark.parametrize(
    "build, message",
    [
        (
            lambda: ModelSpec(mean=[0.5]),  # a list is not a tuple in Python
            "mean = [0.5]: expected tuple[float, ...], length >= 1 (input should be a valid tuple)",
        ),
        (lambda: TimmSpec("resnet10t", 1), "num_classes = 1: expected int, >= 2"),
        (
            lambda: TransformersSpec("translation", "m", 2),
            "task = \"translation\": expected 'sequence-classification' | ",
        ),
        (lambda: BenchGrid(parallel=(1, 0)), "grid.parallel = [1, 0]: every value must be >= 1"),
        (
            lambda: BenchGrid(optimizers=("Cobylla",)),
            (
                "grid.optimizers = [\"Cobylla\"]: unknown nevergrad optimizer 'Cobylla'; did you mean "
                "'Cobyla'?"
            ),
        ),
    ],
)
def test_a_bad_model_spec_or_bench_grid_built_in_python_is_one_line(build, message):
    with pytest.raises(RaysoupError) as raised:
        build()
    assert str(raised.value).startswith(message) and "\n" not in str(raised.value)


def test_a_required_key_left_out_is_named_as_required():
    assert (
        error(TimmSpec, {"num_classes": 3}, "model")
        == "run.toml: model.arch is required: expected str"
    )
    with pytest.raises(RaysoupError, match=r"^path is required: expected str$"):
        TransformersSpec("sequence-classification", num_classes=2)


def test_model_specs_travel_pickled_and_a_timm_spec_hashes_without_its_kwargs():
    timm = TimmSpec("resnet10t", 3, kwargs={"depth": 2})
    for spec in (
        ModelSpec(width=32, mean=(0.1,), std=(0.2,)),
        timm,
        TransformersSpec("sequence-classification", "/m", 4),
    ):
        assert pickle.loads(pickle.dumps(spec)) == spec
    assert hash(timm) == hash(TimmSpec("resnet10t", 3))


@pytest.mark.parametrize(
    "cls", [ModelSpec, TimmSpec, TransformersSpec, BenchGrid], ids=lambda cls: cls.__name__
)
def test_every_key_of_the_model_specs_and_the_bench_grid_says_what_it_means(cls):
    assert all(description for _, _, _, description in describe(cls))


def test_describe_gives_each_keys_type_with_bounds_default_and_meaning():
    rows = {row[0]: row for row in describe(TiesMergingConfig)}
    assert list(rows) == [f.name for f in dataclasses.fields(TiesMergingConfig)]
    assert rows["budget"] == (
        "budget",
        "int, >= 1",
        "20",
        "validation evaluations of the search",
    )  # its own default
    assert rows["optimizer"][1:3] == ("str, a nevergrad optimizer name", '"NGOpt"')
    assert rows["density_bounds"][1:3] == (
        "tuple[float, float], 0 <= lower < upper <= 1",
        "[0.05, 1.0]",
    )
    assert rows["dare"][1] == "float, >= 0, < 1"
    assert rows["trim"][1:3] == ("'global' | 'per_tensor'", '"global"')


@pytest.mark.parametrize("name", sorted(SECTIONS))
def test_every_key_of_every_section_says_what_it_means(name):
    assert all(description for _, _, _, description in describe(SECTIONS[name]))


def test_the_example_toml_reads_back_into_every_sections_defaults():
    text = example_toml([(name, cls, cls.SUMMARY) for name, cls in SECTIONS.items()])
    raw = tomllib.loads(text)
    assert set(raw) == set(SECTIONS)
    for name, cls in SECTIONS.items():
        assert validate(cls, raw[name], "example", f"{name}.") == cls()
    for line in text.splitlines():  # comments wrapped, continuations under the first
        code, _, comment = line.partition("#")
        assert len(line) <= WIDTH or len(code) > COMMENT_COLUMN
        if comment and not code.strip():
            assert line.index("#") == COMMENT_COLUMN
    assert "[ties_merging]                     # trim, elect sign, disjoint mean" in text
    assert "dare = 0.0                         # DARE drop rate p" in text


def test_a_required_key_is_written_with_its_example_and_the_top_level_has_no_header():
    @section_config
    class Top:
        out: Annotated[str, Field(description="the run directory", examples=["runs/x"])]
        retries: Annotated[int, Field(ge=0, description="tries again")] = 2

    text = example_toml([("", Top, "a run's keys")])
    assert text.splitlines()[0] == "# a run's keys"
    assert tomllib.loads(text) == {"out": "runs/x", "retries": 2}
    assert describe(Top)[0] == ("out", "str", "required", "the run directory")
    with pytest.raises(RaysoupError, match=r"^top.retries = -1: expected int, >= 0"):
        validate(Top, {"out": "x", "retries": -1}, "", "top.")  # no file: no "where: "

    @section_config
    class Bare:
        out: str

    with pytest.raises(TypeError, match="Bare.out has no default and no examples"):
        example_toml([("bare", Bare, "")])


def test_interval_bounds_can_be_open():
    @section_config
    class Ranges:
        SECTION = "ranges"
        anywhere: Interval() = (-5.0, 5.0)
        unit: Interval(0.0, 1.0) = (0.0, 1.0)

    assert Ranges(anywhere=(-1e9, 1e9)).anywhere == (-1e9, 1e9)
    with pytest.raises(RaysoupError, match=r"ranges.unit = \[0.0, 1.5\]: must be"):
        Ranges(unit=(0.0, 1.5))
