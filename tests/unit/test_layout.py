"""The package's rooms: the modules a run imports leave out the testbeds and the tools."""

import subprocess
import sys

RUN_MODULES = (
    "raysoup.cli",
    "raysoup.api",
    "raysoup.runner",
    "raysoup.families",
    "raysoup.methods",
    "raysoup.distributed.driver",
    "raysoup.distributed.workers",
    "raysoup.distributed.evaluators",
    "raysoup.distributed.tune_search",
)
# One line of the loaded raysoup.testbed / raysoup.tools modules after the run's modules,
# then one after importing a testbed module too (so the probe is seen to see them).
PROBE = f"""import sys
def rooms():
    print(' '.join(sorted(m for m in sys.modules
                          if m.startswith(('raysoup.testbed', 'raysoup.tools')))))
for m in {RUN_MODULES!r}:
    __import__(m)
rooms()
import raysoup.testbed.image
rooms()
"""


def test_a_run_imports_neither_the_testbeds_nor_the_tools():
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True)
    after_run, after_testbed = done.stdout.split("\n")[:2]
    assert after_run == ""
    assert "raysoup.testbed.image" in after_testbed.split()
