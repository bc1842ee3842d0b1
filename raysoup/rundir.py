"""A run directory `out`: a local or shared path the run writes in place, or a URI
(s3://, gs://, ... through pyarrow.fs) that the run mirrors from a local staging folder.

On a URI the head works in a fresh temporary folder: a --resume first copies `out` into
it, every step uploads what changed (the step checkpoint's weights before its state.json,
the Tune folders, the log), and the end uploads the rest with report.json last, so a
reader that sees report.json sees a whole run, and a different head can resume from the
last uploaded step.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import pyarrow.fs as pafs

from .errors import RaysoupError
from .inputs import storage

logger = logging.getLogger(__name__)

REPORT = "report.json"  # a finished run's marker, uploaded last
STATE = "state.json"  # a step checkpoint's marker, uploaded after its weights


@dataclass
class RunDir:
    local: Path  # where the run writes
    remote: str | None = None  # the URI `out` names; None: `local` is `out` itself
    # Relative path -> (size, mtime_ns) of each file as last copied to or from `remote`.
    synced: dict = field(default_factory=dict)

    @classmethod
    def open(cls, out: Path | str, resume: bool) -> RunDir:
        if not storage.is_uri(str(out)):
            Path(out).mkdir(parents=True, exist_ok=True)
            return cls(Path(out))
        run = cls(Path(tempfile.mkdtemp(prefix="raysoup-run-")), str(out))
        if resume:
            run._pull()
        return run

    def _files(self, names: tuple[str, ...]) -> dict[str, tuple[int, int]]:
        roots = [self.local / n for n in names] if names else [self.local]
        found = {}
        for root in roots:
            for path in [root] if root.is_file() else sorted(root.rglob("*")):
                if path.is_file():
                    st = path.stat()
                    found[path.relative_to(self.local).as_posix()] = (st.st_size, st.st_mtime_ns)
        return found

    def _copy(self, what: str, paths: list[str], copy) -> None:
        t0, size = time.perf_counter(), 0
        for rel in paths:
            size += copy(rel)
        if paths:
            seconds = time.perf_counter() - t0
            logger.debug(
                f"[out] {what} {len(paths)} file(s), {size / 1e6:.1f} MB in "
                f"{seconds:.1f} s ({size / 1e6 / max(seconds, 1e-9):.1f} MB/s): "
                f"{self.remote}"
            )

    @classmethod
    @contextmanager
    def reading(cls, out: Path | str, *names: str) -> Iterator[RunDir]:
        """A finished run to read (`raysoup report`, `raysoup export`): `out` itself when
        local; for a URI, its files under `names` (all when none) downloaded into a staging
        folder that is removed afterwards. sync() uploads what the reader wrote there."""
        if not storage.is_uri(str(out)):
            yield cls(Path(out))
            return
        run = cls(Path(tempfile.mkdtemp(prefix="raysoup-read-")), str(out))
        try:
            run._pull(names)
            yield run
        finally:
            shutil.rmtree(run.local, ignore_errors=True)

    def _pull(self, names: tuple[str, ...] = ()) -> None:
        fs, base = storage.filesystem(self.remote)
        try:
            infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
        except OSError as e:
            raise RaysoupError(f"out = {self.remote!r}: cannot list it ({e})") from None
        files = sorted(
            rel
            for rel in (
                str(PurePosixPath(i.path).relative_to(base))
                for i in infos
                if i.type == pafs.FileType.File
            )
            if not names or any(rel == n or rel.startswith(f"{n}/") for n in names)
        )

        def download(rel: str) -> int:
            target = self.local / rel
            storage.copy_file(storage.join(self.remote, rel), str(target))
            st = target.stat()
            self.synced[rel] = (st.st_size, st.st_mtime_ns)
            return st.st_size

        try:
            self._copy("downloaded", files, download)
        except OSError as e:
            raise RaysoupError(f"out = {self.remote!r}: download failed ({e})") from None

    def sync(self, *names: str) -> None:
        """Upload what changed under `names` (files or folders in the run; all when none),
        every marker file after the rest; then, under `names` only, delete what was
        uploaded before and is gone here (a step checkpoint's replaced weights). Nothing to
        do for a local `out`."""
        if self.remote is None:
            return
        fs, base = storage.filesystem(self.remote)
        files = self._files(names)
        changed = sorted(
            (rel for rel, stamp in files.items() if self.synced.get(rel) != stamp),
            key=lambda rel: (PurePosixPath(rel).name in (STATE, REPORT), rel),
        )

        def upload(rel: str) -> int:
            storage.copy_file(str(self.local / rel), storage.join(self.remote, rel))
            self.synced[rel] = files[rel]
            return files[rel][0]

        try:
            self._copy("uploaded", changed, upload)
            within = [self.local / n for n in names]
            for rel in [r for r in self.synced if r not in files]:
                if any((self.local / rel).is_relative_to(w) for w in within):
                    fs.delete_file(f"{base}/{rel}")
                    del self.synced[rel]
        except OSError as e:
            raise RaysoupError(f"out = {self.remote!r}: upload failed ({e})") from None

    def finish(self) -> str:
        """Upload the whole run, report.json last, and drop the staging folder. Returns
        where the run is."""
        if self.remote is None:
            return str(self.local)
        self.sync()
        shutil.rmtree(self.local, ignore_errors=True)
        return self.remote
