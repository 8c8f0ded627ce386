"""The feature cache: the one format shared by `extract`, `import-features`, `train` and `score`.

Layout (everything written atomically: temporary file + rename):

    OUT/
      <config-hash>/                   one folder per extraction configuration (see CacheConfig)
        config.json                    how the features were made: CacheConfig (schema_version 1)
        manifest.csv                   one row per video, rebuilt from the records below
        videos/<video_id>/             (an id component that could name a file here, record.json,
                                       *.npy, .* or %*, gets a leading '%': see video_dir_name)
          <modality>.npy               (T, C) float32/float16, loads with allow_pickle=False
          record.json                  the video's manifest row; written LAST, so a video without it
                                       (or whose record says otherwise) is redone, never trusted
        claims/<video_key>.claim       held by the process extracting that video (see manifests.claims)
    The temporary files of writes killed midway (`.<name>.<host>-<pid>-<random>.tmp`) are removed by
    the next open_cache (root), Claims (claims/) or claim of the video (its folder), once their writer
    is gone.

The record is the source of truth; `manifest.csv` is a human-readable view of all records,
regenerated after every extraction run and on demand. Concurrent `extract` processes never write
the same video (claims) and each only writes its own videos' records, so they cannot corrupt
each other; the CSV is rebuilt from the records and written atomically by whoever finishes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from manifests.claims import STALE_AFTER_S, Claims
from manifests.config import SCHEMA_KEY, ConfigError, RecordedConfig
from manifests.files import (
    atomic_save_npy, atomic_write_bytes, atomic_write_json, remove_abandoned_temporary_files, rows_to_csv,
)
from manifests.hashing import feature_hash, hashed_fields

RECORD_NAME = "record.json"
CONFIG_NAME = "config.json"
MANIFEST_NAME = "manifest.csv"
CLAIMS_NAME = "claims"

# Per-modality status values.
DONE, MISSING, FAILED = "done", "missing", "failed"


class CacheError(RuntimeError):
    """The feature cache is absent, ambiguous or inconsistent; the message names the path."""


# --------------------------------------------------------------------------- config.json

# The key of an extractor description listing the pretrained weights files it loaded, by content
# (extractors/base.py describe_weights_file): absent for random weights and in caches made before.
WEIGHTS_FILES_KEY = "weights_files"
EXTRACTED = "extract"  # CacheConfig.source of features made by `pipeline extract`; imports: "import:<format>"
RANDOM_WEIGHTS_NOTE = "RANDOM-WEIGHT BACKBONES: these features carry no pretrained knowledge"


@dataclass
class CacheConfig(RecordedConfig):
    """A cache folder's config.json: how its features were made. Its `config_hash` names the folder.

    Written once, by `open_cache` when it makes the folder. Two kinds:
    - source "extract": `extraction` is the ExtractionConfig (extractors/config.py), whose hash names
      the folder; `extractors` holds each built extractor's describe() (name, version, feature_dim, ...).
    - source "import:<format>": a published feature set named by `format`, `dataset`, `subset` and
      `protocol`; the folder is named by the hash of those with the modalities and `extractors`
      (name, version "published", feature_dim, origin): see `imported`.
    The extractors' versions are the folder's contract: features of another version (a backbone whose
    features changed) never join it (`version_mismatch`, checked by `open_cache`).
    """

    source: str
    config_hash: str = field(metadata={"hash": False})
    modalities: list[str]
    extractors: dict[str, dict[str, Any]]
    random_weights: bool = False
    extraction: dict[str, Any] | None = None
    format: str | None = None
    dataset: str | None = None
    subset: str | None = None
    protocol: str | None = None
    note: str | None = field(default=None, metadata={"hash": False})
    created_at: str | None = field(default=None, metadata={"hash": False})
    # An extraction recipe's description (extractors/recipes.py: its summary and the steps not verified
    # against its authors' files), written for a recipe other than the project's. Its name and values are
    # in `extraction`; this is for the reader, like `note`.
    recipe: dict[str, Any] | None = field(default=None, metadata={"hash": False})

    IMPORT_FIELDS: ClassVar[tuple[str, ...]] = ("format", "dataset", "subset", "protocol")
    # Hashed whatever their value: every imported set's folder name covers these (others: when not default).
    IMPORT_HASHED_SINCE_V1: ClassVar[tuple[str, ...]] = (
        "source", *IMPORT_FIELDS, "modalities", "extractors", "random_weights",
    )

    @classmethod
    def extracted(cls, extraction: Any, extractors: dict[str, Any]) -> "CacheConfig":
        """The config of features made under `extraction` (an ExtractionConfig) by the built `extractors`
        ({modality: Extractor}); their describe() records name, version and feature_dim."""
        random = bool(extraction.random_weights)
        return cls(
            source=EXTRACTED, config_hash=extraction.config_hash(), modalities=list(extraction.modalities),
            extractors={m: e.describe() for m, e in extractors.items()}, random_weights=random,
            extraction=extraction.to_dict(), note=RANDOM_WEIGHTS_NOTE if random else "pretrained backbones",
            created_at=_now(), recipe=extraction.recipe_description(),
        )

    @classmethod
    def imported(cls, format: str, dataset: str, subset: str | None, protocol: str, modalities: list[str],
                 extractors: dict[str, dict[str, Any]]) -> "CacheConfig":
        """The config of a published feature set (pipeline/stages/importers.py); random_weights is False."""
        config = cls(source=f"import:{format}", config_hash="", modalities=list(modalities), extractors=extractors,
                     format=format, dataset=dataset, subset=subset, protocol=protocol, created_at=_now())
        # json's default separators, in which every imported set's folder name is spelled (see feature_hash).
        config.config_hash = feature_hash(hashed_fields(config, cls.IMPORT_HASHED_SINCE_V1), spaced=True)
        return config

    def to_dict(self) -> dict[str, Any]:
        """config.json's layout: the fields of the other kind of source are left out, not written as null."""
        data = super().to_dict()
        imported = self.source.startswith("import:")
        keep_null = set(self.IMPORT_FIELDS) if imported else set()  # an import without a subset says so
        return {k: v for k, v in data.items() if v is not None or k in keep_null}

    def extractor_versions(self) -> dict[str, tuple[Any, Any]]:
        """{modality: (extractor name, feature version)}: the only features this folder takes."""
        return {m: (d.get("name"), d.get("version")) for m, d in self.extractors.items()}

    def version_mismatch(self, versions: dict[str, tuple[Any, Any]]) -> str | None:
        """Why features from extractors of `versions` ({modality: (name, version)}) must not join a cache of
        this config (a one-line reason), or None when they may."""
        mine = self.extractor_versions()
        if {m: tuple(v) for m, v in versions.items()} == mine:
            return None
        return f"holds features from extractors {mine}, but this code has {dict(versions)}"

    def settings(self) -> dict[str, Any]:
        """What made these features as flat `name: value` pairs, to tell configurations apart: the source,
        the modalities, every extraction setting (a backbone's own as `modality.name`; or the published
        set's description), each modality's extractor as name@version, and whether the weights were random."""
        out: dict[str, Any] = {"source": self.source, "modalities": ",".join(self.modalities)}
        skip = {SCHEMA_KEY, "modalities", "backbones", "settings"}  # the backbones appear as the extractors below
        out.update({k: v for k, v in (self.extraction or {}).items() if k not in skip})
        for modality, values in (self.extraction or {}).get("settings", {}).items():  # each backbone's own
            out.update({f"{modality}.{k}": v for k, v in values.items() if k != SCHEMA_KEY})
        out.update({k: getattr(self, k) for k in self.IMPORT_FIELDS if getattr(self, k) is not None})
        out.update({m: f"{d.get('name')}@{d.get('version')}" for m, d in self.extractors.items()})
        out["random_weights"] = self.random_weights
        return out


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def feature_recipe(config: dict[str, Any]) -> str:
    """The recipe (extractors/recipes.py) of the features a config.json describes: an extraction's
    ("project" when it records none), or, for an imported published set, its format's: the recipe of
    that name remakes such features from raw video."""
    if config.get("source") == EXTRACTED:
        return (config.get("extraction") or {}).get("recipe", "project")
    return str(config.get("format") or config.get("source"))


