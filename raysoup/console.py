"""Where raysoup's log lines go when a person is watching: stdout, as they are."""

from __future__ import annotations

import logging
import sys


def console_logging(level: int = logging.INFO) -> None:
    """raysoup's log lines, as they are, on this process's stdout (the CLI, the SoupDriver
    actor); a second call replaces the handler rather than adding one."""
    root = logging.getLogger("raysoup")
    for handler in [h for h in root.handlers if getattr(h, "raysoup_console", False)]:
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.raysoup_console = True
    root.addHandler(handler)
    root.setLevel(level)
