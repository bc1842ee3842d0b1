"""Tools around a run that `raysoup run` never imports: the Fashion-MNIST testbed (zoo),
data preparation, zero-shot heads, the demo, the benchmark and its plots."""