def feature_precision(config: dict[str, Any]) -> str:
    """What the backbones of an extraction's config.json computed in (extractors/config.py PRECISIONS):
    "fp32" when a config.json written before the precision existed says nothing."""
    return (config.get("extraction") or {}).get("precision", "fp32")


def config_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """The keys in which two config.json payloads (or a run's copy of one) differ; [] when they describe
    the same features. When each was written (created_at), its note, its recipe description and the schema version its file
    was written with are not differences, nor are extraction settings outside the hash (see below)."""

    def relevant(config: dict[str, Any]) -> dict[str, Any]:
        out = {k: v for k, v in config.items() if k not in ("created_at", "note", "recipe", SCHEMA_KEY)}
        if isinstance(out.get("extractors"), dict):  # the weights files are compared by content: weights_difference
            out["extractors"] = {m: {k: v for k, v in d.items() if k != WEIGHTS_FILES_KEY} if isinstance(d, dict) else d
                                 for m, d in out["extractors"].items()}
        if out.get("config_hash") is not None:
            # The extraction settings count through config_hash, which covers every setting that changes the
            # features: a setting a config.json does not record stands at its default, which reproduces
            # its features, so it is no difference.
            out.pop("extraction", None)
        return out

    a, b = relevant(a), relevant(b)
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def weights_difference(a: dict[str, Any], b: dict[str, Any]) -> str | None:
    """The first pretrained weights file two config.json payloads (or a run's copy of one) record with other
    contents, in words naming both (`a`'s first), or None when they agree.

    A payload recording no weights files for a modality (made before weights were identified) had the
    public files: it differs from one recording a file known not to be public (`is_public` false), and
    agrees with one whose file has no known public SHA-256, which cannot be told from the public one."""

    def files(config: dict[str, Any]) -> dict[str, dict[str, dict[str, Any]] | None]:
        return {m: None if WEIGHTS_FILES_KEY not in d else {f["file"]: f for f in d[WEIGHTS_FILES_KEY] or []}
                for m, d in (config.get("extractors") or {}).items() if isinstance(d, dict)}

    def words(entry: dict[str, Any] | None) -> str:
        return "the public file (recorded before weights were identified)" if entry is None else entry["sha256"]

    mine, theirs = files(a), files(b)
    for modality in sorted(set(mine) & set(theirs)):
        x, y = mine[modality], theirs[modality]
        if x is None and y is None:
            continue
        for name in sorted(set(x or {}) | set(y or {})):
            if x is not None and y is not None:
                if name in x and name in y and x[name]["sha256"] != y[name]["sha256"]:
                    return f"{modality} weights {name}: {words(x[name])} vs {words(y[name])}"
            elif (x or y)[name].get("is_public") is False:
                return f"{modality} weights {name}: {words((x or {}).get(name))} vs {words((y or {}).get(name))}"
    return None


