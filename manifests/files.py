"""Writing and reading the project's files: every output is written atomically (a temporary file
beside it, fsynced, then renamed over it), so a kill or a full disk never leaves half a file.

One core, `atomic_write_file`, does the temporary file, the mode, the fsync and the rename; the
others (bytes, JSON, .npy) are writers handed to it. Temporary files are hidden
(`.<name>.<host>-<pid>-<random>.tmp`, naming their writer) and removed when a write fails; a process
killed mid-write leaves one. `remove_temporary_files` clears them in a folder the caller is the only
writer of; `remove_abandoned_temporary_files` clears, in a folder several processes write (a cache's
root, its claims), only those whose writer is gone.

CSV files are written spreadsheet-safe: `escape_csv_cell` is the one escape of a cell a spreadsheet
would run as a formula, `unescape_csv_cell` its undo for the project's readers; `rows_to_csv` writes every
CSV the project makes, so that any cell, line breaks included, reads back as one cell.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import socket
import stat
import time
import uuid
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable

import numpy as np

TMP_SUFFIX = ".tmp"


def with_path(exc: BaseException, path: Path) -> BaseException:
    """An OSError from write() names no file (a full disk): give it the path being written."""
    if isinstance(exc, OSError) and exc.filename is None:
        return OSError(exc.errno, exc.strerror or str(exc), str(path))
    return exc


def pid_namespace() -> int | None:
    """The inode of this process's pid namespace: two containers may share a host name, not this."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


def host_key() -> str:
    """This host and pid namespace in 8 hex digits: where a pid in a file name can be looked up."""
    return hashlib.sha1(f"{socket.gethostname()}/{pid_namespace()}".encode()).hexdigest()[:8]


def temporary_path(path: Path) -> Path:
    """A unique hidden name beside `path`, naming its writer (`.<name>.<host>-<pid>-<random>.tmp`):
    written, then renamed over it."""
    return path.with_name(f".{path.name}.{host_key()}-{os.getpid()}-{uuid.uuid4().hex[:12]}{TMP_SUFFIX}")


_WRITER = re.compile(r"\.(?P<host>[0-9a-f]{8})-(?P<pid>[0-9]+)-[0-9a-f]+" + re.escape(TMP_SUFFIX) + "$")


def atomic_write_file(path: Path, fill: Callable[[Path], None]) -> None:
    """`fill(tmp)` writes a temporary file beside `path`; it is fsynced and renamed over `path`.

    The temporary file is created first with mode 0666 minus the user's umask, like any file the user
    makes (a shared cache stays readable by the group; mkstemp's 0600 would hide it), and keeps that
    mode even when `fill` is a writer that recreates the file (safetensors' save_file resets it to
    0600). On any error the temporary file is removed; an OSError that names no file (a full disk) is
    raised naming `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        mode = stat.S_IMODE(os.stat(tmp).st_mode)
        fill(tmp)
        os.chmod(tmp, mode)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        raise with_path(exc, path)


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Atomic write through `write(handle)`, a binary file handle open on the temporary file."""

    def fill(tmp: Path) -> None:
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_TRUNC), "wb") as handle:
            write(handle)

    atomic_write_file(path, fill)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda handle: handle.write(data))


