"""The feature cache: the one format shared by `extract`, `import-features`, `train` and `score`.

Layout (everything written atomically: temporary file + rename):

    OUT/
      <config-hash>/                   one folder per extraction configuration
        config.json                    the ExtractionConfig (or the importer's description) + extractors
        manifest.csv                   one row per video, rebuilt from the records below
        videos/<video_id>/
          <modality>.npy               (T, C) float32/float16, loads with allow_pickle=False
          record.json                  the video's manifest row; written LAST, so a video without it
                                       (or whose record says otherwise) is redone, never trusted
        claims/<video_key>.claim       held by the process extracting that video (see manifests.claims)

The record is the source of truth; `manifest.csv` is a human-readable view of all records,
regenerated after every extraction run and on demand. Concurrent `extract` processes never write
the same video (claims) and each only writes its own videos' records, so they cannot corrupt
each other; the CSV is rebuilt from the records and written atomically by whoever finishes.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

RECORD_NAME = "record.json"
CONFIG_NAME = "config.json"
MANIFEST_NAME = "manifest.csv"

# Per-modality status values.
DONE, MISSING, FAILED = "done", "missing", "failed"


class CacheError(RuntimeError):
    """The feature cache is absent, ambiguous or inconsistent; the message names the path."""


# --------------------------------------------------------------------------- atomic writes


def with_path(exc: BaseException, path: Path) -> BaseException:
    """An OSError from write() names no file (a full disk): give it the path being written."""
    if isinstance(exc, OSError) and exc.filename is None:
        return OSError(exc.errno, exc.strerror or str(exc), str(path))
    return exc


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        raise with_path(exc, path)


def atomic_write_json(path: Path, payload: Any) -> None:
    atomic_write_bytes(path, (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode())


def atomic_save_npy(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            np.save(handle, np.ascontiguousarray(array), allow_pickle=False)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        raise with_path(exc, path)


# --------------------------------------------------------------------------- records


@dataclass
class ModalityRecord:
    status: str  # done | missing | failed
    shape: list[int] | None = None
    extractor: str | None = None
    version: str | None = None
    reason: str | None = None  # why missing / failed, one line


@dataclass
class VideoRecord:
    """One manifest row: what was done to one video, with what, and how it ended."""

    video_id: str
    path: str
    status: str  # done | failed  (done: every modality is done or missing)
    size_bytes: int | None = None
    fingerprint: str | None = None
    fps: float | None = None
    frame_count: int | None = None
    duration_s: float | None = None
    num_segments: int | None = None  # T, shared by every modality
    modalities: dict[str, ModalityRecord] = field(default_factory=dict)
    error: str | None = None
    random_weights: bool | None = None
    segments: dict[str, list] | None = None  # start/end frame and start/end seconds per segment
    started_at: str | None = None
    finished_at: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "VideoRecord":
        data = dict(data)
        data["modalities"] = {k: ModalityRecord(**v) for k, v in data.get("modalities", {}).items()}
        return cls(**data)

    def present_modalities(self) -> list[str]:
        return [m for m, r in self.modalities.items() if r.status == DONE]

    def table_row(self) -> dict[str, Any]:
        """The flat row shown in manifest.csv."""
        row = {
            "video_id": self.video_id,
            "path": self.path,
            "status": self.status,
            "size_bytes": self.size_bytes,
            "fingerprint": self.fingerprint,
            "fps": self.fps,
            "frame_count": self.frame_count,
            "duration_s": self.duration_s,
            "T": self.num_segments,
            "error": self.error,
            "random_weights": self.random_weights,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
        }
        for modality, record in self.modalities.items():
            row[f"{modality}_status"] = record.status
            row[f"{modality}_shape"] = "x".join(map(str, record.shape)) if record.shape else None
            row[f"{modality}_extractor"] = (
                f"{record.extractor}@{record.version}" if record.extractor else None
            )
            if record.reason:
                row[f"{modality}_reason"] = record.reason
        return row


# --------------------------------------------------------------------------- the cache


def video_dir_name(video_id: str) -> str:
    """Folder (relative to videos/) holding a video's files. Ids may contain '/' (sub-folders)."""
    return video_id


