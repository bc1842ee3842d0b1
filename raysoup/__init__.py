"""raysoup: ManifoldMixMS model soups, computed on a Ray cluster."""

__version__ = "0.1.0"
