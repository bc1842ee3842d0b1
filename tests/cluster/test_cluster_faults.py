"""Faults on a real multi-node Ray cluster (cluster/local.py: loopback, token auth on).

A fault-free run submitted with `ray job submit` is the reference; a run whose driver is
killed and resumed, and a run that loses a worker node mid-search, must end with the
identical fused model and history. The zoo is read through a file:// URI (pyarrow.fs).
Every run has its own fresh RAYSOUP_CACHE (the driver actor uses its client's), so each
measures its points rather than reading back another run's; each fault test checks that
the fault happened and was recovered, from the driver's log and Ray's actor table.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ..helpers import assert_measured, cluster_client_env, load_local_cluster, write_config

local = load_local_cluster()
# Two 1-CPU evaluators on three 1-CPU workers: one CPU left for a restart after a node dies.
RESOURCES = {
    "evaluators": 2,
    "cpus_per_evaluator": 1,
    "max_failures": 5,
    "eval_timeout_s": 60,
    "start_timeout_s": 120,
}
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    # The head has no CPU, so evaluators land on workers; drivers attach to the head.
    # A generous start limit: on a loaded 2-core machine the head (with its dashboard) once
    # took over 60 s to register.
    with local.LocalCluster(
        head=local.NodeSpec(cpus=0),
        workers=[local.NodeSpec(cpus=1)] * 3,
        fast_failure_detection=True,
        dashboard=True,
        start_timeout=180,
    ) as c:
        yield c


# Ray's state API (through the dashboard): every evaluator actor and its restarts.
RESTARTS_SCRIPT = """
import json, sys
from ray.util.state import list_actors
actors = list_actors(address=sys.argv[1], filters=[("class_name", "=", "EvaluatorActor")],
                     detail=True, limit=10000)
print(json.dumps({a.actor_id: a.num_restarts for a in actors}))
"""


def evaluator_restarts(cluster) -> dict[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", RESTARTS_SCRIPT, cluster.dashboard_url],
        env={**cluster_client_env(cluster), **cluster.client_env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_config(tmp_path, soup_zoo, name: str):
    return write_config(tmp_path / f"{name}.toml", f"file://{soup_zoo}", name, RESOURCES)


def start_run(cluster, config, cache: Path, *flags) -> subprocess.Popen:
    """`raysoup run CONFIG --address 127.0.0.1:PORT`, as a user would type it."""
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "raysoup.cli",
            "run",
            str(config),
            "--address",
            cluster.address,
            *flags,
        ],
        env=cluster_client_env(cluster, cache),
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_for(path, proc, timeout=300):
    deadline = time.time() + timeout
    while not path.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert path.exists(), f"{path} never appeared; run output:\n{proc.communicate()[0][-3000:]}"


def outcome(out):
    report = json.loads((out / "report.json").read_text())["methods"]["manifold_mix"]
    return report["ingredients"], report["history"], load_file(out / "fused.safetensors")


def manifold_mix_row(out) -> dict:
    return json.loads((out / "report.json").read_text())["methods"]["manifold_mix"]


def assert_same(a, b):
    assert a[0] == b[0] and a[1] == b[1]
    assert a[2].keys() == b[2].keys() and all(torch.equal(a[2][k], b[2][k]) for k in a[2])


@pytest.fixture(scope="module")
def fault_free(cluster, soup_zoo, tmp_path_factory):
    config = run_config(tmp_path_factory.mktemp("jobs"), soup_zoo, "fault-free")
    entrypoint = [sys.executable, "-m", "raysoup.cli", "run", str(config), "--address", "auto"]
    ray_cli = str(Path(sys.executable).with_name("ray"))  # the venv's, not whatever is on PATH
    cache = config.parent / "cache"
    # The entrypoint runs in the cluster's environment, not the submitter's: its own cache
    # goes in the job's runtime_env (else it would read back the session's earlier runs).
    runtime_env = json.dumps({"env_vars": {"RAYSOUP_CACHE": str(cache)}})
    job = subprocess.run(
        [
            ray_cli,
            "job",
            "submit",
            "--address",
            cluster.dashboard_url,
            "--runtime-env-json",
            runtime_env,
            "--",
            *entrypoint,
        ],
        env={**os.environ, **cluster_client_env(cluster, cache)},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    return job, config.parent / "fault-free"


def test_a_run_submitted_with_ray_job_submit_completes(fault_free):
    job, out = fault_free
    assert job.returncode == 0 and "succeeded" in job.stdout, job.stdout[-3000:] + job.stderr
    ingredients, history, _ = outcome(out)
    assert "twin" in ingredients and history
    assert assert_measured(manifold_mix_row(out)) > 0


def test_killing_the_driver_then_resuming_gives_the_identical_result(
    cluster, soup_zoo, fault_free, tmp_path
):
    config = run_config(tmp_path, soup_zoo, "killed")
    state = tmp_path / "killed" / "driver" / "manifold_mix" / "state.json"
    proc = start_run(cluster, config, tmp_path / "cache-killed")
    wait_for(state, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "report.json").exists()
    done = json.loads(state.read_text())["state"]["next_candidate"] - 1
    resumed = start_run(cluster, config, tmp_path / "cache-resumed", "--resume")
    output = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, output[-3000:]
    assert f"[manifold_mix] resuming after step {done}:" in output
    assert_same(outcome(tmp_path / "killed"), outcome(fault_free[1]))
    # The steps after the checkpoint were measured by the resumed run, not read back.
    assert assert_measured(manifold_mix_row(tmp_path / "killed"), after_step=done) > 0


def evaluator_worker(cluster) -> int:
    """Index of a worker node whose process tree holds an evaluator actor."""
    for i, node in enumerate(cluster.nodes[1:]):
        if any("EvaluatorActor" in " ".join(p.cmdline()) for p in node.processes()):
            return i
    raise AssertionError("no evaluator actor found on any worker")


def test_losing_a_worker_node_mid_search_gives_the_identical_result(
    cluster, soup_zoo, fault_free, tmp_path
):
    config = run_config(tmp_path, soup_zoo, "node-lost")
    restarted_before = {a for a, n in evaluator_restarts(cluster).items() if n}
    proc = start_run(cluster, config, tmp_path / "cache")
    wait_for(tmp_path / "node-lost" / "tune" / "pass-0001", proc)
    cluster.kill_raylet(evaluator_worker(cluster))
    assert proc.poll() is None  # mid-run: the search is still going
    cluster.wait_for_nodes(3, timeout=30)  # the GCS saw the node die
    output = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, output[-3000:]
    print(output)  # retries and progress, for the record (pytest -s)
    assert_same(outcome(tmp_path / "node-lost"), outcome(fault_free[1]))
    # The fault was recovered: Ray restarted the lost evaluator (its calls were retried).
    restarted = {a for a, n in evaluator_restarts(cluster).items() if n} - restarted_before
    assert len(restarted) == 1, (restarted, output[-3000:])
    # Measured as often as the fault-free run: nothing read back from another run.
    row, reference = manifold_mix_row(tmp_path / "node-lost"), manifold_mix_row(fault_free[1])
    assert assert_measured(row) == assert_measured(reference)
