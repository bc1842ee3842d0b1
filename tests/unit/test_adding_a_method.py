"""docs/adding_a_method.md works as written: its module registers a method that a config
selects and configures, `raysoup check` plans, and its own test passes."""

import re
from pathlib import Path

import pytest

from raysoup.config import load_config
from raysoup.errors import RaysoupError
from raysoup.methods import METHOD_INFO, METHODS
from raysoup.preflight import plan, validate_run

DOC = Path(__file__).parents[2] / "docs" / "adding_a_method.md"


@pytest.fixture
def median_soup():
    module, test = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.DOTALL)
    namespace = {"__name__": "raysoup.methods.median_soup"}
    exec(compile(module, "median_soup.py", "exec"), namespace)  # noqa: S102 (the doc's code)
    try:
        yield namespace, test
    finally:  # the registry is global: leave it as the other tests know it
        METHODS.pop("median_soup"), METHOD_INFO.pop("median_soup")


def test_the_documented_method_runs_from_a_config_with_its_own_test(
    median_soup, tiny_zoo, tmp_path
):
    _, test = median_soup
    test_namespace = {"__name__": "tests.unit.test_median_soup", "__package__": "tests.unit"}
    exec(compile(test, "test_median_soup.py", "exec"), test_namespace)  # noqa: S102
    test_namespace["test_median_soup_takes_the_elementwise_median_of_the_best"](tiny_zoo)

    path = tmp_path / "run.toml"
    path.write_text(
        f'out = "out"\nmethods = ["greedy_soup", "median_soup"]\n'
        f'[pool]\nzoo = "{tiny_zoo}"\n[median_soup]\ntop = 2\n'
    )
    config = load_config(path)
    assert config.method_configs()["median_soup"].top == 2
    assert "median_soup: the median of 2 ingredients, no validation search" in plan(
        validate_run(config, resume=False)
    )
    path.write_text(path.read_text().replace("top = 2", "top = 0"))
    with pytest.raises(RaysoupError, match=r"median_soup.top = 0: expected int, >= 1"):
        load_config(path)
