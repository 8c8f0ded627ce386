"""The extraction configuration: everything that decides what a feature row contains.

It is recorded as JSON beside the features it produced (inside the cache's config.json, see
manifests/cache.py), and its hash names the cache folder, so features made with different settings
never mix. Settings that only change how fast features are made (device, batch size, workers) are
deliberately not part of it. A field added from now on must have a default that reproduces today's
features: it then enters the hash only when set to something else (manifests/hashing.py), so the
caches made before it keep their names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from manifests.config import RecordedConfig
from manifests.hashing import feature_hash, hashed_fields

PROTOCOLS = ("rg", "fs1000")
BACKBONE_MODES = ("pretrained", "random")
ARCH_SIZES = ("full", "tiny")
ATTENTIONS = ("fused", "reference")
MEMORY_FORMATS = ("channels_last", "contiguous")
CPU_LINEARS = ("onednn", "torch")
# Which library runs the flow stream's I3D: torch, or ONNX Runtime / OpenVINO on a CPU, where they
# measured faster than eager torch (benchmarks/bench_cpu_backends.py; extractors/cpu_runtimes.py).
FLOW_RUNTIMES = ("torch", "onnxruntime", "openvino")

# The published feature sets put these backbones behind each modality (docs/design/features.md).
DEFAULT_BACKBONES = {"rgb": "vst", "flow": "raft", "audio": "ast"}
CPU_FLOW_BACKBONE = "farneback"  # RAFT is the GPU default; on a CPU Farneback is ~50x cheaper.

# The registry's names, known without importing a backbone (and torch): the command line is built
# from this table in milliseconds. tests/test_backbones.py checks it against the real registry.
BACKBONE_NAMES: dict[str, tuple[str, ...]] = {
    "rgb": ("vst", "timesformer"),
    "flow": ("raft", "farneback", "tvl1"),
    "audio": ("ast",),
}


@dataclass
class ExtractionConfig(RecordedConfig):
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
    # Video Swin's window attention: "fused" (one kernel; the default since this field exists) or
    # "reference" (torchvision's own code, which every cache made before the field used). Both give the
    # same features up to float rounding, so the default keeps old caches' folder names; "reference"
    # enters the hash and gets its own folder.
    attention: str = "fused"
    # How I3D's 3D convolutions hold their activations: "channels_last" (1.29x faster I3D on a CPU; the
    # default since this field exists) or "contiguous" (every cache made before the field). Same features
    # up to float rounding, so, as with `attention`, only "contiguous" enters the hash.
    memory_format: str = "channels_last"
    # Which library multiplies the transformers' linear layers on a CPU: "onednn" (the default since this
    # field exists; AVX-512 where the CPU has it, see extractors/onednn.py) or "torch" (MKL, as every cache
    # before it). Same features up to float rounding, so only "torch" enters the hash. No effect on a GPU.
    cpu_linear: str = "onednn"
    # The library that runs the I3D of the flow modality (FLOW_RUNTIMES): "torch", or on a CPU "onnxruntime"
    # or "openvino" (optional packages; 1.3-1.7x the I3D's rate on a 2-core CPU). Features agree with
    # torch's to float rounding but not bitwise, so another runtime enters the hash: a folder of its own.
    flow_runtime: str = "torch"

    # The fields every cache folder name was computed from when the hash was introduced: hashed whatever
    # their value. Later fields enter only when they differ from their defaults (see the module docstring).
    HASHED_SINCE_V1: ClassVar[tuple[str, ...]] = (
        "protocol", "segment_frames", "frame_stride", "window_seconds", "hop_seconds", "clip_frames", "modalities",
        "backbones", "weights", "arch_size", "seed", "decode_short_side", "audio_sample_rate", "feature_dtype",
    )

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
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {self.attention!r}")
        if self.memory_format not in MEMORY_FORMATS:
            raise ValueError(f"memory_format must be one of {MEMORY_FORMATS}, got {self.memory_format!r}")
        if self.cpu_linear not in CPU_LINEARS:
            raise ValueError(f"cpu_linear must be one of {CPU_LINEARS}, got {self.cpu_linear!r}")
        if self.flow_runtime not in FLOW_RUNTIMES:
            raise ValueError(f"flow_runtime must be one of {FLOW_RUNTIMES}, got {self.flow_runtime!r}")
        missing = [m for m in self.modalities if m not in self.backbones]
        if missing:
            raise ValueError(f"no backbone chosen for modalities {missing}")
        # Keep only the backbones of extracted modalities so the hash does not depend on unused choices.
        self.modalities = tuple(self.modalities)
        self.backbones = {m: self.backbones[m] for m in self.modalities}
        if "flow" not in self.modalities:
            self.flow_runtime = "torch"  # nothing runs it: not part of the hash either

    @property
    def frames_per_clip(self) -> int:
        """Frames in one frame-backbone input: the whole segment (rg) or one clip of a window (fs1000)."""
        return self.segment_frames if self.protocol == "rg" else self.clip_frames

    @property
    def random_weights(self) -> bool:
        return self.weights == "random"

    def config_hash(self) -> str:
        """The name of this configuration's cache folder (OUT/<config-hash>/)."""
        return feature_hash(hashed_fields(self, self.HASHED_SINCE_V1))
