"""Video files as the stages see them: which files are videos, their ids, and their content fingerprints.

Shared by extract (which videos to do, and whether a finished one is still the same file) and score
(which clips were already extracted, found by fingerprint).
"""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from manifests.cache import VideoRecord, file_sha256

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".avi", ".mov", ".webm")
LEGACY_FINGERPRINT_BYTES = 1 << 20


@dataclass(frozen=True)
class VideoSource:
    video_id: str
    path: Path


def _walk_video_files(root: Path) -> list[Path]:
    """Video files under `root`, following symlinked folders but never entering a folder twice
    (a link back up the tree, or two links to one folder, would otherwise loop or duplicate)."""
    seen: set[tuple[int, int]] = set()
    found = []
    for folder, subfolders, files in os.walk(root, followlinks=True):
        stat = os.stat(folder)
        if (stat.st_dev, stat.st_ino) in seen:
            subfolders[:] = []
            continue
        seen.add((stat.st_dev, stat.st_ino))
        subfolders.sort()
        for name in files:
            path = Path(folder) / name
            if path.suffix.lower() in VIDEO_EXTENSIONS and path.is_file():
                found.append(path)
    return sorted(found)


def discover_videos(root: Path) -> list[VideoSource]:
    """Every video under `root` (recursively, through symlinked folders), with ids unique across sub-folders.

    The id is the path relative to `root` without its extension ("ball/001"); when two files differ
    only by extension, those files keep it ("ball/001.mp4") so ids never collide.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"video folder {root} does not exist")
    paths = _walk_video_files(root)
    stems: dict[str, int] = {}
    for path in paths:
        stem_id = path.relative_to(root).with_suffix("").as_posix()
        stems[stem_id] = stems.get(stem_id, 0) + 1
    sources = []
    for path in paths:
        relative = path.relative_to(root)
        stem_id = relative.with_suffix("").as_posix()
        video_id = stem_id if stems[stem_id] == 1 else relative.as_posix()
        sources.append(VideoSource(video_id, path))
    return sources


def file_fingerprint(path: Path) -> tuple[int, str]:
    """(size in bytes, "sha256:<hex>" of the whole file, streamed once).

    A file is hashed once per process while it stays as it is: deciding whether a video needs work,
    opening it for extraction and scoring's look-up share the hash. "As it is" is its whole stat,
    change time included, which every write moves and no tool can set back. (`same_file(rehash=True)`,
    i.e. `--verify`, hashes afresh all the same.)"""
    stat = Path(path).stat()
    key = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
    return stat.st_size, _sha256(os.path.abspath(path), *key)


@functools.lru_cache(maxsize=1 << 14)
def _sha256(path: str, *stat_key: int) -> str:
    return file_sha256(Path(path))


def legacy_fingerprint(path: Path) -> str:
    """The sampled fingerprint, held by a record without the "sha256:" prefix (CHANGELOG.md, "Feature
    caches"): sha1 of the size and the first and last MiB. It misses a same-size edit in the middle, so
    only such records are compared by it; they keep it until their video is extracted again."""
    size = path.stat().st_size
    digest = hashlib.sha1(str(size).encode())
    with open(path, "rb") as handle:
        digest.update(handle.read(LEGACY_FINGERPRINT_BYTES))
        if size > LEGACY_FINGERPRINT_BYTES:
            handle.seek(max(LEGACY_FINGERPRINT_BYTES, size - LEGACY_FINGERPRINT_BYTES))
            digest.update(handle.read(LEGACY_FINGERPRINT_BYTES))
    return digest.hexdigest()[:16]


def same_file(record: VideoRecord, path: Path, rehash: bool = False) -> bool:
    """True when `path` is the file `record` was made from.

    Size and mtime equal to the recorded ones stand for the recorded hash (only a tool that restores
    mtimes could change a file keeping both); otherwise the whole file is hashed again (once per
    process, see `file_fingerprint`), and with `rehash` (`--verify`) afresh. A record holding a
    sampled fingerprint is compared by it (`legacy_fingerprint`)."""
    stat = path.stat()
    if record.size_bytes != stat.st_size or not record.fingerprint:
        return False
    if not record.fingerprint.startswith("sha256:"):
        return legacy_fingerprint(path) == record.fingerprint
    if not rehash and record.mtime_ns == stat.st_mtime_ns:
        return True
    current = file_sha256(path) if rehash else file_fingerprint(path)[1]
    return current == record.fingerprint
