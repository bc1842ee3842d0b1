"""The shipped testbeds: miniatures of the model soups setting, built on CPU from data
that Debian packages (Fashion-MNIST images in `image`, fortune-cookie topics in `text`),
each with a default zoo shipped beside it (`image_zoo/`, `text_zoo/`: weights and
manifest; the evaluation sets are made at install and checked by sha256).

`raysoup demo`, `raysoup zoo build` and the tests use them; `raysoup run` never imports
this package: a run reads any zoo through its manifest.
"""
