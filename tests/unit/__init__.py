"""Tests without Ray: the plain core, configs, inputs and methods in-process."""
