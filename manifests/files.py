"""Writing and reading the project's files: every output is written atomically (a temporary file
beside it, fsynced, then renamed over it), so a kill or a full disk never leaves half a file.

One core, `atomic_write_file`, does the temporary file, the mode, the fsync and the rename; the
others (bytes, JSON, .npy) are writers handed to it. Temporary files are hidden (`.<name>.<random>.tmp`)
and removed when a write fails; a process killed mid-write leaves one, which `remove_temporary_files`
clears once the caller is the folder's only writer.
"""

from __future__ import annotations

import json
import os
import stat
import uuid
from pathlib import Path
from typing import Any, BinaryIO, Callable

import numpy as np

TMP_SUFFIX = ".tmp"


def with_path(exc: BaseException, path: Path) -> BaseException:
    """An OSError from write() names no file (a full disk): give it the path being written."""
    if isinstance(exc, OSError) and exc.filename is None:
        return OSError(exc.errno, exc.strerror or str(exc), str(path))
    return exc


def temporary_path(path: Path) -> Path:
    """A unique hidden name beside `path` (`.<name>.<random>.tmp`): written, then renamed over it."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}{TMP_SUFFIX}")


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


def remove_temporary_files(folder: Path) -> int:
    """Delete the temporary files interrupted writes left in `folder` (not recursive); the count.
    Only for a folder the caller is the single writer of (a claimed video's, a locked run's)."""
    removed = 0
    for path in Path(folder).glob(f".*{TMP_SUFFIX}"):
        try:
            path.unlink()
            removed += 1
        except OSError:
            pass
    return removed


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