def open_cache(out: Path, config: CacheConfig) -> "FeatureCache":
    """The folder OUT/<config-hash>/ of `config`: made, with its config.json, when it does not exist yet;
    when it does, it must record the same extractor versions, the same pretrained weights files by content
    (weights_difference) and, for an imported set (whose hash covers
    its whole description), the same description (else CacheError naming the folder). Temporary files
    that killed writes of config.json or manifest.csv left in the folder go (a live writer's stays:
    several processes extract into one folder at once)."""
    cache = FeatureCache(Path(out).expanduser() / config.config_hash)
    if cache.root.is_dir():
        remove_abandoned_temporary_files(cache.root, STALE_AFTER_S)
    if not (cache.root / CONFIG_NAME).is_file():
        cache.write_config(config)
        return cache
    verb = "extract" if config.source == EXTRACTED else "import"
    problem = cache.config.version_mismatch(config.extractor_versions())
    if problem is None and config.source == EXTRACTED:
        differ = weights_difference(cache.read_config(), config.to_dict())
        problem = f"holds features of other pretrained weights ({differ}: folder vs this run)" if differ else None
    if problem is None and config.source == EXTRACTED:
        # The precision is in the folder's name; checked here too, so a renamed or copied folder cannot mix them.
        held, new = feature_precision(cache.read_config()), feature_precision(config.to_dict())
        problem = f"holds features computed in {held}, not {new}" if held != new else None
    if problem is None and config.source != EXTRACTED:
        differ = config_differences(cache.read_config(), config.to_dict())
        problem = f"holds a different feature set (its config.json differs in {differ})" if differ else None
    if problem:
        raise CacheError(f"{cache.root} {problem}; {verb} into a new --out folder")
    return cache


# --------------------------------------------------------------------------- records


@dataclass
class ModalityRecord:
    status: str  # done | missing | failed
    shape: list[int] | None = None
    extractor: str | None = None
    version: str | None = None
    reason: str | None = None  # why missing / failed, one line
    bytes: int | None = None  # size of the .npy file (done only; None: checked against the shape alone)
    sha256: str | None = None  # of the .npy file, checked by `extract --verify`