class FeatureCache:
    """One configuration's folder: `OUT/<config-hash>/`."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    # ---- locating

    @classmethod
    def open(cls, path: str | Path) -> "FeatureCache":
        """Open a cache given either its config-hash folder or the `--out` folder above it.

        With the `--out` folder, it must hold exactly one configuration; otherwise the error lists
        them so the user can pick one.
        """
        path = Path(path).expanduser()
        if (path / CONFIG_NAME).is_file():
            return cls(path)
        if not path.is_dir():
            raise CacheError(f"feature cache {path} does not exist")
        configs = sorted(p.parent for p in path.glob(f"*/{CONFIG_NAME}"))
        if not configs:
            raise CacheError(f"{path} holds no feature cache (no */{CONFIG_NAME}); run `pipeline extract` first")
        if len(configs) > 1:
            listing = "\n".join(f"  {p}  ({_describe_config(p)})" for p in configs)
            raise CacheError(
                f"{path} holds features from {len(configs)} extraction configurations; "
                f"pass one of these folders instead:\n{listing}"
            )
        return cls(configs[0])

    @property
    def config_hash(self) -> str:
        return self.root.name

    @property
    def videos_dir(self) -> Path:
        return self.root / "videos"

    def video_dir(self, video_id: str) -> Path:
        return self.videos_dir / video_dir_name(video_id)

    def feature_path(self, video_id: str, modality: str) -> Path:
        return self.video_dir(video_id) / f"{modality}.npy"

    def record_path(self, video_id: str) -> Path:
        return self.video_dir(video_id) / RECORD_NAME

    # ---- config

    def read_config(self) -> dict[str, Any]:
        path = self.root / CONFIG_NAME
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            raise CacheError(f"{path} is missing") from None
        except json.JSONDecodeError as exc:
            raise CacheError(f"{path} is not valid JSON: {exc}") from None

    def write_config(self, payload: dict[str, Any]) -> None:
        atomic_write_json(self.root / CONFIG_NAME, payload)

    @property
    def modalities(self) -> list[str]:
        return list(self.read_config()["modalities"])

    @property
    def feature_dims(self) -> dict[str, int]:
        """{modality: C}, from config.json's "extractors" section."""
        extractors = self.read_config()["extractors"]
        return {m: int(extractors[m]["feature_dim"]) for m in self.modalities}

    @property
    def random_weights(self) -> bool:
        return bool(self.read_config().get("random_weights", False))

    # ---- records

    def read_record(self, video_id: str) -> VideoRecord | None:
        path = self.record_path(video_id)
        try:
            return VideoRecord.from_dict(json.loads(path.read_text()))
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, TypeError, KeyError):
            return None  # a damaged record is treated as absent: the video is redone

    def write_record(self, record: VideoRecord) -> None:
        atomic_write_json(self.record_path(record.video_id), record.to_dict())

    def records(self) -> list[VideoRecord]:
        """Every video's record, sorted by id."""
        out = []
        for path in sorted(self.videos_dir.rglob(RECORD_NAME)):
            video_id = path.parent.relative_to(self.videos_dir).as_posix()
            record = self.read_record(video_id)
            if record is not None:
                out.append(record)
        return sorted(out, key=lambda r: r.video_id)

    def manifest(self) -> pd.DataFrame:
        table = pd.DataFrame([r.table_row() for r in self.records()])
        for column in ("size_bytes", "frame_count", "T"):  # stay integers even with failed (empty) rows
            if column in table:
                table[column] = table[column].astype("Int64")
        return table

    def write_manifest(self) -> Path:
        path = self.root / MANIFEST_NAME
        atomic_write_bytes(path, self.manifest().to_csv(index=False).encode())
        return path

    # ---- features

    def save_features(self, video_id: str, modality: str, array: np.ndarray) -> None:
        atomic_save_npy(self.feature_path(video_id, modality), array)

    def load_features(self, video_id: str) -> dict[str, np.ndarray]:
        """{modality: (T, C) float32} for the modalities this video has (status done)."""
        record = self.read_record(video_id)
        if record is None or record.status != DONE:
            raise CacheError(f"video {video_id!r} has no completed features in {self.root}")
        out = {}
        for modality in record.present_modalities():
            path = self.feature_path(video_id, modality)
            try:
                out[modality] = np.load(path, allow_pickle=False).astype(np.float32, copy=False)
            except (OSError, ValueError) as exc:
                raise CacheError(f"cannot read {path}: {exc}") from None
        return out


def _describe_config(root: Path) -> str:
    try:
        config = json.loads((root / CONFIG_NAME).read_text())
    except (OSError, json.JSONDecodeError):
        return "unreadable config.json"
    parts = [f"protocol={config.get('protocol')}", f"modalities={','.join(config.get('modalities', []))}"]
    if config.get("random_weights"):
        parts.append("RANDOM WEIGHTS")
    return " ".join(parts)
