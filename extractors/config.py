"""The extraction configuration: everything that decides what a feature row contains.

It is recorded as JSON beside the features it produced (inside the cache's config.json, see
manifests/cache.py), and its hash names the cache folder, so features made with different settings
never mix. Settings that only change how fast features are made (device, batch size, workers) are
deliberately not part of it. A new field's default must reproduce the features the existing caches
hold: a field enters the hash only when set to something else (manifests/hashing.py), so every existing
cache keeps its folder name. A backbone's own settings are fields of its settings class
(extractors/settings.py), under the same rule.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, ClassVar

from extractors.recipes import PROJECT, recipe
from extractors.settings import BackboneSettings, settings_class, settings_in_precision
from manifests.config import ConfigError, RecordedConfig
from manifests.hashing import feature_hash, hashed_fields

PROTOCOLS = ("rg", "fs1000")
BACKBONE_MODES = ("pretrained", "random")
ARCH_SIZES = ("full", "tiny")
FEATURE_DTYPES = ("float32", "float16")
# What the backbones compute in: fp32, or bf16 (autocast: matmuls and convolutions in bfloat16, features
# written as float32) on hardware that computes bf16 natively (pipeline/devices.py native_bf16).
PRECISIONS = ("fp32", "bf16")

# The published feature sets put these backbones behind each modality (docs/design/features.md).
DEFAULT_BACKBONES = {"rgb": "vst", "flow": "raft", "audio": "ast"}
CPU_FLOW_BACKBONE = "farneback"  # RAFT is a deep network; Farneback, no network at all, suits a CPU.

# The settings layout 1 holds at the top level, one value for every backbone; layout 2 gives each
# backbone its own (extractors/settings.py). The hash spells them as layout 1 does, so layout 1's caches
# keep their folder names (config_hash).
LAYOUT_1_SETTINGS = ("attention", "memory_format", "cpu_linear", "flow_runtime")


@dataclass
class ExtractionConfig(RecordedConfig):
    """How raw video becomes one feature row per segment per modality.

    protocol "rg" (RG and Fis-V): non-overlapping windows of `segment_frames` frames taken every
    `frame_stride`-th frame, remainder dropped; each window is one backbone clip.
    protocol "fs1000": windows of `window_seconds` every `hop_seconds`; inside a window,
    non-overlapping `clip_frames`-frame clips go through the frame backbones and are averaged.
    Audio always sees the whole window's time span.

    `backbones` names each modality's backbone and `settings` holds that backbone's own settings
    (extractors/settings.py); a modality left out of `settings` gets its backbone's defaults.
    """

    SCHEMA_VERSION: ClassVar[int] = 2
    RETIRED_KEYS: ClassVar[dict[str, str]] = {
        "onnxruntime_modalities": (
            "was written by `pipeline extract` of 534dd3a (--onnxruntime, replaced by --flow-runtime in 10579f8) "
            "and is not read: if it is [] (torch, the default), delete the key from the file (the features and "
            "their folder name are today's); else extract the videos again with --flow-runtime onnxruntime into a "
            "new --out folder and train on those"),
    }

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
    decode_short_side: int = 256  # frames are resized to this at decode time, before any backbone; 0: source size
    audio_sample_rate: int = 16000
    feature_dtype: str = "float32"
    frame_rate: float = 0.0  # frames per second the video is resampled to before segmenting; 0: its own rate
    recipe: str = PROJECT  # the named configuration these values reproduce (extractors/recipes.py)
    precision: str = "fp32"  # one of PRECISIONS; bf16 moves features by about 1e-2 of their scale, so it is hashed
    # {modality: {weights file: "sha256:<hex>"}} of pretrained files that are not the public files the
    # backbones name: a file whose public SHA-256 is known (torchvision's names carry a prefix of it) and
    # whose content differs, so other weights get a folder of their own. Empty (as in every cache made before
    # weights were identified): the public files, or files of which no public SHA-256 is known (config.json
    # records their SHA-256, and a cache is only extended with the same ones). Set from the files by
    # extractors.base.identify_weights before the cache folder is chosen.
    weights_sha256: dict[str, dict[str, str]] = field(default_factory=dict)
    # Hashed through `settings_hash` (each non-default setting), not as a whole.
    settings: dict[str, BackboneSettings] = field(default_factory=dict, metadata={"hash": False})

    # Hashed whatever their value: every existing cache's folder name covers all of them. Any other field
    # enters only when it differs from its default (see the module docstring).
    HASHED_SINCE_V1: ClassVar[tuple[str, ...]] = (
        "protocol", "segment_frames", "frame_stride", "window_seconds", "hop_seconds", "clip_frames", "modalities",
        "backbones", "weights", "arch_size", "seed", "decode_short_side", "audio_sample_rate", "feature_dtype",
    )

    def __post_init__(self) -> None:
        self.check_segmentation(self.protocol, self.weights, self.arch_size, self.segment_frames, self.frame_stride,
                                self.clip_frames, self.feature_dtype)
        missing = [m for m in self.modalities if m not in self.backbones]
        if missing:
            raise ValueError(f"no backbone chosen for modalities {missing}")
        # Keep only the backbones of extracted modalities so the hash does not depend on unused choices.
        self.modalities = tuple(self.modalities)
        self.backbones = {m: self.backbones[m] for m in self.modalities}
        self.settings = {m: self._backbone_settings(m) for m in self.modalities}
        if self.weights_sha256 and self.random_weights:
            raise ValueError("weights_sha256 names pretrained weights files; random weights have none")
        if self.decode_short_side < 0 or self.frame_rate < 0:
            raise ValueError("decode_short_side and frame_rate must be >= 0 (0: the video's own size / rate)")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.extra_frames and self.protocol != "rg":
            raise ValueError("flow_pairs 'crossing' needs the rg protocol (one clip per segment)")
        self.check_recipe()

    def check_recipe(self) -> None:
        """ValueError naming the first value that is not the recipe's: a config that says it is a recipe's
        features is made exactly as the recipe says (its optional settings excepted)."""
        chosen = recipe(self.recipe)
        for name, value in chosen.config.items():
            if getattr(self, name) != value:
                raise ValueError(f"recipe {self.recipe} has {name} {value!r}, not {getattr(self, name)!r}")
        for modality in self.modalities:
            wanted = chosen.backbones.get(modality, self.backbones[modality])
            if self.backbones[modality] != wanted:
                raise ValueError(f"recipe {self.recipe} extracts {modality} with {wanted}, not {self.backbones[modality]}")
            for name, value in chosen.settings.get(modality, {}).items():
                have = getattr(self.settings[modality], name)
                if name not in chosen.optional and have != value:
                    raise ValueError(f"recipe {self.recipe} has the {modality} setting {name} {value!r}, not {have!r}")

    @staticmethod
    def check_segmentation(protocol: str, weights: str, arch_size: str, segment_frames: int, frame_stride: int,
                           clip_frames: int, feature_dtype: str) -> None:
        """ValueError naming the first of these settings that is not allowed: checkable before the
        backbones are chosen (the command line's flow default waits for the device)."""
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
        if weights not in BACKBONE_MODES:
            raise ValueError(f"weights must be one of {BACKBONE_MODES}, got {weights!r}")
        if arch_size not in ARCH_SIZES:
            raise ValueError(f"arch_size must be one of {ARCH_SIZES}, got {arch_size!r}")
        if arch_size == "tiny" and weights != "random":
            raise ValueError("tiny architectures have no pretrained weights: use weights='random'")
        if segment_frames < 2 or frame_stride < 1 or clip_frames < 2:
            raise ValueError("segment_frames and clip_frames must be >= 2, frame_stride >= 1")
        if feature_dtype not in FEATURE_DTYPES:
            raise ValueError(f"feature_dtype must be one of {FEATURE_DTYPES}")

    def _backbone_settings(self, modality: str) -> BackboneSettings:
        name, given = self.backbones[modality], self.settings.get(modality)
        cls = settings_class(modality, name)
        if given is None:
            return cls()
        if isinstance(given, dict):
            try:
                return cls.from_dict(given, source=f"the settings of the {modality} backbone {name}")
            except ConfigError:
                raise
            except ValueError as exc:
                raise ValueError(f"the {modality} backbone {name}: {exc}") from None
        if type(given) is not cls:
            raise ValueError(f"the {modality} backbone {name} takes {cls.__name__}, got {type(given).__name__}")
        return given

    @classmethod
    def from_recipe(cls, name: str, modalities: tuple[str, ...] | None = None, backbones: dict[str, str] | None = None,
                    settings: dict[str, dict[str, Any]] | None = None, **fields: Any) -> ExtractionConfig:
        """The recipe's configuration; `modalities` defaults to the recipe's (or every modality), and
        `backbones`, `settings` (modality -> {setting: value}) and `fields` add to or replace its values
        (check_recipe refuses a replaced value unless the recipe lets it be changed)."""
        chosen = recipe(name)
        modalities = tuple(modalities or chosen.backbones or cls.modalities)
        backbones = {**DEFAULT_BACKBONES, **chosen.backbones, **(backbones or {})}
        given = settings or {}
        merged = {m: {**chosen.settings.get(m, {}), **given.get(m, {})} for m in modalities}
        return cls(**{**chosen.config, **fields}, recipe=name, modalities=modalities, backbones=backbones,
                   settings=merged)

    @classmethod
    def upgrade(cls, data: dict[str, Any], version: int) -> dict[str, Any]:
        """Layout 1 -> 2: the top-level settings go to the extracted backbones that declare them. One no
        extracted backbone declares had no effect on the features, and is dropped."""
        data = dict(data)
        values = {name: data.pop(name) for name in LAYOUT_1_SETTINGS if name in data}
        settings = {}
        for modality in data.get("modalities", cls.modalities):
            try:
                declared = fields(settings_class(modality, data.get("backbones", DEFAULT_BACKBONES).get(modality)))
            except ValueError:
                continue  # an unknown backbone: __post_init__ names it
            settings[modality] = {f.name: values[f.name] for f in declared if f.name in values}
        return {**data, "settings": settings}

    def in_precision(self, precision: str, device_type: str) -> ExtractionConfig:
        """This extraction computed in `precision` on `device_type`, each backbone setting that goes with
        the precision (settings_in_precision: Video Swin's attention on a CPU) moved along with it."""
        return replace(self, precision=precision, settings={
            m: settings_in_precision(s, precision, device_type) for m, s in self.settings.items()})

    @property
    def frames_per_clip(self) -> int:
        """Frames in one frame-backbone input: the whole segment (rg) or one clip of a window (fs1000)."""
        return self.segment_frames if self.protocol == "rg" else self.clip_frames

    def recipe_description(self) -> dict[str, Any] | None:
        """What config.json says about the recipe besides its values (None for the project's own)."""
        return None if self.recipe == PROJECT else recipe(self.recipe).describe()

    @property
    def extra_frames(self) -> int:
        """Frames read after each clip's own: 2 when a backbone's last flow is the pair crossing into the
        next segment (flow_pairs "crossing": the pair's two frames follow the clip's)."""
        return 2 if any(getattr(s, "flow_pairs", None) == "crossing" for s in self.settings.values()) else 0

    @property
    def random_weights(self) -> bool:
        return self.weights == "random"

    def config_hash(self) -> str:
        """The name of this configuration's cache folder (OUT/<config-hash>/)."""
        return feature_hash({**hashed_fields(self, self.HASHED_SINCE_V1), **self.settings_hash()})

    def settings_hash(self) -> dict[str, Any]:
        """The backbones' non-default settings as the hash spells them: `name: value` when every extracted
        backbone declaring `name` has that value (layout 1's one top-level value, so its caches keep their
        folder names), else `modality.name: value` for each backbone whose value is not the default."""
        changed = {m: s.changed() for m, s in self.settings.items()}
        out: dict[str, Any] = {}
        for m, values in changed.items():
            for name, value in values.items():
                declaring = [o for o, s in self.settings.items() if name in {f.name for f in fields(s)}]
                if all(changed[o].get(name, _DEFAULT) == value for o in declaring):
                    out[name] = value
                else:
                    out[f"{m}.{name}"] = value
        return out


_DEFAULT = object()
