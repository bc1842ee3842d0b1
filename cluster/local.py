"""A local multi-node Ray cluster on 127.0.0.1, for development and fault-injection tests.

Each node is its own `ray start --block` process with its own ports, --temp-dir and
declared CPUs / fake GPUs / custom resources; token authentication is on. Stopping kills
the process trees of these `ray start` processes only, never `ray stop` (which would
kill every Ray on the machine, other tests' clusters included).

CLI, in the foreground until Ctrl-C / SIGTERM (prints the env a client must export):
    python cluster/local.py start --workers 2 --worker-cpus 2 --worker-gpus 1 [--head-cpus 1]

Python:
    with LocalCluster(head=NodeSpec(cpus=1), workers=[NodeSpec(cpus=1, gpus=1)] * 2,
                      fast_failure_detection=True) as cluster:
        subprocess.run(cmd, env={**os.environ, **cluster.client_env})
        cluster.kill_raylet(0)  # worker 0 fails
        cluster.wait_for_nodes(2, timeout=30)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import psutil

HOST = "127.0.0.1"
WORKER_PORTS_PER_NODE = 100
# The GCS declares a silent raylet dead after about period * threshold (default 3 s * 5).
FAST_FAILURE_DETECTION_ENV = {
    "RAY_health_check_initial_delay_ms": "1000",
    "RAY_health_check_period_ms": "500",
    "RAY_health_check_timeout_ms": "500",
    "RAY_health_check_failure_threshold": "3",
}
# A node on 127.0.0.1 binds its gRPC ports to loopback only, but Ray swaps 127.0.0.1 for the
# host's reachable IP (services.resolve_ip_for_localhost) in `ray start --node-ip-address` and
# in a client's RAY_ADDRESS. Single-host mode (this env var) keeps 127.0.0.1 in clients and in
# the nodes' children, but `ray start --address` refuses to join in that mode: so `ray start`
# runs with the swap turned off, as Ray's own ray.cluster_utils nodes are.
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
RAY_CLI = """
import ray._private.ray_constants as constants, ray._private.services as services
assert hasattr(services, "resolve_ip_for_localhost"), "ray changed: see cluster/local.py"
services.resolve_ip_for_localhost = lambda host: host
constants.ENABLE_RAY_CLUSTER = True
from ray.scripts.scripts import main
main()
"""
# Asks the GCS directly: no driver, and no ray.init in the caller's process.
NODES_SCRIPT = """
import json, sys
from ray._raylet import GcsClient
nodes = GcsClient(address=sys.argv[1]).get_all_node_info(timeout=10).values()
print(json.dumps([dict(name=n.node_name, alive=n.state == 0, ip=n.node_manager_address,
                       port=n.node_manager_port, resources=dict(n.resources_total))
                  for n in nodes]))
"""


@dataclass(frozen=True)
class NodeSpec:
    cpus: int = 1
    gpus: int = 0  # fake GPUs: a schedulable count, nothing behind it
    resources: dict = field(default_factory=dict)


@dataclass
class Node:
    name: str
    process: subprocess.Popen  # its `ray start --block`
    port: int  # node manager port: tells this node apart in the GCS node table
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def processes(self) -> list[psutil.Process]:
        """Its live `ray start` process and all their descendants (raylet, workers, ...)."""
        try:
            root = psutil.Process(self.pid)
            return [root, *root.children(recursive=True)]
        except psutil.Error:
            return []

    def raylet_pid(self) -> int | None:
        return next((p.pid for p in self.processes() if p.name() == "raylet"), None)

    def log_tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:  # all bound at once, so no port comes twice
        s.bind(("", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def free_port_block(size: int) -> int:
    """The first of `size` consecutive free ports, below the kernel's ephemeral range."""
    for _ in range(50):
        start = random.randrange(20000, 32000 - size)
        try:
            for port in range(start, start + size):
                with socket.socket() as s:
                    s.bind(("", port))
            return start
        except OSError:
            continue
    raise RuntimeError(f"no {size} consecutive free ports")


