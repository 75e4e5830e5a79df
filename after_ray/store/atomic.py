"""Atomic file writes: a reader (or a resumed run) sees the old file or the new one, never half.

Every write goes to a temporary file in the destination's directory (same filesystem, so the
rename is atomic), is flushed and fsync'ed, then ``os.replace``'d over the destination, and the
directory is fsync'ed so the rename itself survives a power cut. If anything fails on the way
(disk full, permission, a crash of the serialiser) the temporary file is removed and the previous
file is left exactly as it was. ``OSError`` becomes a ``RunStateError`` that says what could not
be written, where, and that the previous state is still valid; other exceptions (programming
errors) propagate unchanged after the clean-up.

Temporary files are named ``.<name>.tmp-<pid>-<hex>``; :func:`is_temp_file` recognises them (and
the ``.<name>.tmp-<pid>`` form older versions wrote) so leftovers of a killed writer can be found
and removed.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from after_ray.errors import RunStateError
from after_ray.faults import failpoint

TEMP_NAME = re.compile(r"^\..+\.tmp-\d+(-[0-9a-f]+)?$")

# What the user can do about the most common write failures.
_ERRNO_HINTS = {
    errno.ENOSPC: "the disk is full: free some space",
    errno.EDQUOT: "the disk quota is exceeded: free some space",
    errno.EFBIG: "the file exceeds the size this process may write (see `ulimit -f`)",
    errno.EACCES: "permission denied: make the directory writable for this user",
    errno.EPERM: "operation not permitted: make the directory writable for this user",
    errno.EROFS: "the filesystem is read-only: point the run at a writable directory",
}


def is_temp_file(name: str) -> bool:
    """True for the name of a temporary file left by an atomic write."""
    return bool(TEMP_NAME.match(name))


def temp_path_for(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


def fsync_dir(directory: str | Path) -> None:
    """Make a rename or a new file in ``directory`` durable (no-op where unsupported)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        # Some filesystems (and all of Windows) refuse fsync on a directory; the rename is still
        # atomic there, only its durability across a power cut is not guaranteed.
        pass
    finally:
        os.close(fd)


def write_failure(path: Path, what: str, exc: OSError) -> RunStateError:
    hint = _ERRNO_HINTS.get(exc.errno or 0, "fix the cause")
    reason = exc.strerror or str(exc) or type(exc).__name__
    return RunStateError(
        f"could not write {what} to {str(path)!r}: {reason}. The previous version of the file "
        f"(if there was one) is untouched, so the run state is still valid; {hint} and run the "
        "same command again to resume"
    )


def atomic_write(
    path: str | Path,
    write: Callable[[IO[bytes]], None],
    *,
    what: str | None = None,
    disk_error: Callable[[BaseException], OSError | None] | None = None,
) -> Path:
    """Replace ``path`` with what ``write`` writes to a binary file handle, atomically.

    The one atomic writer: every file of a run directory is written through it. ``what`` names
    the content in error messages. ``disk_error`` says which failures count as I/O failures (to
    become a ``RunStateError``): by default an ``OSError`` itself, or a library's wrapper that
    names the errno; a serialiser that wraps the OSError deeper passes its own.
    """
    path = Path(path)
    what = what or path.name
    tmp = temp_path_for(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "xb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        failpoint("state_write")  # crash tests: die between the temp file and the rename
        os.replace(tmp, path)
    except BaseException as exc:
        # BaseException too: a KeyboardInterrupt mid-write must not leave a temp file behind.
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        os_error = (disk_error or as_os_error)(exc)
        if os_error is not None:
            raise write_failure(path, what, os_error) from os_error
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: str | Path, data: bytes, *, what: str | None = None) -> Path:
    """Replace ``path`` with ``data`` atomically. ``what`` names the content in error messages."""
    return atomic_write(path, lambda handle: handle.write(data), what=what)


def atomic_write_text(
    path: str | Path, text: str, *, encoding: str = "utf-8", what: str | None = None
) -> Path:
    return atomic_write_bytes(path, text.encode(encoding), what=what)


