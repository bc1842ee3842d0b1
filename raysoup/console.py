"""Where raysoup's log lines go: stdout as they are (when a person is watching), and a run's
log file with times and levels."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

LOG_FILE = "raysoup.log"  # in every run directory


def _replace(handler: logging.Handler, tag: str) -> None:
    """Install `handler` in place of the earlier one with this tag; each handler filters
    by its own level, so the logger passes everything."""
    root = logging.getLogger("raysoup")
    for old in [h for h in root.handlers if getattr(h, "raysoup_tag", None) == tag]:
        root.removeHandler(old)
        old.close()
    handler.raysoup_tag = tag
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)


def console_logging(level: int = logging.INFO) -> None:
    """raysoup's log lines at `level` and above, as they are, on this process's stdout (the
    CLI, the SoupDriver actor); a second call replaces the handler rather than adding one."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.setLevel(level)
    _replace(handler, "console")


def file_logging(run_dir: Path) -> None:
    """Every raysoup log line of this process, DEBUG included, appended to run_dir/raysoup.log
    (the driver process and the SoupDriver actor both write there)."""
    handler = logging.FileHandler(Path(run_dir) / LOG_FILE, mode="a", encoding="utf-8")
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s")
    )
    handler.setLevel(logging.DEBUG)
    _replace(handler, "file")