def atomic_write_json(path: Path, payload: Any) -> None:
    """Indented JSON with sorted keys and a final newline."""
    atomic_write_bytes(path, (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode())


def atomic_save_npy(path: Path, array: np.ndarray) -> None:
    atomic_write(path, lambda handle: np.save(handle, np.ascontiguousarray(array), allow_pickle=False))


def remove_temporary_files(folder: Path, keep: Callable[[Path], bool] = lambda path: False) -> int:
    """Delete the temporary files interrupted writes left in `folder` (not recursive); the count.
    Without `keep`, only for a folder the caller is the single writer of (a claimed video's, a locked
    run's); `keep(path)` spares the files still being written (`remove_abandoned_temporary_files`)."""
    removed = 0
    for path in Path(folder).glob(f".*{TMP_SUFFIX}"):
        if keep(path):
            continue
        try:
            path.unlink()
            removed += 1
        except OSError:
            pass
    return removed


def writer_is_gone(tmp: Path, stale_after: float) -> bool:
    """True when the process writing the temporary file `tmp` is provably gone: its name names a pid of
    this host that is not running, or (another host's file, or one named before temporary files carried
    their writer) it has not changed for `stale_after` seconds. The rule of manifests/claims.py."""
    match = _WRITER.search(tmp.name)
    if match and match["host"] == host_key():
        try:
            os.kill(int(match["pid"]), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass  # runs, under another user
        return False  # a live process of this host (or one that reused its pid: kept, to be safe)
    try:
        return time.time() - tmp.stat().st_mtime > stale_after
    except FileNotFoundError:
        return False  # renamed into place or removed meanwhile


def remove_abandoned_temporary_files(folder: Path, stale_after: float) -> int:
    """Delete the temporary files in `folder` whose writer is gone (`writer_is_gone`); the count. For a
    folder that several processes write at once: a live writer's temporary file is left alone."""
    return remove_temporary_files(folder, keep=lambda path: not writer_is_gone(path, stale_after))


# A spreadsheet runs a cell starting with one of these as a formula (CSV injection)
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _formula_like(text: str) -> bool:
    """Text a spreadsheet would run: past any leading quotes, it starts a formula and is not a number.
    Leading quotes are skipped so that a text already starting with one is escaped too: the escape
    stays reversible."""
    body = text.lstrip("'")
    if not body.startswith(FORMULA_STARTS):
        return False
    try:
        float(body)  # -3, +1e5: a spreadsheet reads a number, runs nothing
    except ValueError:
        return True
    return False


def escape_csv_cell(value: Any) -> Any:
    """The one escape of every CSV the project writes: a text cell a spreadsheet would run as a formula
    (starting with = + - @ tab or CR) gets a leading single quote, the usual spreadsheet-safety rule.
    Numbers and other values are returned as they are; `unescape_csv_cell` undoes it exactly."""
    return "'" + value if isinstance(value, str) and _formula_like(value) else value


def unescape_csv_cell(text: str) -> str:
    """A cell of a CSV the project wrote, as it was before `escape_csv_cell` (ids come back exactly)."""
    return text[1:] if text.startswith("'") and _formula_like(text[1:]) else text


def rows_to_csv(rows: Iterable[Iterable[Any]]) -> str:
    r"""The rows as CSV text, each line ending in "\n", each cell escaped (`escape_csv_cell`). A cell holding
    the delimiter, a quote or a line break is quoted: csv's writer quotes only the line breaks its line
    terminator holds, so with "\n" a lone "\r" (a video named "a\rb.mp4", an error message) would stay bare
    and split the row for every reader. Each row is written ending in "\r\n", which is then cut to "\n"."""
    lines = []
    for row in rows:
        line = io.StringIO()
        csv.writer(line, lineterminator="\r\n").writerow([escape_csv_cell(cell) for cell in row])
        lines.append(line.getvalue()[:-2] + "\n")
    return "".join(lines)


class JsonFileError(ValueError):
    """A JSON file that cannot be read or is not the object expected; the message names it."""


def read_json_object(path: Path, what: str = "file") -> dict[str, Any]:
    """The JSON object in `path`, or JsonFileError naming the file (missing files raise FileNotFoundError)."""
    path = Path(path)
    try:
        payload = json.loads(path.read_text())
    except UnicodeDecodeError:
        raise JsonFileError(f"{path} is not a valid {what}: not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise JsonFileError(f"{path} is not a valid {what}: not JSON ({exc})") from None
    if not isinstance(payload, dict):
        raise JsonFileError(f"{path} is not a valid {what}: a JSON {type(payload).__name__}, not an object")
    return payload