class LocalCluster:
    def __init__(
        self,
        head: NodeSpec = NodeSpec(),
        workers: list[NodeSpec] = (),
        temp_dir: str | None = None,
        env: dict | None = None,
        object_store_memory: int = 512 * 2**20,
        fast_failure_detection: bool = False,
        dashboard: bool = False,
        token: str | None = None,
        start_timeout: float = 60,
    ):
        self.head, self.workers, self.token = head, list(workers), token
        self.object_store_memory, self.dashboard = object_store_memory, dashboard
        self.env = {**(FAST_FAILURE_DETECTION_ENV if fast_failure_detection else {}), **(env or {})}
        self.temp_dir, self.start_timeout, self.starting = temp_dir, start_timeout, True
        self.root: Path | None = None  # temp_dir, or a fresh one
        self.nodes: list[Node] = []  # nodes[0] is the head, nodes[1 + i] is worker i
        self.address: str | None = None  # GCS, 127.0.0.1:PORT
        self.dashboard_url: str | None = None  # for `ray job submit`; needs ray[default]

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def client_env(self) -> dict:
        """What a client process (driver, `ray status`, `ray job submit`) needs in its env."""
        env = {
            **LOOPBACK_ENV,
            "RAY_ADDRESS": self.address,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(self.root / "auth_token"),
        }
        return env | ({"RAY_API_SERVER_ADDRESS": self.dashboard_url} if self.dashboard else {})

    def start(self) -> LocalCluster:
        if self.dashboard:
            from ray._private.utils import get_dashboard_dependency_error

            if error := get_dashboard_dependency_error():
                raise RuntimeError(f"the dashboard needs ray[default]: {error}")
        # Short, so that Ray's unix socket paths stay under 107 bytes.
        self.root = Path(self.temp_dir or tempfile.mkdtemp(prefix="rs-", dir="/tmp"))
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            # Its own token (not ~/.ray/auth_token, which may guard real clusters), created
            # owner-only from the start.
            (self.root / "auth_token").unlink(missing_ok=True)
            fd = os.open(self.root / "auth_token", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(self.token or secrets.token_hex(32))
            gcs_port, dashboard_port = free_ports(2)
            self.address = f"{HOST}:{gcs_port}"
            if self.dashboard:
                self.dashboard_url = f"http://{HOST}:{dashboard_port}"
            # The head runs a headless dashboard process even without the UI: its own port too.
            head_args = [
                "--head",
                f"--port={gcs_port}",
                f"--include-dashboard={self.dashboard}",
                f"--dashboard-host={HOST}",
                f"--dashboard-port={dashboard_port}",
            ]
            # Raylets on one host must not hand out the same worker ports: a block each.
            worker_ports = free_port_block(WORKER_PORTS_PER_NODE * (1 + len(self.workers)))
            self._start_node("head", self.head, head_args, worker_ports)
            self.wait_for_nodes(1, self.start_timeout)  # workers join a running GCS
            for i, spec in enumerate(self.workers, start=1):
                self._start_node(
                    f"worker-{i - 1}",
                    spec,
                    [f"--address={self.address}"],
                    worker_ports + i * WORKER_PORTS_PER_NODE,
                )
            self.wait_for_nodes(len(self.nodes), self.start_timeout)
        except BaseException:
            self.stop()
            raise
        finally:
            self.starting = False
        return self

    def _start_node(self, name: str, spec: NodeSpec, args: list[str], worker_port: int):
        node_dir = self.root / name
        node_dir.mkdir()
        ports = free_ports(6)
        cmd = [
            sys.executable,
            "-c",
            RAY_CLI,
            "start",
            "--block",
            *args,
            f"--node-name={name}",
            f"--node-ip-address={HOST}",
            f"--temp-dir={node_dir}",
            f"--num-cpus={spec.cpus}",
            f"--num-gpus={spec.gpus}",
            f"--resources={json.dumps(spec.resources)}",
            f"--object-store-memory={self.object_store_memory}",
            f"--node-manager-port={ports[0]}",
            f"--object-manager-port={ports[1]}",
            f"--metrics-export-port={ports[2]}",
            f"--dashboard-agent-listen-port={ports[3]}",
            f"--dashboard-agent-grpc-port={ports[4]}",
            f"--runtime-env-agent-port={ports[5]}",
            f"--min-worker-port={worker_port}",
            f"--max-worker-port={worker_port + WORKER_PORTS_PER_NODE - 1}",
            "--disable-usage-stats",
            "--log-style=record",
        ]
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_TOKEN", "RAY_ADDRESS")}
        env |= {
            **self.env,
            **LOOPBACK_ENV,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(self.root / "auth_token"),
        }
        log_path = node_dir / "ray_start.log"
        with open(log_path, "wb") as log:  # own session: the CLI's Ctrl-C reaches us only
            process = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        self.nodes.append(Node(name, process, ports[0], log_path))

    def node_table(self) -> list[dict]:
        """One dict per node the GCS knows, dead ones too: name, alive, ip, port, resources."""
        env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_TOKEN"} | self.client_env
        out = subprocess.run(
            [sys.executable, "-c", NODES_SCRIPT, self.address],
            capture_output=True,
            text=True,
            env=env,
            timeout=30,
            check=False,
        )
        if out.returncode:
            raise RuntimeError(f"GCS query failed: {out.stderr[-2000:]}")
        return json.loads(out.stdout)

    def wait_for_nodes(self, count: int, timeout: float = 30) -> list[dict]:
        """Poll the GCS until exactly `count` nodes are alive; returns the node table."""
        deadline = time.monotonic() + timeout
        while True:
            for node in self.nodes:  # while starting, a node that exited will never register
                if self.starting and node.process.poll() is not None:
                    raise RuntimeError(f"{node.name} exited:\n{node.log_tail()}")
            try:
                table = self.node_table()
            except (RuntimeError, subprocess.TimeoutExpired):
                table = []  # the GCS is not up yet
            alive = {n["port"] for n in table if n["alive"]}
            if len(alive) == count:
                return table
            if time.monotonic() > deadline:
                tails = [
                    f"--- {n.name} ---\n{n.log_tail()}" for n in self.nodes if n.port not in alive
                ]
                raise TimeoutError(
                    f"{len(alive)}/{count} nodes alive after {timeout} s\n" + "\n".join(tails)
                )
            time.sleep(0.5)

    def kill_raylet(self, worker: int) -> int:
        """SIGKILL worker `worker`'s raylet, as a node failure; returns the raylet's pid."""
        pid = self.nodes[1 + worker].raylet_pid()
        if pid is None:
            raise RuntimeError(f"worker-{worker} has no raylet")
        os.kill(pid, signal.SIGKILL)
        return pid

    def processes(self) -> list[psutil.Process]:
        """The live `ray start` processes and all their descendants."""
        return [p for node in self.nodes for p in node.processes()]

    def stop(self, grace: float = 10) -> None:
        processes = self.processes()  # first: a `ray start` that exits orphans its children
        for node in self.nodes:  # on SIGTERM, `ray start` drains its node and stops it
            if node.process.poll() is None:
                node.process.terminate()
        _, alive = psutil.wait_procs(processes, timeout=grace)
        for process in alive:
            process.kill()
        psutil.wait_procs(alive, timeout=5)
        for node in self.nodes:
            node.process.wait()
        if self.root and not self.temp_dir:
            shutil.rmtree(self.root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["start"])
    for flag, default in [
        ("workers", 2),
        ("worker-cpus", 1),
        ("worker-gpus", 0),
        ("head-cpus", 1),
        ("object-store-mb", 512),
    ]:
        parser.add_argument(f"--{flag}", type=int, default=default)
    parser.add_argument("--dashboard", action="store_true", help="needs ray[default]")
    parser.add_argument("--fast-failure-detection", action="store_true")
    args = parser.parse_args()
    # Both end the sleep below, and the finally stops the nodes. SIGINT is set explicitly:
    # a background job inherits it ignored.
    for stop_signal in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop_signal, signal.default_int_handler)
    cluster = LocalCluster(
        NodeSpec(args.head_cpus),
        [NodeSpec(args.worker_cpus, args.worker_gpus)] * args.workers,
        object_store_memory=args.object_store_mb * 2**20,
        fast_failure_detection=args.fast_failure_detection,
        dashboard=args.dashboard,
    )
    try:
        cluster.start()
        print(f"address: {cluster.address}\ndashboard: {cluster.dashboard_url or 'off'}")
        print("".join(f"export {k}={v}\n" for k, v in cluster.client_env.items()), flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()


if __name__ == "__main__":
    main()