def to_jsonable(value: Any) -> Any:
    """Plain JSON types from numpy scalars/arrays, paths, tuples and sets.

    Non-finite floats become ``null``: JSON has no NaN, and files other tools read must be valid.
    """
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    if isinstance(value, set | frozenset):
        return sorted(to_jsonable(v) for v in value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, bool | int | str) or value is None:
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    # numpy without importing it: scalars have .item(), arrays have .tolist().
    if hasattr(value, "tolist"):
        return to_jsonable(value.tolist())
    if hasattr(value, "item"):
        return to_jsonable(value.item())
    raise TypeError(f"cannot store a {type(value).__name__} as JSON: {value!r}")


def dumps_json(obj: Any, *, indent: int | None = 2) -> str:
    return json.dumps(to_jsonable(obj), indent=indent, sort_keys=True, allow_nan=False) + "\n"


def atomic_write_json(
    path: str | Path, obj: Any, *, indent: int | None = 2, what: str | None = None
) -> Path:
    """Serialise first (a TypeError leaves no trace on disk), then write atomically."""
    return atomic_write_text(path, dumps_json(obj, indent=indent), what=what)


def atomic_write_parquet(table: Any, path: str | Path, *, what: str | None = None) -> Path:
    """Write a ``pyarrow.Table`` to Parquet atomically."""
    import pyarrow.parquet as pq

    return atomic_write(path, lambda handle: pq.write_table(table, handle), what=what)


# Writers implemented in Rust (safetensors) report an I/O failure as "... (os error 28)".
_FOREIGN_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def as_os_error(exc: BaseException) -> OSError | None:
    """``exc`` as an OSError when it is one, or a library's wrapper that names the errno."""
    if isinstance(exc, OSError):
        return exc
    match = _FOREIGN_OS_ERROR.search(str(exc)) if isinstance(exc, Exception) else None
    if match:
        code = int(match.group(1))
        return OSError(code, os.strerror(code))
    return None


@contextlib.contextmanager
def staged_directory(out_dir: str | Path, *, what: str | None = None) -> Iterator[Path]:
    """Build a directory next to ``out_dir``, then swap it into place in one rename.

    Yields an empty staging directory in the same parent; when the block succeeds it replaces
    ``out_dir`` (a previous version is moved aside first and removed after the swap), and when
    the block fails the staging directory is removed. A crash therefore never leaves a
    half-written checkpoint where a complete one was. An I/O failure (disk full, ...) in the
    block or the swap becomes a ``RunStateError`` saying that the previous directory is intact;
    ``what`` names the content in that message.
    """
    out = Path(out_dir)
    staging: Path | None = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))
        yield staging
        failpoint("dir_staged")  # crash tests: complete in staging, not yet swapped in
        if out.exists():
            previous = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(previous)
            failpoint("dir_swap")  # crash tests: the previous version moved aside, no new one
            try:
                staging.rename(out)
            except BaseException:
                previous.rename(out)  # put the complete previous version back
                raise
            shutil.rmtree(previous, ignore_errors=True)
        else:
            staging.rename(out)
    except BaseException as exc:
        os_error = as_os_error(exc)
        if os_error is not None:
            raise write_failure(out, what or f"the directory {out.name}", os_error) from exc
        raise
    finally:
        if staging is not None and staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


# Directories a killed ``staged_directory`` leaves: its staging copy, and the previous version it
# had moved aside when it died between the two renames of the swap.
_STAGED_LEFTOVER = re.compile(r"^\.(?P<target>.+)\.(?P<kind>staging-\w+|old-\d+)$")


def staged_leftovers(root: str | Path) -> list[Path]:
    """Directories under ``root`` left by an interrupted ``staged_directory`` swap."""
    found = []
    for parent, dirs, _files in os.walk(root):
        for name in sorted(dirs):
            if _STAGED_LEFTOVER.match(name):
                found.append(Path(parent) / name)
        dirs[:] = [d for d in dirs if not _STAGED_LEFTOVER.match(d)]
    return found


def recover_staged_leftovers(root: str | Path) -> list[Path]:
    """Undo what interrupted directory swaps left under ``root``; returns what was recovered.

    Only for a caller that knows no writer under ``root`` is alive (it holds the run lock). A
    moved-aside previous version whose directory is missing goes back into place (it was
    complete); every other leftover is deleted.
    """
    restored = []
    for path in staged_leftovers(root):
        match = _STAGED_LEFTOVER.match(path.name)
        target = path.with_name(match["target"])
        if match["kind"].startswith("old-") and not target.exists():
            path.rename(target)
            restored.append(target)
        else:
            shutil.rmtree(path, ignore_errors=True)
    return restored