@dataclass
class VideoRecord:
    """One manifest row: what was done to one video, with what, and how it ended."""

    video_id: str
    path: str
    status: str  # done | failed  (done: every modality is done or missing)
    size_bytes: int | None = None
    fingerprint: str | None = None  # "sha256:..." of the whole file, else sampled (videos.legacy_fingerprint)
    mtime_ns: int | None = None  # the file's mtime when fingerprinted: same size + mtime = same hash
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
        known = {f.name for f in fields(cls)}
        modality_fields = {f.name for f in fields(ModalityRecord)}
        data = {k: v for k, v in data.items() if k in known}  # a newer version's extra keys are ignored
        data["modalities"] = {
            k: ModalityRecord(**{f: x for f, x in v.items() if f in modality_fields})
            for k, v in data.get("modalities", {}).items()
        }
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


def _reserved(part: str) -> bool:
    """A path component that could name a file inside a video's folder (record, arrays, temporaries)."""
    return part == RECORD_NAME or part.endswith(".npy") or part.startswith((".", "%"))


def video_dir_name(video_id: str) -> str:
    """Folder (relative to videos/) holding a video's files. Ids may contain '/' (sub-folders).

    A component that could collide with a file of the parent video's folder (`record.json`, `*.npy`,
    hidden temporaries) is escaped with a leading '%' (so is one already starting with '%'): the video
    `x/record.json` lives in `x/%record.json/`, never in the file `x/record.json` of video `x`."""
    return "/".join("%" + part if _reserved(part) else part for part in video_id.split("/"))


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
            listing = "\n".join(describe_configurations(configs))
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
        name = video_dir_name(video_id)
        folder = self.videos_dir / name
        if name != video_id and not (folder / RECORD_NAME).is_file():
            legacy = self.videos_dir / video_id  # an unescaped folder still opens (CHANGELOG.md)
            try:
                if (legacy / RECORD_NAME).is_file():
                    return legacy
            except OSError:
                pass
        return folder

    def claims(self, stale_after: float = STALE_AFTER_S) -> Claims:
        """The claims on this cache's videos (`claims/`): whoever extracts a video holds its claim."""
        return Claims(self.root / CLAIMS_NAME, stale_after)

    def feature_path(self, video_id: str, modality: str) -> Path:
        return self.video_dir(video_id) / f"{modality}.npy"

    def record_path(self, video_id: str) -> Path:
        return self.video_dir(video_id) / RECORD_NAME

    # ---- config

    def read_config(self) -> dict[str, Any]:
        """config.json as written (runs keep a copy of it); `config` is the same, checked and upgraded."""
        path = self.root / CONFIG_NAME
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            raise CacheError(f"{path} is missing") from None
        except json.JSONDecodeError as exc:
            raise CacheError(f"{path} is not valid JSON: {exc}") from None

    @property
    def config(self) -> CacheConfig:
        try:
            return CacheConfig.from_dict(self.read_config(), source=str(self.root / CONFIG_NAME))
        except ConfigError as exc:
            raise CacheError(str(exc)) from None

    def write_config(self, config: CacheConfig) -> None:
        """The one writer of config.json (open_cache calls it when it makes the folder)."""
        atomic_write_json(self.root / CONFIG_NAME, config.to_dict())

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
        record = _read_record_file(self.record_path(video_id))
        return record if record is not None and record.video_id == video_id else None

    def write_record(self, record: VideoRecord) -> None:
        atomic_write_json(self.record_path(record.video_id), record.to_dict())

    def records(self) -> list[VideoRecord]:
        """Every video's record, sorted by id."""
        out: dict[str, VideoRecord] = {}
        for path in sorted(self.videos_dir.rglob(RECORD_NAME)):
            record = _read_record_file(path)  # the id is the record's own, not its folder's name
            if record is not None and self.record_path(record.video_id) == path:
                out[record.video_id] = record
        return [out[k] for k in sorted(out)]

    def manifest(self) -> pd.DataFrame:
        table = pd.DataFrame([r.table_row() for r in self.records()])
        for column in ("size_bytes", "frame_count", "T"):  # stay integers even with failed (empty) rows
            if column in table:
                table[column] = table[column].astype("Int64")
        return table

    def write_manifest(self) -> Path:
        """manifest.csv, spreadsheet-safe: text cells a spreadsheet would run as formulas (a video named
        `=1+2.mp4`) get a leading single quote (manifests.files.unescape_csv_cell reads them back);
        numeric columns are written as numbers, negative ones included, and an unknown one as an empty cell."""
        table = self.manifest().astype(object)
        table = table.where(table.notna(), None)  # NaN and <NA> as empty cells
        path = self.root / MANIFEST_NAME
        atomic_write_bytes(path, rows_to_csv([list(table.columns), *table.itertuples(index=False)]).encode())
        return path

    # ---- features

    def save_features(self, video_id: str, modality: str, array: np.ndarray) -> None:
        atomic_save_npy(self.feature_path(video_id, modality), array)

    def load_features(self, video_id: str) -> dict[str, np.ndarray]:
        """{modality: (T, C) float32} for the modalities this video has (status done).

        An unreadable array, one whose shape is not the recorded one, or one holding NaN/inf is a
        CacheError naming the video and the file: such features are a finding, never a number."""
        record = self.read_record(video_id)
        if record is None or record.status != DONE:
            raise CacheError(f"video {video_id!r} has no completed features in {self.root}")
        out = {}
        for modality in record.present_modalities():
            path = self.feature_path(video_id, modality)
            try:
                array = np.load(path, allow_pickle=False)
            except Exception as exc:  # OSError, ValueError, EOFError (0 bytes), ...: all mean unreadable
                reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise CacheError(f"video {video_id!r}: cannot read {path}: {reason}; re-extract it") from None
            expected = record.modalities[modality].shape
            if expected is not None and list(array.shape) != list(expected):
                raise CacheError(f"video {video_id!r}: {path} is shaped {array.shape}, its record says "
                                 f"{tuple(expected)}; re-extract it")
            if not np.isfinite(array).all():
                raise CacheError(f"video {video_id!r}: {path} holds NaN/inf values ({modality} features); "
                                 "re-extract it or leave it out of the labels")
            out[modality] = array.astype(np.float32, copy=False)
        return out

    # ---- verification

    def check_video(self, record: VideoRecord, full: bool = False) -> str | None:
        """Why a done record's arrays cannot be trusted, or None.

        Cheap (every rerun): each done modality's .npy exists and its header's shape and its size
        match the record. full (`extract --verify`): also the recorded checksum and finite values."""
        for modality in record.present_modalities():
            path = self.feature_path(record.video_id, modality)
            problem = check_array_file(path, record.modalities[modality], full)
            if problem:
                return f"{modality}: {problem}"
        return None


