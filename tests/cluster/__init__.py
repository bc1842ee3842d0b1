"""Tests on a real multi-node Ray cluster on loopback (cluster/local.py) or object storage."""
