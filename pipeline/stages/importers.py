"""`pipeline import-features`: the published feature sets, converted into this project's cache + labels.

pamfn (Rhythmic Gymnastics and Fis-V, as released by PAMFN and used by MCMoE):
    ROOT/{Name}_rgb_VST.npy, {Name}_flow_I3D.npy, {Name}_audio_AST.npy
        Name is an RG apparatus (Ball, Clubs, Hoop, Ribbon) or FISV; each file is a pickled dict
        {video_name: (T, C) array}
    train.txt, test.txt (in ROOT or its parent, or --labels-dir): whitespace-separated, a header line,
        RG: `name Difficulty_Score Execution_Score Total_Score` (the Total_Score is the label; an RG row
            belongs to the apparatus its name starts with, e.g. Ball_12);
        Fis-V: `name TES PCS`.
    A first line whose score fields are not numbers is taken as the header (the released Fis-V files
    are read both with and without one by the reference code).

skating-mixer (FS1000, as released by Skating-Mixer, with MCMoE's flow features):
    ROOT/<rgb dir>/<video>.npy (T, clips, 768), averaged over clips; ROOT/<flow dir>/<video>.npy and
    ROOT/<audio dir>/<video>.npy (T, C); label files without header, one video per line:
    `name TES PCS SS TR PE CO IN pcs_factor`. PCS is divided by the factor (the reference protocol).
    The reference's "val" file is its test set; it becomes split=test here.

Output: one cache configuration folder per feature set (one per RG apparatus, since each is trained
separately), with labels/<target>.csv (`video_id,score,split`, split train/test) inside it. A video
missing from one modality's file is recorded with that modality missing, like a clip without audio.

Pickle: the pamfn dictionaries can only be read by unpickling (np.load(allow_pickle=True)), which can
run code hidden in a file. This module is the only place in the project that unpickles, and only
the files the user names; import only files from a source you trust.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
import numpy as np

from manifests.cache import DONE, MISSING, CacheConfig, FeatureCache, ModalityRecord, VideoRecord, open_cache
from manifests.files import atomic_write_bytes, rows_to_csv

RG_ACTIONS = ("Ball", "Clubs", "Hoop", "Ribbon")
FISV_NAME = "FISV"
PAMFN_FILES = {"rgb": "rgb_VST", "flow": "flow_I3D", "audio": "audio_AST"}  # {Name}_{this}.npy
PAMFN_BACKBONES = {"rgb": "VST", "flow": "I3D", "audio": "AST"}
FS1000_SCORES = ("TES", "PCS", "SS", "TR", "PE", "CO", "IN")  # label file columns 1..7; column 8: PCS factor
FS1000_DIRS = {"rgb": "output_feature_fs1000_new", "flow": "i3d_avg_clip8_5s_fs1000", "audio": "ast_feature_fs1000_new"}
FS1000_LABELS = {"train": "train_fs1000_new.txt", "test": "val_fs1000_new.txt"}
FS1000_BACKBONES = {"rgb": "TimeSformer", "flow": "I3D", "audio": "AST"}
MODALITIES = ("rgb", "flow", "audio")


class FeatureImportError(ValueError):
    """A published file is missing or not in the expected layout; the message names it."""


@dataclass
class ImportedSet:
    name: str  # "rg/Ball", "fisv", "fs1000"
    cache: FeatureCache
    labels: dict[str, Path] = field(default_factory=dict)  # target -> labels CSV
    num_videos: int = 0
    warnings: list[str] = field(default_factory=list)
    source: Path | None = None  # the folder the features were read from


# --------------------------------------------------------------------------- shared writing


def _safe_id(name: str, source: Path) -> str:
    if not name or name.startswith(("/", ".")) or ".." in Path(name).parts or "\\" in name:
        raise FeatureImportError(f"{source}: video name {name!r} cannot be used as a video id")
    return name


def _as_2d(array: np.ndarray, where: str) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim == 3:  # (T, clips, C): the per-clip outputs of a window, averaged as the reference does
        array = array.mean(axis=1)
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.number):
        raise FeatureImportError(f"{where}: expected a (T, C) or (T, clips, C) numeric array, got {array.shape} {array.dtype}")
    return np.ascontiguousarray(array, dtype=np.float32)


def _write_set(
    out: Path,
    description: dict,
    videos: dict[str, dict[str, np.ndarray]],
    sources: dict[str, str],
    backbones: dict[str, str],
) -> tuple[FeatureCache, list[str]]:
    """Write features + records of one feature set into OUT/<hash>/; returns the cache and warnings."""
    dims: dict[str, int] = {}
    for video_id, arrays in videos.items():
        for modality, array in arrays.items():
            if dims.setdefault(modality, array.shape[1]) != array.shape[1]:
                raise FeatureImportError(
                    f"{sources[video_id]}: {modality} of {video_id!r} is {array.shape[1]}-d, other videos are {dims[modality]}-d"
                )
    missing_modalities = [m for m in MODALITIES if m not in dims]
    if missing_modalities:
        raise FeatureImportError(f"no {missing_modalities} features found for {description.get('dataset')}")
    extractors = {
        m: {"name": backbones[m], "version": "published", "feature_dim": dims[m], "origin": description["format"]}
        for m in MODALITIES
    }
    cache = open_cache(out, CacheConfig.imported(**description, modalities=list(MODALITIES), extractors=extractors))

    warnings, trimmed = [], 0
    for video_id in sorted(videos):
        arrays = videos[video_id]
        lengths = {m: a.shape[0] for m, a in arrays.items()}
        length = min(lengths.values())
        if len(set(lengths.values())) > 1:
            trimmed += 1  # the reference crops every modality with one offset: keep the common span
        modalities = {}
        for modality in MODALITIES:
            if modality in arrays:
                array = arrays[modality][:length]
                cache.save_features(video_id, modality, array)
                modalities[modality] = ModalityRecord(DONE, list(array.shape), backbones[modality], "published")
            else:
                modalities[modality] = ModalityRecord(MISSING, reason=f"not in the published {modality} features")
        cache.write_record(VideoRecord(
            video_id=video_id, path=sources[video_id], status=DONE, num_segments=length,
            modalities=modalities, random_weights=False,
        ))
    if trimmed:
        warnings.append(f"{trimmed} video(s) had modalities of different lengths; each was cut to its shortest")
    absent = sum(len(MODALITIES) - len(a) for a in videos.values())
    if absent:
        warnings.append(f"{absent} (video, modality) pair(s) absent from the published files, recorded as missing")
    cache.write_manifest()
    return cache, warnings


def _write_labels(path: Path, rows: list[tuple[str, float, str]]) -> None:
    text = rows_to_csv([["video_id", "score", "split"], *([v, repr(s), split] for v, s, split in rows)])
    atomic_write_bytes(path, text.encode())


def _read_table(path: Path, columns: int, has_header: bool | None) -> list[tuple[int, list[str]]]:
    """(line number, fields) per data line; fields split on whitespace or commas. has_header None: detect."""
    if not path.is_file():
        raise FeatureImportError(f"label file {path} does not exist")
    rows, first = [], True
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        fields = [f for f in re.split(r"[,\s]+", line.strip()) if f]
        if first:
            first = False
            if has_header or (has_header is None and not _numeric(fields[1:columns])):
                continue
        if len(fields) < columns:
            raise FeatureImportError(f"{path} line {number}: {len(fields)} field(s), expected at least {columns}")
        if not _numeric(fields[1:columns]):
            raise FeatureImportError(f"{path} line {number}: scores {fields[1:columns]} are not all numbers")
        rows.append((number, fields))
    return rows


def _numeric(fields: list[str]) -> bool:
    try:
        [float(f) for f in fields]
    except ValueError:
        return False
    return bool(fields)


# --------------------------------------------------------------------------- pamfn


def _load_pickled_dict(path: Path) -> dict[str, np.ndarray]:
    # The one unpickling read in the project (see the module docstring).
    try:
        loaded = np.load(path, allow_pickle=True)
    except (OSError, ValueError) as exc:
        raise FeatureImportError(f"cannot read {path}: {exc}") from None
    if not (isinstance(loaded, np.ndarray) and loaded.dtype == object and loaded.shape == ()):
        raise FeatureImportError(f"{path}: expected a pickled dict {{video_name: (T, C) array}}, got an array {loaded.shape}")
    table = loaded.item()
    if not isinstance(table, dict):
        raise FeatureImportError(f"{path}: expected a dict of video name -> array, got {type(table).__name__}")
    return table


def _find_label_dir(root: Path, labels_dir: Path | None) -> Path:
    candidates = [labels_dir] if labels_dir else [root, root.parent]
    for folder in candidates:
        if (folder / "train.txt").is_file() and (folder / "test.txt").is_file():
            return folder
    raise FeatureImportError(f"train.txt and test.txt not found in {', '.join(map(str, candidates))}; pass --labels-dir")


def find_pamfn_folder(root: Path) -> Path:
    """ROOT if it holds the *_rgb_VST.npy dictionaries, else the one folder inside it that does: the
    published downloads unpack as RG/RG-feature/ and Fis-V/Fis-feature/ beside train.txt / test.txt."""
    if any(root.glob("*_rgb_VST.npy")):
        return root
    below = sorted({p.parent for p in root.glob("*/*_rgb_VST.npy")})
    if len(below) > 1:
        raise FeatureImportError(f"{root}: several folders hold *_rgb_VST.npy dictionaries "
                                 f"({', '.join(p.name for p in below)}); pass one of them as --root")
    if not below:
        raise FeatureImportError(f"{root} holds no *_rgb_VST.npy dictionaries (the PAMFN layout), nor does a "
                                 "folder inside it (such as RG-feature/ or Fis-feature/)")
    return below[0]


def import_pamfn(
    root: Path, out: Path, action: str | None = None, labels_dir: Path | None = None
) -> list[ImportedSet]:
    """Import every RG apparatus / Fis-V dictionary found in ROOT or a folder inside it (or only `action`)."""
    root, out = find_pamfn_folder(Path(root).expanduser()), Path(out).expanduser()
    names = sorted({p.name.split("_")[0] for p in root.glob("*_rgb_VST.npy")})
    if action is not None:
        matches = [n for n in names if n.lower() == action.lower()]
        if not matches:
            raise FeatureImportError(f"{root} has no {action}_rgb_VST.npy (found: {names or 'none'})")
        names = matches
    label_dir = _find_label_dir(root, labels_dir)
    results = []
    for name in names:
        tables, sources = {}, {}
        for modality, suffix in PAMFN_FILES.items():
            path = root / f"{name}_{suffix}.npy"
            if not path.is_file():
                raise FeatureImportError(f"{path} is missing (the {name} set needs rgb, flow and audio dictionaries)")
            tables[modality] = _load_pickled_dict(path)
            sources[modality] = path.name
        video_names = sorted(set().union(*tables.values()))
        videos = {}
        for video in video_names:
            video_id = _safe_id(str(video), root)
            videos[video_id] = {
                m: _as_2d(t[video], f"{root / sources[m]}[{video!r}]") for m, t in tables.items() if video in t
            }
        source_of = {v: str(root / sources["rgb"]) for v in videos}
        dataset = "fisv" if name.upper() == FISV_NAME else "rg"
        description = {"format": "pamfn", "dataset": dataset, "subset": name, "protocol": "rg"}
        cache, warnings = _write_set(out, description, videos, source_of, PAMFN_BACKBONES)
        result = ImportedSet(f"{dataset}/{name}" if dataset == "rg" else dataset, cache, num_videos=len(videos),
                             warnings=warnings, source=root)

        targets = {name: 3} if dataset == "rg" else {"TES": 1, "PCS": 2}
        width = 4 if dataset == "rg" else 3
        label_rows: dict[str, list[tuple[str, float, str]]] = {t: [] for t in targets}
        unknown = []
        for split in ("train", "test"):
            path = label_dir / f"{split}.txt"
            for number, fields in _read_table(path, width, None):
                video = fields[0]
                if dataset == "rg" and video.split("_")[0] != name:
                    continue  # another apparatus's row
                if video not in videos:
                    unknown.append(f"{path.name} line {number}: {video}")
                    continue
                for target, column in targets.items():
                    label_rows[target].append((video, float(fields[column]), split))
        if unknown:
            result.warnings.append(f"{len(unknown)} labelled video(s) have no features and were left out (e.g. {unknown[0]})")
        for target, rows in label_rows.items():
            if not rows:
                raise FeatureImportError(f"{label_dir}: no labels for {name} in train.txt / test.txt")
            path = cache.root / "labels" / f"{target}.csv"
            _write_labels(path, rows)
            result.labels[target] = path
        unlabelled = len(videos) - len({v for v, _, _ in next(iter(label_rows.values()))})
        if unlabelled:
            result.warnings.append(f"{unlabelled} video(s) have features but no label")
        results.append(result)
    return results


# --------------------------------------------------------------------------- skating-mixer (FS1000)


def import_skating_mixer(
    root: Path, out: Path, dirs: dict[str, str] | None = None, label_files: dict[str, str] | None = None
) -> list[ImportedSet]:
    """Import FS1000: one .npy per video per modality, seven score types."""
    root, out = Path(root).expanduser(), Path(out).expanduser()
    dirs = {**FS1000_DIRS, **(dirs or {})}
    label_files = {**FS1000_LABELS, **(label_files or {})}
    folders = {m: root / d for m, d in dirs.items()}
    for modality, folder in folders.items():
        if not folder.is_dir():
            raise FeatureImportError(f"{folder} ({modality} features) does not exist; pass --{modality}-dir")
    files = {m: {p.stem: p for p in sorted(f.glob("*.npy"))} for m, f in folders.items()}
    videos, sources = {}, {}
    for video in sorted(set().union(*files.values())):
        video_id = _safe_id(video, root)
        arrays = {}
        for modality in MODALITIES:
            path = files[modality].get(video)
            if path is None:
                continue
            try:
                array = np.load(path, allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise FeatureImportError(f"cannot read {path}: {exc}") from None
            arrays[modality] = _as_2d(array, str(path))
        videos[video_id] = arrays
        sources[video_id] = str(next(files[m][video] for m in MODALITIES if video in files[m]))
    if not videos:
        raise FeatureImportError(f"no .npy features under {', '.join(map(str, folders.values()))}")
    description = {"format": "skating-mixer", "dataset": "fs1000", "subset": None, "protocol": "fs1000"}
    cache, warnings = _write_set(out, description, videos, sources, FS1000_BACKBONES)
    result = ImportedSet("fs1000", cache, num_videos=len(videos), warnings=warnings)

    label_rows: dict[str, list[tuple[str, float, str]]] = {t: [] for t in FS1000_SCORES}
    unknown = []
    for split, name in label_files.items():
        path = Path(name) if Path(name).is_absolute() else root / name
        for number, fields in _read_table(path, 9, False):
            video = fields[0]
            if video not in videos:
                unknown.append(f"{path.name} line {number}: {video}")
                continue
            factor = float(fields[8])
            if factor == 0:
                raise FeatureImportError(f"{path} line {number}: PCS factor is 0")
            for column, target in enumerate(FS1000_SCORES, start=1):
                score = float(fields[column])
                label_rows[target].append((video, score / factor if target == "PCS" else score, split))
    if unknown:
        result.warnings.append(f"{len(unknown)} labelled video(s) have no features and were left out (e.g. {unknown[0]})")
    for target, rows in label_rows.items():
        path = cache.root / "labels" / f"{target}.csv"
        _write_labels(path, rows)
        result.labels[target] = path
    return [result]