def _read_record_file(path: Path) -> VideoRecord | None:
    try:
        return VideoRecord.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None  # absent or damaged: treated as absent, so the video is redone


def file_sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return "sha256:" + hashlib.file_digest(handle, "sha256").hexdigest()


def check_array_file(path: Path, record: ModalityRecord, full: bool = False) -> str | None:
    """Why the .npy at `path` does not hold what `record` says, or None (see FeatureCache.check_video)."""
    try:
        with open(path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(handle)
            else:
                shape, _, dtype = np.lib.format.read_array_header_2_0(handle)
            expected_size = handle.tell() + int(np.prod(shape)) * dtype.itemsize
        size = path.stat().st_size
    except FileNotFoundError:
        return f"{path} is missing"
    except Exception as exc:  # a truncated or foreign file fails in many ways
        return f"{path} is not a readable .npy ({str(exc).strip() or type(exc).__name__})"
    if record.shape is not None and list(shape) != list(record.shape):
        return f"{path} is shaped {shape}, the record says {tuple(record.shape)}"
    if size != expected_size or (record.bytes is not None and size != record.bytes):
        return f"{path} has {size} bytes, expected {record.bytes or expected_size} (truncated or changed)"
    if full:
        if record.sha256 is not None and file_sha256(path) != record.sha256:
            return f"{path} does not match its recorded checksum"
        try:
            finite = np.isfinite(np.load(path, allow_pickle=False)).all()
        except Exception as exc:
            return f"{path} is not readable ({str(exc).strip() or type(exc).__name__})"
        if not finite:
            return f"{path} holds NaN/inf values"
    return None


def describe_configurations(roots: list[Path]) -> list[str]:
    """One line per configuration folder: its path (ending in its hash) and the settings that take more
    than one value among the configurations (CacheConfig.settings), e.g. `arch_size=tiny seed=0`."""
    settings: dict[Path, dict[str, Any] | None] = {}
    for root in roots:
        try:
            settings[root] = FeatureCache(root).config.settings()
        except CacheError:
            settings[root] = None
    readable = [s for s in settings.values() if s is not None]
    names = list(dict.fromkeys(k for s in readable for k in s))
    differing = [k for k in names if len({json.dumps(s[k], sort_keys=True) for s in readable if k in s}) > 1]
    lines = []
    for root, found in settings.items():
        if found is None:
            lines.append(f"  {root}  (unreadable config.json)")
            continue
        parts = [f"{k}={_setting(found[k])}" for k in differing if k in found and k != "random_weights"]
        if found["random_weights"]:
            parts.append("RANDOM WEIGHTS")
        lines.append(f"  {root}  (hash {root.name}: {' '.join(parts) or 'same settings'})")
    return lines


def _setting(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)
