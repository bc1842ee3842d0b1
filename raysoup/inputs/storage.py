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
import os
import uuid
from pathlib import Path, PurePosixPath

import pyarrow.fs as pafs

from ..errors import RaysoupError


def cache_dir() -> Path:
    """This machine's cache (the demo's zoos): RAYSOUP_CACHE unless that is a URI."""
    env = os.environ.get("RAYSOUP_CACHE", "")
    return Path(env) if env and not is_uri(env) else Path.home() / ".cache" / "raysoup"


def cache_location(configured: str | None = None) -> str:
    """Where judgements and measured points are kept by content: the config's `cache`, else
    RAYSOUP_CACHE, else this machine's cache_dir(). A URI or a shared path is shared by every
    node that reaches it."""
    env = os.environ.get("RAYSOUP_CACHE", "")
    return configured or (env if is_uri(env) else str(cache_dir()))


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
        raise RaysoupError(f"{what} = {relative!r}: must be a path inside {root} "
                           f"(no absolute paths, URIs or '..')")
    path = f"{root.rstrip('/')}/{rel}"
    if not is_uri(root) and not any(c in str(rel) for c in "*?["):  # a glob's matches are
        real_root = os.path.realpath(root)                         # checked one by one
        if os.path.commonpath([real_root, os.path.realpath(path)]) != real_root:
            raise RaysoupError(f"{what} = {relative!r}: a symlink to "
                               f"{os.path.realpath(path)}, outside {root}; copy the file into "
                               f"the zoo instead")
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
    """Refuse, in one line, a URI this process cannot write (no such bucket, no endpoint,
    wrong credentials): a probe object is written and deleted."""
    fs, base = filesystem(location)
    probe = f"{base.rstrip('/')}/.raysoup-probe-{uuid.uuid4().hex}"
    try:
        with fs.open_output_stream(probe) as f:
            f.write(b"probe")
        fs.delete_file(probe)
    except OSError as e:
        raise RaysoupError(f"{what} = {location!r}: cannot write there "
                           f"({str(e).splitlines()[0]})") from None


def glob(root: str, pattern: str, what: str) -> list[str]:
    """Files under `root` whose path relative to it matches `pattern` (sorted, relative)."""
    within(root, pattern, what)  # the pattern, like any manifest path, stays inside root
    fs, base = filesystem(root)
    try:
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
    except OSError as e:
        raise RaysoupError(f"cannot list {root}: {e}") from e
    relative = (str(PurePosixPath(i.path).relative_to(base)) for i in infos
                if i.type == pafs.FileType.File)
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


def read_bytes(location: str) -> bytes:
    fs, path = filesystem(location)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except OSError as e:
        raise RaysoupError(f"cannot read {location}: {e}") from e


def open_random_access(location: str):
    """A seekable file: memory-mapped when local, a pyarrow input file otherwise."""
    import pyarrow as pa
    if not is_uri(location):
        return pa.memory_map(str(location), "r")
    fs, path = filesystem(location)
    return fs.open_input_file(path)
