"""Where a run's inputs, outputs and caches live: a local or shared path, or a cloud URI,
read and written via pyarrow.fs.

Every node of a cluster reads the zoo (manifest, ingredient checkpoints, evaluation sets)
itself, so it must sit on a filesystem all nodes mount at the same path, or behind a URI
that pyarrow.fs understands (s3://, gs://, hdfs://, file://). No node needs a local copy.
Credentials and endpoints come from the environment pyarrow reads (for S3: AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION); none is ever written down.
"""

from __future__ import annotations

import fnmatch
import io
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

import pyarrow.fs as pafs

from ..errors import RaysoupError

logger = logging.getLogger(__name__)

CHUNK_BYTES = 8 << 20  # one read or write of a transfer
PROGRESS_EVERY_S = 5.0  # a transfer that runs longer logs its bytes done and rate this often


@contextmanager
def atomic(path: Path | str) -> Iterator[Path]:
    """Write then rename: yields a temporary name beside `path` (with its suffix, which some
    writers go by) for the block to write a file or a folder at; when the block ends
    without an error, that replaces `path`, so readers never see a half-written one. A
    block that writes nothing leaves `path` as it was; one that fails leaves no temporary."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        yield tmp
        if tmp.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        if tmp.exists():
            tmp.replace(path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def write_json(path: Path | str, obj, indent: int = 2) -> None:
    """JSON written atomically."""
    with atomic(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=indent))


def is_uri(location: str) -> bool:
    return "://" in str(location)


def resolve(location: str | Path, base: Path | None = None) -> str:
    """A URI stays as it is; a path becomes absolute (relative to `base` when given)."""
    if is_uri(str(location)):
        return str(location)
    path = Path(location).expanduser()
    return str(((base or Path.cwd()) / path).resolve())


def within(root: str, relative: str, what: str) -> str:
    """`root`/`relative`, refusing a `relative` that is absolute or climbs out of `root`,
    by its text or, on a local filesystem, through a symlink (resolved before the check)."""
    rel = PurePosixPath(str(relative))
    if rel.is_absolute() or is_uri(str(relative)) or ".." in rel.parts or not rel.parts:
        raise RaysoupError(
            f"{what} = {relative!r}: must be a path inside {root} (no absolute paths, URIs or '..')"
        )
    path = f"{root.rstrip('/')}/{rel}"
    if not is_uri(root) and not any(c in str(rel) for c in "*?["):  # a glob's matches are
        real_root = os.path.realpath(root)  # checked one by one
        if os.path.commonpath([real_root, os.path.realpath(path)]) != real_root:
            raise RaysoupError(
                f"{what} = {relative!r}: a symlink to "
                f"{os.path.realpath(path)}, outside {root}; copy the file into "
                f"the zoo instead"
            )
    return path


def join(location: str, name: str) -> str:
    return f"{str(location).rstrip('/')}/{name}"


def filesystem(location: str) -> tuple[pafs.FileSystem, str]:
    try:
        if is_uri(location):
            return pafs.FileSystem.from_uri(location)
        return pafs.LocalFileSystem(), str(Path(location).resolve())
    except Exception as e:  # pyarrow raises several types for unknown schemes and credentials
        raise RaysoupError(f"cannot open {location}: {e}") from e


def check_writable(location: str, what: str) -> None:
    """Refuse, in one line, a location this process cannot write: for a URI (no such bucket,
    no endpoint, wrong credentials) a probe object is written and deleted; for a path, its
    nearest existing folder must be a writable folder (nothing is created)."""
    if not is_uri(location):
        existing = Path(location).expanduser().absolute()
        while not existing.exists():
            existing = existing.parent
        why = (
            f"{existing} is a file, not a folder"
            if not existing.is_dir()
            else f"{existing} is not writable"
            if not os.access(existing, os.W_OK | os.X_OK)
            else None
        )
        if why:
            raise RaysoupError(f"{what} = {location!r}: cannot write there ({why})")
        return
    fs, base = filesystem(location)
    probe = f"{base.rstrip('/')}/.raysoup-probe-{uuid.uuid4().hex}"
    try:
        with fs.open_output_stream(probe) as f:
            f.write(b"probe")
        fs.delete_file(probe)
    except OSError as e:
        raise RaysoupError(
            f"{what} = {location!r}: cannot write there ({str(e).splitlines()[0]})"
        ) from None


def upload_tree(local: Path, target: str) -> None:
    """A local file, or a folder's files by their relative paths, copied to `target`."""
    files = [local] if local.is_file() else sorted(p for p in local.rglob("*") if p.is_file())
    try:
        for path in files:
            rel = path.relative_to(local).as_posix()
            copy_file(str(path), target if rel == "." else join(target, rel))
    except OSError as e:
        raise RaysoupError(f"cannot write {target}: {str(e).splitlines()[0]}") from None


