"""Each backbone's own settings: one dataclass per backbone, registered under its (modality, name).

A field declared with `setting(default, choices, help)` is everything a new setting needs: it becomes
the command line flag `--<name with dashes>` (choices, default and help from the field; one flag
serves every backbone that declares a field of that name), it is recorded in config.json under the
modality's settings, and it enters the cache folder's hash only when it differs from its default
(extractors/config.py), so a new field's default must reproduce the features existing caches hold.
The extractor reads it as `self.settings.<name>`.

Light on purpose (no torch): the command line builds its flags from this table in milliseconds.
tests/test_backbones.py checks that it names the same backbones as the extractor registry.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

from manifests.config import RecordedConfig

SettingsT = TypeVar("SettingsT", bound=type["BackboneSettings"])


def setting(default: Any, choices: tuple[Any, ...] | None = None, help: str = "", cpu_bf16: Any = None) -> Any:
    """A settings field: its default, its allowed values (None: any value of the default's type), the
    help text its command line flag shows, and the value to take instead of the default when the
    features are computed in bf16 on a CPU (None: the default there too; see settings_from_values)."""
    return dataclasses.field(default=default, metadata={"choices": tuple(choices) if choices else None, "help": help,
                                                        "cpu_bf16": cpu_bf16})


@dataclass
class BackboneSettings(RecordedConfig):
    """The base of every backbone's settings; a backbone without settings of its own uses it as is."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value, choices = getattr(self, f.name), f.metadata.get("choices")
            if choices and value not in choices:
                raise ValueError(f"{f.name} must be one of {choices}, got {value!r}")

    def changed(self) -> dict[str, Any]:
        """The settings that differ from their defaults, as JSON values: what enters the hash."""
        data = RecordedConfig.to_dict(self)
        return {f.name: data[f.name] for f in dataclasses.fields(self) if getattr(self, f.name) != f.default}


SETTINGS: dict[tuple[str, str], type[BackboneSettings]] = {}


def backbone_settings(modality: str, *names: str) -> Callable[[SettingsT], SettingsT]:
    """Class decorator: `cls` holds the settings of the backbones `names` of `modality`. Registration
    order is the order backbones are listed in, defaults first."""

    def add(cls: SettingsT) -> SettingsT:
        for name in names:
            if (modality, name) in SETTINGS:
                raise ValueError(f"settings of backbone {(modality, name)} registered twice")
            SETTINGS[modality, name] = cls
        return cls

    return add


def backbone_names() -> dict[str, tuple[str, ...]]:
    """{modality: backbone names}, known without importing a backbone (and torch)."""
    out: dict[str, tuple[str, ...]] = {}
    for modality, name in SETTINGS:
        out[modality] = (*out.get(modality, ()), name)
    return out


def settings_class(modality: str, name: str) -> type[BackboneSettings]:
    try:
        return SETTINGS[modality, name]
    except KeyError:
        known = backbone_names()
        if modality not in known:
            raise ValueError(f"unknown modality {modality!r}; known: {sorted(known)}") from None
        raise ValueError(f"unknown {modality} backbone {name!r}; choose from {list(known[modality])}") from None


def settings_from_values(modality: str, name: str, values: dict[str, Any], precision: str = "fp32",
                         device_type: str = "cpu") -> BackboneSettings:
    """The settings of backbone `name` from `values`, a flat {setting: value} for all backbones (the
    command line's flags): the backbone takes the names it declares, the rest is not its concern.

    A setting not in `values` takes its `cpu_bf16` value for bf16 on a CPU: the value is then recorded
    and hashed like any other, so a cache says how it was made and keeps its name whatever the defaults."""
    cls = settings_class(modality, name)
    return cls(**{f.name: values[f.name] if f.name in values else default_in(f, precision, device_type)
                  for f in dataclasses.fields(cls)})


def default_in(f: dataclasses.Field, precision: str, device_type: str) -> Any:
    """A settings field's default for features computed in `precision` on `device_type`."""
    cpu_bf16 = f.metadata.get("cpu_bf16")
    return cpu_bf16 if cpu_bf16 is not None and precision == "bf16" and device_type == "cpu" else f.default


def settings_in_precision(settings: BackboneSettings, precision: str, device_type: str) -> BackboneSettings:
    """`settings` for the same features computed in `precision` on `device_type`: a setting at the value one
    precision takes by default (its default, or its `cpu_bf16` value) takes the other's; any other value stays."""
    return dataclasses.replace(settings, **{
        f.name: default_in(f, precision, device_type) for f in dataclasses.fields(settings)
        if f.metadata.get("cpu_bf16") is not None and getattr(settings, f.name) in (f.default, f.metadata["cpu_bf16"])})


def setting_fields() -> dict[str, tuple[dataclasses.Field, list[tuple[str, str]]]]:
    """{setting name: (its field, the (modality, backbone) pairs declaring it)} over every registered
    backbone. Backbones sharing a name must agree on its default and choices: it is one flag."""
    out: dict[str, tuple[dataclasses.Field, list[tuple[str, str]]]] = {}
    for key, cls in SETTINGS.items():
        for f in dataclasses.fields(cls):
            if f.name not in out:
                out[f.name] = (f, [key])
                continue
            first, owners = out[f.name]
            if (first.default, first.metadata.get("choices")) != (f.default, f.metadata.get("choices")):
                raise ValueError(f"setting {f.name!r} of backbone {key} disagrees with {owners[0]} on its default "
                                 "or choices; one flag sets both: give it another name")
            owners.append(key)
    return out


# ----------------------------------------------------------------------------- the backbones' settings


def jpeg_quality_setting() -> Any:
    """The JPEG round trip of the published recipe's uint8 images, a setting of the backbones that have them."""
    return setting(0, help="0: none; else the uint8 frames (rgb: with --frame-transform pil) or flow images (flow: "
                   "with --flow-encoding u8) go through an OpenCV JPEG encode and decode at this quality, as the "
                   "published features' files were stored (95, OpenCV's default)")


def check_jpeg_quality(quality: Any, missing: str | None) -> None:
    """ValueError unless `quality` is 0 (no round trip) or 1-100; `missing` names what a round trip needs and
    the settings lack (None: nothing)."""
    if isinstance(quality, bool) or not isinstance(quality, int) or not 0 <= quality <= 100:
        raise ValueError(f"jpeg_quality must be an integer from 0 (no JPEG) to 100, got {quality!r}")
    if quality and missing:
        raise ValueError(f"jpeg_quality {quality} round-trips uint8 images: it needs {missing}")


@dataclass
class LinearLayerSettings(BackboneSettings):
    """Backbones made of linear layers (the transformers)."""

    cpu_linear: str = setting(
        "onednn", ("onednn", "torch"),
        help="library for the linear layers on a CPU: oneDNN (AVX-512 where the CPU has it, see "
        "extractors/onednn.py) or torch's default (MKL); equal up to float rounding; no effect on a GPU")


@backbone_settings("rgb", "vst")
@dataclass
class VideoSwinSettings(LinearLayerSettings):
    attention: str = setting(
        "fused", ("fused", "matmul", "reference"),
        help="window attention: fused into one kernel, two batched matmuls per window (faster under "
        "--precision bf16 on a CPU; its scores round to bf16 there), or torchvision's reference code; equal up "
        "to float rounding",
        cpu_bf16="matmul")
    frame_transform: str = setting(
        "torch", ("torch", "pil"),
        help="how frames become the 224x224 input: torch (crop at the decode size, antialiased bilinear "
        "resize in float) or pil (the published recipe: PIL bilinear Resize(256), centre crop 224x300, "
        "Resize(224, 224), each step back to uint8)")
    jpeg_quality: int = jpeg_quality_setting()
    vst_checkpoint: str = setting(
        "torchvision-k400", ("torchvision-k400", "mmaction2-k600-22k", "mmaction2-k400-22k", "mmaction2-k400-1k"),
        help="pretrained Swin-B file: torchvision's Kinetics-400 port (swin3d_b_1k-24f7c7c6.pth), or "
        "Video-Swin-Transformer's own swin_base_patch244_window877_{kinetics600_22k,kinetics400_22k,"
        "kinetics400_1k}.pth in its mmaction2 layout (PAMFN's features used kinetics600_22k)")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_jpeg_quality(self.jpeg_quality, "frame_transform 'pil'" if self.frame_transform != "pil" else None)


@backbone_settings("rgb", "timesformer")
@dataclass
class TimeSformerSettings(LinearLayerSettings):
    timesformer_checkpoint: str = setting(
        "hf-k400", ("hf-k400", "original-k400", "original-k600"),
        help="pretrained TimeSformer: Hugging Face's facebook/timesformer-base-finetuned-k400, or "
        "facebookresearch/TimeSformer's own TimeSformer_divST_8x32_224_{K400,K600}.pyth")


# The flow backbones differ in how they compute flow; the I3D that embeds it is the same.
@backbone_settings("flow", "raft", "farneback", "tvl1")
@dataclass
class FlowI3DSettings(BackboneSettings):
    memory_format: str = setting(
        "channels_last", ("channels_last", "contiguous"),
        help="how I3D's 3D convolutions hold their activations; equal up to float rounding")
    flow_runtime: str = setting(
        "torch", ("torch", "onnxruntime", "openvino"),
        help="library that runs the I3D: torch, or on a CPU ONNX Runtime or OpenVINO (optional packages: "
        "pip install -e \".[onnx]\" or \".[openvino]\"; extractors/cpu_runtimes.py); equal to torch's "
        "features up to float rounding but not bitwise, so in a cache folder of its own")
    # The published RG / Fis-V flow front end (docs/design/features.md, "The published flow"): TV-L1 on the
    # source frames, denseflow's uint8 JPEG flow images, torchvision's PIL geometry, flows crossing segments.
    flow_resolution: str = setting(
        "crop", ("crop", "source"),
        help="where flow is computed: on the 224x224 centre crop (crop), or on the full source frames, the "
        "flow images then resized and cropped as the published features were (source: PIL Resize(256), "
        "CenterCrop((224, 300)), Resize((224, 224)), flow vectors not rescaled); source needs --flow-encoding "
        "u8, frames decoded at source resolution and a CPU flow method (tvl1, farneback)")
    flow_encoding: str = setting(
        "float", ("float", "u8"),
        help="flow as I3D sees it: clipped to +-20 px and divided by 20 in float (float), or denseflow's uint8 "
        "flow images round(255 * (f + 20) / 40) read back as u8 / 127.5 - 1 (u8)")
    jpeg_quality: int = jpeg_quality_setting()
    flow_pairs: str = setting(
        "within", ("within", "crossing"),
        help="which frames each flow joins: the F-1 consecutive pairs inside the clip (within), or F flows, "
        "the last from the clip's last frame to the next segment's first (at the video's end the previous "
        "flow repeated), as the published features (crossing)")
    i3d_checkpoint: str = setting(
        "pytorch-i3d-imagenet", ("pytorch-i3d-imagenet", "hassony2-kinetics"),
        help="pretrained I3D flow file: pytorch-i3d's flow_imagenet.pt (BatchNorm eps 1e-3), or "
        "kinetics_i3d_pytorch's model_flow.pth (PAMFN's; its BatchNorm eps 1e-5 and static padding, also "
        "with random weights)")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_jpeg_quality(self.jpeg_quality, "flow_encoding 'u8'" if self.flow_encoding != "u8" else None)
        if self.flow_resolution == "source" and self.flow_encoding != "u8":
            raise ValueError("flow_resolution 'source' resizes the uint8 flow images as the published features "
                             "did: it needs flow_encoding 'u8'")


@backbone_settings("audio", "ast")
@dataclass
class ASTSettings(LinearLayerSettings):
    audio_frontend: str = setting(
        "project", ("project", "pamfn"),
        help="how the audio rows are made: project = mono 16 kHz from ffmpeg, each segment's exact time span "
        "with its own mean removed, a 16 kHz filterbank with AST's constants, each window at its own length; "
        "pamfn = as PAMFN's published RG / Fis-V features, slips included: the whole track (all channels) "
        "resampled to 16 kHz by torchaudio, one mean removed, cut into T equal chunks (not the segments' "
        "spans), a filterbank of channel 0 told the source rate, (fbank - 4.26) / (4.57 * 2), zero-padded or "
        "cut to 41 frames (extractors/audio_ast.py)")
    ast_checkpoint: str = setting(
        "hf-audioset", ("hf-audioset", "original-audioset"),
        help="pretrained AST: Hugging Face's MIT/ast-finetuned-audioset-10-10-0.4593, or YuanGongND/ast's "
        "own audioset_10_10_0.4593.pth (PAMFN's; LayerNorm eps 1e-6 as in its timm ViT, also with random "
        "weights)")
