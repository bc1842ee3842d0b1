"""raysoup: ManifoldMixMS model soups, computed on a Ray cluster.

The Python API: ``raysoup.run(config)`` and ``raysoup.load_report(run_dir)`` return a
typed ``Report`` (see raysoup.api); everything heavy is imported on first use.
"""

from .api import MethodRow, Report, load_report, run

__version__ = "0.1.0"
__all__ = ["MethodRow", "Report", "load_report", "run"]