def glob(root: str, pattern: str, what: str) -> list[str]:
    """Files under `root` whose path relative to it matches `pattern` (sorted, relative)."""
    within(root, pattern, what)  # the pattern, like any manifest path, stays inside root
    fs, base = filesystem(root)
    try:
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
    except OSError as e:
        raise RaysoupError(f"cannot list {root}: {e}") from e
    relative = (
        str(PurePosixPath(i.path).relative_to(base)) for i in infos if i.type == pafs.FileType.File
    )
    matches = sorted(r for r in relative if fnmatch.fnmatchcase(r, pattern))
    for match in matches:
        within(root, match, what)  # a match that is a symlink out of root is refused
    return matches


def is_file(location: str) -> bool:
    fs, path = filesystem(location)
    try:
        return fs.get_file_info(path).type == pafs.FileType.File
    except OSError:
        return False


def _transfer(source, sink, total: int | None, what: str) -> int:
    """Copy the stream `source` into `sink` in chunks; a transfer that lasts longer than
    PROGRESS_EVERY_S logs the bytes done and the rate every PROGRESS_EVERY_S, and its total.
    Returns the bytes copied."""
    t0 = last = time.monotonic()
    done = 0

    def line(verb: str) -> str:
        seconds = max(time.monotonic() - t0, 1e-9)
        of = f" of {total / 1e6:.1f} MB" if total else " MB"
        return (
            f"[storage] {what}: {verb} {done / 1e6:.1f}{of} in {seconds:.0f} s "
            f"({done / 1e6 / seconds:.1f} MB/s)"
        )

    while chunk := source.read(CHUNK_BYTES):
        sink.write(chunk)
        done += len(chunk)
        if time.monotonic() - last >= PROGRESS_EVERY_S:
            last = time.monotonic()
            logger.info(line("moved"))
    if time.monotonic() - t0 >= PROGRESS_EVERY_S:
        logger.info(line("done,"))
    return done


def read_bytes(location: str) -> bytes:
    fs, path = filesystem(location)
    try:
        if not is_uri(location):
            with fs.open_input_stream(path) as f:
                return f.read()
        size = fs.get_file_info(path).size
        sink = io.BytesIO()
        with fs.open_input_stream(path) as f:
            _transfer(f, sink, size, f"reading {location}")
        return sink.getvalue()
    except OSError as e:
        raise RaysoupError(f"cannot read {location}: {e}") from e


def copy_file(source: str, target: str) -> int:
    """Copy one file between locations (paths or URIs), with progress on a long transfer;
    a local target's folder is made. Returns its size in bytes."""
    src_fs, src = filesystem(source)
    dst_fs, dst = filesystem(target)
    if not is_uri(target):
        Path(dst).parent.mkdir(parents=True, exist_ok=True)
    size = src_fs.get_file_info(src).size
    verb = "uploading" if is_uri(target) else "downloading" if is_uri(source) else "copying"
    with src_fs.open_input_stream(src) as f, dst_fs.open_output_stream(dst) as g:
        return _transfer(f, g, size, f"{verb} {target if is_uri(target) else source}")


def open_random_access(location: str):
    """A seekable file: memory-mapped when local, a pyarrow input file otherwise."""
    import pyarrow as pa

    if not is_uri(location):
        return pa.memory_map(str(location), "r")
    fs, path = filesystem(location)
    return fs.open_input_file(path)
