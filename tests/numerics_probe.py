"""One evaluation in a process set up as an evaluator actor is (raysoup.numerics), run by
tests/ray/test_numerics.py under other kernel settings: `python numerics_probe.py ZOO
NUMERICS OUT.npz`. Writes the mixed model's val logits and per-image hits."""

import os
import sys

from raysoup.numerics import runtime_env

zoo, numerics, out = sys.argv[1], sys.argv[2], sys.argv[3]
env = (runtime_env(numerics) or {}).get("env_vars", {})
if any(os.environ.get(k) != v for k, v in env.items()):
    # Start again with them set, as Ray starts the actor: importing raysoup has loaded
    # numpy, whose OpenBLAS reads its variables once.
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **env})

import numpy as np
import threadpoolctl
import torch

from raysoup.components import partition
from raysoup.errors import RaysoupError
from raysoup.evaluate import VAL, Evaluator, load_eval_sets
from raysoup.inputs.pool import IngredientPool
from raysoup.inputs.tasks import eval_set_sources
from raysoup.mixing import mix
from raysoup.numerics import enter

try:
    domain = enter(numerics, threads=1)
except RaysoupError as e:
    print(e)
    sys.exit(3)
pool = IngredientPool.from_zoo(zoo)
evaluator = Evaluator(
    pool.spec,
    load_eval_sets({VAL: eval_set_sources(zoo)[VAL]}, pool.spec.num_classes),
    domain=domain,
)
a, c = pool.load(pool.names[0]), pool.load(pool.names[1])
components = partition(list(a), "granularity-1")
evaluator.load(mix(a, c, np.linspace(0.3, 0.7, len(components)), components))
images = evaluator.sets[VAL][0]
with torch.inference_mode():
    logits = evaluator.model(images).numpy()
np.savez(
    out,
    logits=logits,
    hits=evaluator.hits(VAL).numpy(),
    capability=torch.backends.cpu.get_cpu_capability(),
    domain=domain,
    openblas=next(
        i["architecture"]
        for i in threadpoolctl.threadpool_info()
        if i["internal_api"] == "openblas"
    ),
)
