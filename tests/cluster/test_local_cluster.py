"""cluster/local.py: a 3-node loopback Ray cluster with token auth, a node failure, a clean stop."""

import json
import os
import subprocess
import sys
import time

import pytest

from ..helpers import load_local_cluster

local = load_local_cluster()

NODES_CODE = "import json, ray; ray.init(); print(json.dumps(ray.nodes()))"


def run_client(code: str, env: dict, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | env
    return subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.mark.slow
def test_local_cluster_auth_node_failure_and_stop():
    cluster = local.LocalCluster(
        head=local.NodeSpec(cpus=1),
        workers=[
            local.NodeSpec(cpus=1, gpus=1, resources={"slot_a": 1}),
            local.NodeSpec(cpus=1, gpus=1, resources={"slot_b": 2}),
        ],
        fast_failure_detection=True,
    )
    with cluster:
        assert cluster.address.startswith("127.0.0.1:")

        # A real driver, authenticated by the cluster's token, sees the declared nodes.
        client = run_client(NODES_CODE, cluster.client_env)
        assert client.returncode == 0, client.stderr[-3000:]
        nodes = [n for n in json.loads(client.stdout.splitlines()[-1]) if n["Alive"]]
        assert len(nodes) == 3
        assert {n["NodeManagerAddress"] for n in nodes} == {"127.0.0.1"}
        resources = sorted(
            (
                n["Resources"].get("CPU"),
                n["Resources"].get("GPU", 0),
                n["Resources"].get("slot_a", 0),
                n["Resources"].get("slot_b", 0),
            )
            for n in nodes
        )
        assert resources == [(1, 0, 0, 0), (1, 1, 0, 2), (1, 1, 1, 0)]

        # A wrong token is refused. Ray retries even that for ~20 s: shorten the retries.
        wrong_token = {"RAY_AUTH_TOKEN": "wrong" * 8, "RAY_gcs_server_port_wait_time_s": "2"}
        wrong = run_client(NODES_CODE, {**cluster.client_env, **wrong_token}, timeout=60)
        assert wrong.returncode != 0
        assert "AuthenticationError" in wrong.stderr, wrong.stderr[-3000:]

        # A worker's raylet dies: the GCS marks that node dead within seconds.
        killed_at = time.monotonic()
        cluster.kill_raylet(0)
        table = cluster.wait_for_nodes(2, timeout=30)
        assert time.monotonic() - killed_at < 30
        assert [n["name"] for n in table if not n["alive"]] == ["worker-0"]

        processes = cluster.processes()
        assert len(processes) > 3
    assert not [p.pid for p in processes if p.is_running() and p.status() != "zombie"]
    assert not cluster.root.exists()
