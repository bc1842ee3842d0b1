"""The Python API, `raysoup report`, `raysoup export`, the run's log file and -q/-v, on a
real local Ray run of the tiny zoo."""

import json
import logging
import shutil
from pathlib import Path

import pytest
import ray
import torch
from safetensors.torch import load_file

import raysoup
from raysoup.cli import build_parser, main
from raysoup.console import console_logging
from raysoup.inputs.weights import load_state_dict

from ..helpers import write_config


@pytest.fixture(scope="module")
def finished(soup_zoo, tmp_path_factory):
    """One run of greedy soup and ManifoldMix through the Python API."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    path = write_config(tmp_path_factory.mktemp("api") / "run.toml", soup_zoo, "out")
    path.write_text(
        "methods = ['greedy_soup', 'manifold_mix']\nreport_ingredients = true\n" + path.read_text()
    )
    try:
        report = raysoup.run(path)
    finally:
        ray.shutdown()
    return path.parent / "out", report


@pytest.mark.slow
def test_run_returns_a_typed_report_equal_to_the_one_reloaded(finished):
    out, report = finished
    assert isinstance(report, raysoup.Report) and set(report.methods) == {
        "greedy_soup",
        "manifold_mix",
    }
    mm = report.methods["manifold_mix"]
    assert isinstance(mm, raysoup.MethodRow) and 0 < mm.val <= 1 and "twin" in mm.ingredients
    assert mm.vs["greedy_soup"]["val"]["lo"] <= mm.vs["greedy_soup"]["val"]["diff"]
    again = raysoup.load_report(out)
    assert again.methods == report.methods and again.ranking == report.ranking
    assert report.best("val") in report.methods
    assert report.table().splitlines()[0].split()[:3] == ["method", "val", "id"]


@pytest.mark.slow
def test_the_run_directory_has_a_log_file_from_the_driver_and_the_soup_driver(finished):
    out, _ = finished
    log = (out / "raysoup.log").read_text()
    assert "[run] " in log and "[driver] ranking on val" in log and "[manifold_mix]" in log
    assert " INFO raysoup." in log


@pytest.mark.slow
def test_report_reprints_the_table_and_redraws_every_figure(finished, tmp_path, capsys):
    out, report = finished
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    for figure in ("scatter.png", "beta.png"):
        (copy / figure).unlink()
    assert main(["report", str(copy)]) == 0
    printed = capsys.readouterr().out
    assert report.table() in printed
    assert (copy / "scatter.png").read_bytes()[:4] == b"\x89PNG"
    assert (copy / "beta.png").read_bytes()[:4] == b"\x89PNG"


def run_with_another_ingredient(
    out: Path, soup_zoo: Path, tmp_path: Path, name: str, state_dict: dict
) -> Path:
    """A copy of the zoo with `state_dict` added as ingredient `name` (torch.save), and a
    copy of the finished run `out` that points at it: what `raysoup export --like` reads."""
    zoo = tmp_path / "zoo"
    shutil.copytree(soup_zoo, zoo)
    torch.save(state_dict, zoo / f"{name}.pt")
    manifest = json.loads((zoo / "manifest.json").read_text())
    manifest["ingredients"].append({"name": name, "file": f"{name}.pt"})
    (zoo / "manifest.json").write_text(json.dumps(manifest))
    run = tmp_path / "run"
    shutil.copytree(out, run)
    report = json.loads((run / "report.json").read_text())
    report["zoo"]["dir"] = str(zoo)
    (run / "report.json").write_text(json.dumps(report))
    return run


@pytest.mark.slow
def test_export_writes_the_fused_model_in_an_ingredients_own_format(finished, soup_zoo, tmp_path):
    """An ingredient saved as a model soups user would (torch.save of a DataParallel state
    dict, half precision, its text transformer kept): the export has its keys, prefix,
    dtype and container, and loads back as the fused weights."""
    out, _ = finished
    theirs = {
        f"module.{k}": v.half()
        for k, v in load_state_dict(soup_zoo / "ingredients" / "ft-00.safetensors").items()
    }
    theirs["module.model.transformer.resblocks.0.attn.in_proj_weight"] = torch.ones(3, 3)
    run = run_with_another_ingredient(out, soup_zoo, tmp_path, "theirs", theirs)

    assert main(["export", str(run), "--like", "theirs", "--out", str(tmp_path / "x.pt")]) == 0
    exported = torch.load(tmp_path / "x.pt", weights_only=True)  # as they load theirs
    assert set(exported) == set(theirs)
    fused = load_file(out / "fused.safetensors")
    for key, tensor in exported.items():
        assert tensor.dtype == theirs[key].dtype, key
        ours = key.removeprefix("module.")
        expected = fused[ours].half() if ours in fused else theirs[key]
        assert torch.equal(tensor, expected), key
    assert main(["export", str(run), "--like", "nobody", "--out", str(tmp_path / "y.pt")]) == 2


def test_quiet_and_verbose_are_on_every_command(capsys):
    parser = build_parser()
    for command in (
        ["demo"],
        ["run", "x.toml"],
        ["check", "x.toml"],
        ["report", "d"],
        ["export", "d", "--like", "a", "--out", "b"],
        ["bench"],
        ["prepare", "src", "--out", "o", "--image-size", "28"],
        ["zeroshot", "--arch", "a", "--pretrained", "p", "--classes", "c", "--out", "o"],
        ["zoo", "build", "--out", "o"],
    ):
        assert parser.parse_args([*command, "-q"]).quiet
        assert parser.parse_args([*command, "-v"]).verbose
    console_logging(logging.WARNING)
    log = logging.getLogger("raysoup.test")
    log.info("an info line")
    log.warning("a warning line")
    console_logging(logging.INFO)
    out = capsys.readouterr().out
    assert "a warning line" in out and "an info line" not in out


def read_events(path):
    """(tag, step, value or text) of a TensorBoard event file: TFRecords of Event protos."""
    import struct

    from tensorboardX.proto import event_pb2

    data, records, at = path.read_bytes(), [], 0
    while at < len(data):
        (length,) = struct.unpack("<Q", data[at : at + 8])
        event = event_pb2.Event.FromString(data[at + 12 : at + 12 + length])
        at += 12 + length + 4
        for v in event.summary.value:
            text = v.tensor.string_val[0].decode() if v.tensor.string_val else None
            records.append((v.tag, event.step, v.simple_value if text is None else text))
    return records


@pytest.mark.slow
def test_tracking_writes_tensorboard_and_mlflow_passes_callbacks_through_and_shows_progress(
    soup_zoo, tmp_path, capfd, monkeypatch
):
    """[tracking]: TensorBoard events of every pass's trials (Tune's TBX logger) and of the
    driver's steps, and MLflow runs in a local file store (one per pass under one for the
    run), read back; another Tune callback (the CSV logger) passed through by name;
    progress lines while passes run."""
    from mlflow.tracking import MlflowClient

    path = write_config(tmp_path / "run.toml", soup_zoo, "out")
    path.write_text(
        path.read_text() + "[tracking]\ntensorboard = true\nmlflow = true\n"
        "callbacks = ['ray.tune.logger:CSVLoggerCallback']\n"
        "progress_interval_s = 0.001\n"
    )
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        report = raysoup.run(path)
    finally:
        ray.shutdown()
    out = tmp_path / "out"
    history = report.raw["methods"]["manifold_mix"]["history"]
    driver = read_events(next((out / "tracking").glob("events.out.tfevents.*")))
    promise = {step: v for tag, step, v in driver if tag == "manifold_mix/promise_accuracy"}
    assert promise == {i + 1: pytest.approx(h["promise_accuracy"]) for i, h in enumerate(history)}
    assert (
        "methods/manifold_mix/val",
        0,
        pytest.approx(report.methods["manifold_mix"].val),
    ) in driver
    passes = sum(len(h["passes"]) for h in history)
    trial_events = list((out / "tune").glob("pass-*/*/events.out.tfevents.*"))
    trial_csvs = list((out / "tune").glob("pass-*/*/progress.csv"))
    assert passes > 0 and len(list((out / "tune").glob("pass-*"))) == passes
    told = [a for h in history for p in h["passes"] for a in p["trace"]]
    assert len(trial_events) == len(trial_csvs) == len(told)
    logged = sorted(
        v for f in trial_events for tag, _, v in read_events(f) if tag == "ray/tune/accuracy"
    )
    assert logged == pytest.approx(sorted(told))

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient((out / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("raysoup")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    whole = runs.pop("out")
    assert sorted(runs) == [f"pass-{i:04d}" for i in range(1, passes + 1)]
    assert all(
        r.data.tags["mlflow.parentRunId"] == whole.info.run_id and r.info.status == "FINISHED"
        for r in runs.values()
    )
    assert (
        runs["pass-0001"].data.params["optimizer"]
        == report.raw["config"]["manifold_mix"]["optimizer"]
    )

    def series(run, key):
        return [
            m.value
            for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)
        ]

    assert [a for name in sorted(runs) for a in series(runs[name], "accuracy")] == pytest.approx(
        told
    )
    assert series(whole, "manifold_mix/promise_accuracy") == pytest.approx(
        [h["promise_accuracy"] for h in history]
    )
    assert series(whole, "methods/manifold_mix/val") == pytest.approx(
        [report.methods["manifold_mix"].val]
    )
    printed = capfd.readouterr().out
    assert "evaluations, best" in printed and "evals/s, ETA" in printed


@pytest.mark.slow
def test_export_to_safetensors_and_its_two_refusals(finished, soup_zoo, tmp_path, capsys):
    out, _ = finished
    assert (
        main(["export", str(out), "--like", "ft-00", "--out", str(tmp_path / "x.safetensors")]) == 0
    )
    exported, fused = load_file(tmp_path / "x.safetensors"), load_file(out / "fused.safetensors")
    assert exported.keys() == fused.keys()
    assert all(torch.equal(exported[k], fused[k]) for k in fused)
    # No fused model in the run folder.
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(out / "report.json", bare / "report.json")
    capsys.readouterr()
    assert main(["export", str(bare), "--like", "ft-00", "--out", str(tmp_path / "y")]) == 2
    assert "has no fused.safetensors" in capsys.readouterr().err
    # An ingredient of another architecture: it lacks keys of the fused model.
    other = load_state_dict(soup_zoo / "ingredients" / "ft-00.safetensors")
    other.pop(min(other))
    run = run_with_another_ingredient(out, soup_zoo, tmp_path, "other", other)
    assert main(["export", str(run), "--like", "other", "--out", str(tmp_path / "z.pt")]) == 2
    assert "lacks 1 key(s) of the fused model" in capsys.readouterr().err
    assert not (tmp_path / "y").exists() and not (tmp_path / "z.pt").exists()


def test_load_report_names_a_missing_or_broken_report(tmp_path):
    from raysoup.errors import RaysoupError

    with pytest.raises(RaysoupError, match=f"{tmp_path} holds no finished run"):
        raysoup.load_report(tmp_path)
    (tmp_path / "report.json").write_text("{not json")
    with pytest.raises(RaysoupError, match=r"report.json is not valid JSON"):
        raysoup.load_report(tmp_path)
    assert main(["report", str(tmp_path)]) == 2


@pytest.mark.slow
def test_report_on_a_benchmark_folder_redraws_its_figures_and_summary(tmp_path, capsys):
    from pathlib import Path

    committed = (
        Path(__file__).parents[2] / "benchmarks" / "optimizer_budget" / "results" / "shipped_zoo"
    )
    folder = tmp_path / "bench"
    folder.mkdir()
    for name in ("bench.parquet", "correctness.parquet"):
        shutil.copy(committed / name, folder / name)
    assert main(["report", str(folder)]) == 0
    printed = capsys.readouterr().out
    summary = (folder / "summary.md").read_text()
    assert summary == (committed / "summary.md").read_text() and summary.strip() in printed
    for name in ("accuracy_vs_budget", "best_so_far", "cost_quality", "betas"):
        assert (folder / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
        assert f"[report] wrote {folder / name}.png" in printed


def test_zeroshot_templates_builtin_from_a_file_and_a_bad_file(tmp_path, capsys):
    from raysoup.tools.zeroshot import templates_for

    assert len(templates_for("openai")) == 80 and len(templates_for("simple")) == 7
    # open_clip's prompts are functions of the class name
    assert all("zebra" in t("zebra") for t in [*templates_for("openai"), *templates_for("simple")])
    good = tmp_path / "good.txt"
    good.write_text("a photo of a {}.\na sketch of a {}.\n")
    assert list(templates_for(str(good))) == ["a photo of a {}.", "a sketch of a {}."]
    bad = tmp_path / "bad.txt"
    bad.write_text("a photo of a {}.\na photo\n")
    classes = tmp_path / "classes.txt"
    classes.write_text("cat\ndog\n")
    assert (
        main(
            [
                "zeroshot",
                "--arch",
                "ViT-B-32",
                "--pretrained",
                "none.pt",
                "--classes",
                str(classes),
                "--templates",
                str(bad),
                "--out",
                str(tmp_path / "z"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert f"templates file {bad}: prompt 'a photo' has no '{{}}'" in err


def test_ctrl_c_exits_130_with_one_line(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "zoo"
    # As in a terminal's foreground: a suite started in the background (`.ci/run &`) has
    # SIGINT ignored, a child would inherit that, and its Python would never raise
    # KeyboardInterrupt; a handled signal is reset to the default in the child instead.
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "raysoup.cli", "zoo", "build", "--quick", "--out", str(out)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
    finally:
        signal.signal(signal.SIGINT, before)
    deadline = time.time() + 120
    while not out.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)  # the build has started: main() is running the command
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err.strip().endswith("raysoup: interrupted"), err[-2000:]
    assert "Traceback" not in err


@pytest.mark.slow
def test_wait_for_autoscaler_lets_a_run_wait_for_evaluators_the_cluster_lacks(soup_zoo, tmp_path):
    """On a 2-CPU Ray, 3 one-CPU evaluators: refused up front, or with wait_for_autoscaler
    started and waited for (here no autoscaler adds a node: the start limit ends it)."""
    from raysoup.config import load_config
    from raysoup.errors import RaysoupError
    from raysoup.runner import execute

    from ..helpers import write_config as config_file

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        refused = config_file(
            tmp_path / "a.toml",
            soup_zoo,
            str(tmp_path / "a"),
            {"evaluators": 3, "cpus_per_evaluator": 1},
        )
        with pytest.raises(RaysoupError, match="3 evaluator.*wait_for_autoscaler = true"):
            execute(load_config(refused))
        waits = config_file(
            tmp_path / "b.toml",
            soup_zoo,
            str(tmp_path / "b"),
            {
                "evaluators": 3,
                "cpus_per_evaluator": 1,
                "wait_for_autoscaler": True,
                "start_timeout_s": 10,
            },
        )
        with pytest.raises(
            RaysoupError, match=r"only [0-2] of 3 evaluator actors started within 10 s"
        ):
            execute(load_config(waits))
    finally:
        ray.shutdown()
