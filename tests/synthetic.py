"""Small synthetic feature caches for tests: a score carried by a latent shared across modalities.

Each video has a hidden quality q in [0, 1]; its score is q * score_range. Every segment of every
modality is q times a fixed per-modality direction, plus a per-video nuisance pattern and noise
(optionally smoother in time the better the video, see `smoothness`), so each modality alone predicts
the score, and modalities together predict it better.

    made = write_synthetic_cache(tmp_path / "cache", num_videos=40, absent={"vid003": ["audio"]})
    write_labels(tmp_path / "labels.csv", made.scores)
    FeatureCache.open(made.cache.root)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from manifests.cache import DONE, MISSING, CacheConfig, FeatureCache, ModalityRecord, VideoRecord

DEFAULT_DIMS = {"rgb": 16, "flow": 12, "audio": 8}


@dataclass
class SyntheticCache:
    cache: FeatureCache
    scores: dict[str, float]  # video_id -> score on the original scale
    quality: dict[str, float]  # video_id -> latent in [0, 1]
    score_range: float

    @property
    def video_ids(self) -> list[str]:
        return list(self.scores)


def video_id(index: int) -> str:
    return f"vid{index:03d}"


def write_synthetic_cache(
    root: str | Path,
    num_videos: int = 40,
    length_range: tuple[int, int] = (8, 12),
    feature_dims: Mapping[str, int] | None = None,
    absent: Mapping[str, Sequence[str]] | None = None,
    seed: int = 0,
    noise: float = 1.0,
    level: float = 1.0,
    smoothness: float = 0.0,
    score_range: float = 10.0,
    random_weights: bool = False,
) -> SyntheticCache:
    """Write a FeatureCache under ROOT/synthetic/ with `num_videos` videos (ids vid000, vid001, ...).

    length_range: inclusive (min, max) number of segments T per video (shared by its modalities).
    feature_dims: {modality: C}, in the cache's modality order (default rgb 16, flow 12, audio 8).
    absent: {video_id: [modalities it lacks]}, recorded as status "missing" (no .npy written).
    noise: standard deviation of the per-segment noise.
    level: strength of the static signal level * q * direction (the direction has norm ~3).
    smoothness: the noise is an AR(1) process over segments with coefficient smoothness * (2q - 1)
        and unit variance, so q also shows in how smoothly features change in time (a signal only a
        model of temporal context can read; a per-segment model sees none of it). 0: white noise.
    """
    dims = dict(feature_dims or DEFAULT_DIMS)
    absent = {k: list(v) for k, v in (absent or {}).items()}
    rng = np.random.default_rng(seed)
    directions = {m: rng.standard_normal(c) * 3.0 / np.sqrt(c) for m, c in dims.items()}
    cache = FeatureCache(Path(root) / "synthetic")
    cache.write_config(CacheConfig(
        config_hash="synthetic",
        source="synthetic",
        modalities=list(dims),
        extractors={m: {"name": "synthetic", "version": "1", "feature_dim": c} for m, c in dims.items()},
        random_weights=random_weights,
        dataset="synthetic",
        subset=f"seed {seed}",
    ))
    scores, quality = {}, {}
    for index in range(num_videos):
        vid = video_id(index)
        q = float(rng.uniform())
        length = int(rng.integers(length_range[0], length_range[1] + 1))
        records = {}
        for modality, c in dims.items():
            nuisance = rng.standard_normal(c) * 0.5
            signal = level * q * directions[modality] + nuisance
            array = (signal[None] + noise * _ar1(rng, length, c, smoothness * (2 * q - 1))).astype(np.float32)
            if modality in absent.get(vid, ()):
                records[modality] = ModalityRecord(MISSING, reason="synthetic: absent")
                continue
            cache.save_features(vid, modality, array)
            records[modality] = ModalityRecord(DONE, [length, c], "synthetic", "1")
        if all(r.status == MISSING for r in records.values()):
            raise ValueError(f"{vid} would have no modality at all")
        cache.write_record(VideoRecord(vid, f"synthetic/{vid}", DONE, num_segments=length, modalities=records,
                                       random_weights=random_weights))
        scores[vid] = round(q * score_range, 4)
        quality[vid] = q
    cache.write_manifest()
    return SyntheticCache(cache, scores, quality, score_range)


def _ar1(rng: np.random.Generator, length: int, channels: int, phi: float) -> np.ndarray:
    """(length, channels) AR(1) noise with coefficient phi and unit stationary variance."""
    out = np.empty((length, channels))
    out[0] = rng.standard_normal(channels)
    for t in range(1, length):
        out[t] = phi * out[t - 1] + np.sqrt(1 - phi * phi) * rng.standard_normal(channels)
    return out


def write_labels(path: str | Path, scores: Mapping[str, float], splits: Mapping[str, str] | None = None) -> Path:
    """A labels CSV `video_id,score[,split]` for `scores` (and `splits`, when given)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["video_id,score" + (",split" if splits else "")]
    for vid, score in scores.items():
        lines.append(f"{vid},{score}" + (f",{splits[vid]}" if splits else ""))
    path.write_text("\n".join(lines) + "\n")
    return path
