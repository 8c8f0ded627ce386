"""The extraction configuration: everything that decides what a feature row contains.

It is recorded as JSON beside the features it produced, and its hash names the cache folder, so
features made with different settings never mix. Settings that only change how fast features are
made (device, batch size, workers) are deliberately left out of the hash.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

PROTOCOLS = ("rg", "fs1000")
BACKBONE_MODES = ("pretrained", "random")
ARCH_SIZES = ("full", "tiny")

# The published feature sets put these backbones behind each modality (DESIGN.md section 2).
DEFAULT_BACKBONES = {"rgb": "vst", "flow": "raft", "audio": "ast"}
CPU_FLOW_BACKBONE = "farneback"  # RAFT is the GPU default; on a CPU Farneback is ~50x cheaper.

# The registry's names, known without importing a backbone (and torch): the command line is built
# from this table in milliseconds. tests/test_backbones.py checks it against the real registry.
BACKBONE_NAMES: dict[str, tuple[str, ...]] = {
    "rgb": ("vst", "timesformer"),
    "flow": ("raft", "farneback", "tvl1"),
    "audio": ("ast",),
}


@dataclass(frozen=True)
class ExtractionConfig:
    """How raw video becomes one feature row per segment per modality.

    protocol "rg" (RG and Fis-V): non-overlapping windows of `segment_frames` frames taken every
    `frame_stride`-th frame, remainder dropped; each window is one backbone clip.
    protocol "fs1000": windows of `window_seconds` every `hop_seconds`; inside a window,
    non-overlapping `clip_frames`-frame clips go through the frame backbones and are averaged.
    Audio always sees the whole window's time span.
    """

    protocol: str = "rg"
    segment_frames: int = 32
    frame_stride: int = 1
    window_seconds: float = 5.0
    hop_seconds: float = 2.0
    clip_frames: int = 8
    modalities: tuple[str, ...] = ("rgb", "flow", "audio")
    backbones: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_BACKBONES))
    weights: str = "pretrained"  # "pretrained" | "random"
    arch_size: str = "full"  # "tiny" shrinks every backbone for tests and smoke runs (random weights only)
    seed: int = 0  # seeds random-weight backbones so two runs give identical features
    decode_short_side: int = 256  # frames are resized to this at decode time, before any backbone
    audio_sample_rate: int = 16000
    feature_dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {self.protocol!r}")
        if self.weights not in BACKBONE_MODES:
            raise ValueError(f"weights must be one of {BACKBONE_MODES}, got {self.weights!r}")
        if self.arch_size not in ARCH_SIZES:
            raise ValueError(f"arch_size must be one of {ARCH_SIZES}, got {self.arch_size!r}")
        if self.arch_size == "tiny" and self.weights != "random":
            raise ValueError("tiny architectures have no pretrained weights: use weights='random'")
        if self.segment_frames < 2 or self.frame_stride < 1 or self.clip_frames < 2:
            raise ValueError("segment_frames and clip_frames must be >= 2, frame_stride >= 1")
        if self.feature_dtype not in ("float32", "float16"):
            raise ValueError("feature_dtype must be float32 or float16")
        missing = [m for m in self.modalities if m not in self.backbones]
        if missing:
            raise ValueError(f"no backbone chosen for modalities {missing}")
        # Keep only the backbones of extracted modalities so the hash does not depend on unused choices.
        object.__setattr__(self, "modalities", tuple(self.modalities))
        object.__setattr__(self, "backbones", {m: self.backbones[m] for m in self.modalities})

    @property
    def frames_per_clip(self) -> int:
        """Frames in one frame-backbone input: the whole segment (rg) or one clip of a window (fs1000)."""
        return self.segment_frames if self.protocol == "rg" else self.clip_frames

    @property
    def random_weights(self) -> bool:
        return self.weights == "random"

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["modalities"] = list(self.modalities)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ExtractionConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        if "modalities" in kwargs:
            kwargs["modalities"] = tuple(kwargs["modalities"])
        return cls(**kwargs)

    def config_hash(self) -> str:
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha1(canonical.encode()).hexdigest()[:12]
