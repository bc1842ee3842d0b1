"""Tests that start a real local Ray (fake GPUs) or a whole run on it."""
