"""A local raysoup Ray listens on loopback only and keeps token authentication on."""

import json
import os
import subprocess
import sys

import pytest

PROBE = """
import json, time, psutil, ray
from raysoup.distributed.driver import connect
connect(None)

@ray.remote
class Worker:
    def ping(self):
        return 1

ray.get(Worker.remote().ping.remote())  # worker processes and agents are listening now
time.sleep(2)
me = psutil.Process()
listening = sorted({c.laddr.ip for p in [me, *me.children(recursive=True)]
                    for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN})
print(json.dumps({"listening": listening, "node": ray.nodes()[0]["NodeManagerAddress"],
                  "token_auth": ray._raylet.get_authentication_mode()
                  == ray._raylet.AuthenticationMode.TOKEN}))
"""


@pytest.mark.slow
def test_local_ray_binds_loopback_only_with_token_auth_on():
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    out = subprocess.run(
        [sys.executable, "-c", PROBE],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    probe = json.loads(out.stdout.strip().splitlines()[-1])
    assert probe["node"] == "127.0.0.1"
    assert probe["listening"] and all(
        ip in ("127.0.0.1", "::ffff:127.0.0.1", "::1") for ip in probe["listening"]
    ), probe
    assert probe["token_auth"]
