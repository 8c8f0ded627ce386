"""The backbones' original checkpoint files, read into the networks the extractors build.

The extractors build torchvision's SwinTransformer3d, extractors/i3d.py's InceptionI3d (pytorch-i3d's
names) and transformers' ASTModel and TimesformerModel. Some published feature sets (PAMFN's, which the
MCMoE and LIMSSR papers use) were made with the same networks' files from their authors' code, in other
layouts. A backbone setting (`vst_checkpoint`, `i3d_checkpoint`, `ast_checkpoint`,
`timesformer_checkpoint`) picks one of CHECKPOINTS; its file, under its public name in --weights-dir, is
read here with `torch.load(weights_only=True)` (tensors and plain containers, no code runs), recognised
by its key names (`detect_layout`), renamed into the network's names and loaded.

The layouts (the file's name -> the network's):
    video-swin   Video-Swin-Transformer / mmaction2 (a recognizer's "state_dict", meta beside it)
                 backbone.patch_embed.*                  patch_embed.*
                 backbone.layers.{i}.blocks.{j}.*        features.{2i}.{j}.* (mlp.fc1 / fc2 -> mlp.0 / mlp.3)
                 backbone.layers.{i}.downsample.*        features.{2i+1}.*
                 backbone.norm.* (mmaction2 1.x: norm3)  norm.*
                 cls_head.*                              dropped (the classifier; the extractor drops its own)
    hassony2-i3d kinetics_i3d_pytorch (PAMFN's models/i3d.py)
                 conv3d_1a_7x7.{conv3d,batch3d}.*        Conv3d_1a_7x7.{conv3d,bn}.* (also 2b_1x1, 2c_3x3)
                 mixed_{Xy}.branch_0 / branch_1.{0,1} / branch_2.{0,1} / branch_3.1
                                                         Mixed_{Xy}.b0 / b1a, b1b / b2a, b2b / b3b
                 conv3d_0c_1x1.conv3d.*                  logits.conv3d.*
    ast          YuanGongND/ast, saved from DataParallel (a timm DeiT under `module.v.`)
                 module.v.cls_token / dist_token / pos_embed
                                                         embeddings.cls_token / distillation_token / position_embeddings
                 module.v.patch_embed.proj.*             embeddings.patch_embeddings.projection.*
                 module.v.blocks.{i}.attn.qkv.*          layers.{i}.attention.{q,k,v}_proj.* (split in thirds)
                 module.v.blocks.{i}.attn.proj.*         layers.{i}.attention.o_proj.*
                 module.v.blocks.{i}.norm1 / norm2       layers.{i}.layernorm_before / layernorm_after
                 module.v.blocks.{i}.mlp.fc1 / fc2       layers.{i}.mlp.fc1 / fc2
                 module.v.norm.*                         layernorm.*
                 module.v.head*, module.mlp_head.*       dropped (the classifiers)
    timesformer  facebookresearch/TimeSformer (PySlowFast's "model_state", optimizer and cfg beside it)
                 model.cls_token / pos_embed / time_embed
                                                         embeddings.cls_token / position_embeddings / time_embeddings
                 model.patch_embed.proj.*                embeddings.patch_embeddings.projection.*
                 model.blocks.{i}.attn.qkv / attn.proj   encoder.layer.{i}.attention.attention.qkv /
                                                         encoder.layer.{i}.attention.output.dense
                 model.blocks.{i}.temporal_norm1         encoder.layer.{i}.temporal_layernorm
                 model.blocks.{i}.temporal_attn.qkv / temporal_attn.proj
                                                         encoder.layer.{i}.temporal_attention.attention.qkv /
                                                         encoder.layer.{i}.temporal_attention.output.dense
                 model.blocks.{i}.temporal_fc            encoder.layer.{i}.temporal_dense
                 model.blocks.{i}.norm1 / norm2 / mlp.fc1 / mlp.fc2
                                                         encoder.layer.{i}.layernorm_before / layernorm_after /
                                                         intermediate.dense / output.dense
                 model.norm.*                            layernorm.*
                 model.head.*                            dropped (the classifier)
The transformers names are those of the pinned transformers (setup.cfg); another version's names would
show up as missing keys, not as silently random weights.

Every tensor is mapped by name and checked by shape: a key of the file no rule maps, a key the network
needs that the file lacks (but DERIVED buffers) and a tensor of another shape are all named in one
CheckpointError (a ValueError) naming the file.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from extractors.base import BackboneUnavailableError, url_filename


class CheckpointError(BackboneUnavailableError, ValueError):
    """A checkpoint file does not hold its backbone's weights; the message names the file and every problem.

    A BackboneUnavailableError, so `pipeline extract` reports it in one line, as a missing file."""


@dataclass(frozen=True)
class OriginalCheckpoint:
    """A published checkpoint file in its authors' layout: what a backbone setting's value loads."""

    url: str  # where users download it; the file keeps the name the URL ends in (query removed)
    layout: str  # a key of LAYOUTS: what detect_layout must find in the file
    what: str  # the network and its training, as describe() records it

    @property
    def filename(self) -> str:
        return url_filename(self.url)


VIDEO_SWIN_RELEASES = "https://github.com/SwinTransformer/storage/releases/download/v1.0.4/"

# {setting value: its file}; the settings' defaults load the libraries' own files instead (extractors).
CHECKPOINTS: dict[str, OriginalCheckpoint] = {
    "mmaction2-k600-22k": OriginalCheckpoint(
        VIDEO_SWIN_RELEASES + "swin_base_patch244_window877_kinetics600_22k.pth", "video-swin",
        "Video Swin-B, ImageNet-22k then Kinetics-600 (Video-Swin-Transformer, mmaction2 layout)"),
    "mmaction2-k400-22k": OriginalCheckpoint(
        VIDEO_SWIN_RELEASES + "swin_base_patch244_window877_kinetics400_22k.pth", "video-swin",
        "Video Swin-B, ImageNet-22k then Kinetics-400 (Video-Swin-Transformer, mmaction2 layout)"),
    "mmaction2-k400-1k": OriginalCheckpoint(
        VIDEO_SWIN_RELEASES + "swin_base_patch244_window877_kinetics400_1k.pth", "video-swin",
        "Video Swin-B, ImageNet-1k then Kinetics-400 (Video-Swin-Transformer, mmaction2 layout)"),
    "hassony2-kinetics": OriginalCheckpoint(
        "https://github.com/hassony2/kinetics_i3d_pytorch/raw/master/model/model_flow.pth", "hassony2-i3d",
        "I3D flow stream, ImageNet-inflated then Kinetics-400 (kinetics_i3d_pytorch port: BatchNorm eps 1e-5, "
        "static padding)"),
    "original-audioset": OriginalCheckpoint(
        "https://www.dropbox.com/s/ca0b1v2nlxzyeb4/audioset_10_10_0.4593.pth?dl=1", "ast",
        "AST, ImageNet then AudioSet, 10/10 strides, mAP 0.4593 (YuanGongND/ast, LayerNorm eps 1e-6)"),
    "original-k400": OriginalCheckpoint(
        "https://www.dropbox.com/s/g5t24we9gl5yk88/TimeSformer_divST_8x32_224_K400.pyth?dl=1", "timesformer",
        "TimeSformer base, divided space-time, 8x32 frames at 224, Kinetics-400 (facebookresearch/TimeSformer)"),
    "original-k600": OriginalCheckpoint(
        "https://www.dropbox.com/s/4h2qt41m2z3aqrb/TimeSformer_divST_8x32_224_K600.pyth?dl=1", "timesformer",
        "TimeSformer base, divided space-time, 8x32 frames at 224, Kinetics-600 (facebookresearch/TimeSformer)"),
}


def original_checkpoint(setting_value: str) -> OriginalCheckpoint | None:
    """The original file a backbone's checkpoint setting names, or None for the library's own weights."""
    return CHECKPOINTS.get(setting_value)


def describe_checkpoint(setting_value: str, random_weights: bool) -> dict:
    """What an extractor's describe() adds for an original checkpoint: nothing for the default (existing
    caches keep their descriptions), the setting for random weights, the file and its layout when loaded."""
    original = original_checkpoint(setting_value)
    if original is None:
        return {}
    if random_weights:
        return {"checkpoint": setting_value}
    return {"pretrained": original.filename, "checkpoint": setting_value, "checkpoint_layout": original.layout,
            "checkpoint_weights": original.what}


@dataclass
class ConvertedState:
    """A file's tensors under the network's names."""

    tensors: dict[str, Tensor]
    origin: dict[str, str]  # network name -> the file's name it came from
    leftover: list[str]  # the file's names no rule maps


# A rule: a regular expression over the file's whole key, and the network's name (a re template, a
# function of the match, or None: a tensor the network does not have, such as a classifier, dropped).
Rule = tuple[str, "str | Callable[[re.Match[str]], str] | None"]


def rename(state: Mapping[str, Tensor], rules: tuple[Rule, ...]) -> ConvertedState:
    """Each tensor under the name the first matching rule gives it."""
    out = ConvertedState({}, {}, [])
    for key, tensor in state.items():
        match, target = next(((m, t) for p, t in rules if (m := re.fullmatch(p, key))), (None, None))
        if match is None:
            out.leftover.append(key)
        elif target is not None:
            name = target(match) if callable(target) else match.expand(target)
            out.tensors[name], out.origin[name] = tensor, key
    return out


WEIGHT = r"(weight|bias)"

VIDEO_SWIN_RULES: tuple[Rule, ...] = (
    (rf"backbone\.patch_embed\.(proj|norm)\.{WEIGHT}", r"patch_embed.\1.\2"),
    (r"backbone\.layers\.(\d+)\.blocks\.(\d+)\.(norm1\.weight|norm1\.bias|norm2\.weight|norm2\.bias|attn\.qkv\.weight|"
     r"attn\.qkv\.bias|attn\.proj\.weight|attn\.proj\.bias|attn\.relative_position_bias_table|"
     r"attn\.relative_position_index)",
     lambda m: f"features.{2 * int(m[1])}.{m[2]}.{m[3]}"),
    # torchvision's MLP is a Sequential: Linear (0), GELU, Dropout, Linear (3), Dropout.
    (rf"backbone\.layers\.(\d+)\.blocks\.(\d+)\.mlp\.fc([12])\.{WEIGHT}",
     lambda m: f"features.{2 * int(m[1])}.{m[2]}.mlp.{0 if m[3] == '1' else 3}.{m[4]}"),
    (r"backbone\.layers\.(\d+)\.downsample\.(reduction\.weight|norm\.weight|norm\.bias)",
     lambda m: f"features.{2 * int(m[1]) + 1}.{m[2]}"),
    (rf"backbone\.norm3?\.{WEIGHT}", r"norm.\1"),
    (r"cls_head\..+", None),
)

HASSONY2_UNITS = {"conv3d_1a_7x7": "Conv3d_1a_7x7", "conv3d_2b_1x1": "Conv3d_2b_1x1", "conv3d_2c_3x3": "Conv3d_2c_3x3"}
HASSONY2_BRANCHES = {"branch_0": "b0", "branch_1.0": "b1a", "branch_1.1": "b1b", "branch_2.0": "b2a",
                     "branch_2.1": "b2b", "branch_3.1": "b3b"}  # branch_3.0 is the max pool
HASSONY2_UNIT = r"conv3d\.weight|batch3d\.(?:weight|bias|running_mean|running_var|num_batches_tracked)"


def hassony2_unit(name: str) -> str:
    return name.replace("batch3d.", "bn.")


HASSONY2_I3D_RULES: tuple[Rule, ...] = (
    (rf"(conv3d_1a_7x7|conv3d_2b_1x1|conv3d_2c_3x3)\.({HASSONY2_UNIT})",
     lambda m: f"{HASSONY2_UNITS[m[1]]}.{hassony2_unit(m[2])}"),
    (rf"mixed_(\d[a-z])\.(branch_0|branch_1\.[01]|branch_2\.[01]|branch_3\.1)\.({HASSONY2_UNIT})",
     lambda m: f"Mixed_{m[1]}.{HASSONY2_BRANCHES[m[2]]}.{hassony2_unit(m[3])}"),
    (rf"conv3d_0c_1x1\.conv3d\.{WEIGHT}", r"logits.conv3d.\1"),
)

AST_V = r"(?:module\.)?v\."  # DataParallel's prefix, and the timm ViT's attribute in AST's module
AST_RULES: tuple[Rule, ...] = (
    (rf"{AST_V}cls_token", "embeddings.cls_token"),
    (rf"{AST_V}dist_token", "embeddings.distillation_token"),
    (rf"{AST_V}pos_embed", "embeddings.position_embeddings"),
    (rf"{AST_V}patch_embed\.proj\.{WEIGHT}", r"embeddings.patch_embeddings.projection.\1"),
    (rf"{AST_V}blocks\.(\d+)\.norm1\.{WEIGHT}", r"layers.\1.layernorm_before.\2"),
    (rf"{AST_V}blocks\.(\d+)\.norm2\.{WEIGHT}", r"layers.\1.layernorm_after.\2"),
    (rf"{AST_V}blocks\.(\d+)\.attn\.qkv\.{WEIGHT}", r"layers.\1.attention.qkv.\2"),  # split by ast_state_dict
    (rf"{AST_V}blocks\.(\d+)\.attn\.proj\.{WEIGHT}", r"layers.\1.attention.o_proj.\2"),
    (rf"{AST_V}blocks\.(\d+)\.mlp\.(fc1|fc2)\.{WEIGHT}", r"layers.\1.mlp.\2.\3"),
    (rf"{AST_V}norm\.{WEIGHT}", r"layernorm.\1"),
    (rf"{AST_V}(head|head_dist)\.{WEIGHT}", None),
    (rf"(?:module\.)?mlp_head\.[01]\.{WEIGHT}", None),
)

TIMESFORMER_BLOCK = {
    "norm1": "layernorm_before", "norm2": "layernorm_after", "attn.qkv": "attention.attention.qkv",
    "attn.proj": "attention.output.dense", "temporal_norm1": "temporal_layernorm",
    "temporal_attn.qkv": "temporal_attention.attention.qkv", "temporal_attn.proj": "temporal_attention.output.dense",
    "temporal_fc": "temporal_dense", "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense",
}
TIMESFORMER_RULES: tuple[Rule, ...] = (
    (r"model\.cls_token", "embeddings.cls_token"),
    (r"model\.pos_embed", "embeddings.position_embeddings"),
    (r"model\.time_embed", "embeddings.time_embeddings"),
    (rf"model\.patch_embed\.proj\.{WEIGHT}", r"embeddings.patch_embeddings.projection.\1"),
    (rf"model\.blocks\.(\d+)\.({'|'.join(re.escape(k) for k in TIMESFORMER_BLOCK)})\.{WEIGHT}",
     lambda m: f"encoder.layer.{m[1]}.{TIMESFORMER_BLOCK[m[2]]}.{m[3]}"),
    (rf"model\.norm\.{WEIGHT}", r"layernorm.\1"),
    (rf"model\.head\.{WEIGHT}", None),
)


def video_swin_state_dict(state: Mapping[str, Tensor]) -> ConvertedState:
    """A Video-Swin-Transformer / mmaction2 recognizer's state dict in torchvision SwinTransformer3d's names
    (its classifier dropped)."""
    return rename(state, VIDEO_SWIN_RULES)


def hassony2_i3d_state_dict(state: Mapping[str, Tensor]) -> ConvertedState:
    """A kinetics_i3d_pytorch I3D state dict in InceptionI3d's (pytorch-i3d's) names."""
    return rename(state, HASSONY2_I3D_RULES)


def ast_state_dict(state: Mapping[str, Tensor]) -> ConvertedState:
    """An original AST state dict in transformers ASTModel's names: the fused qkv projection split into
    query, key and value (timm's rows are q, then k, then v); the classifiers dropped."""
    out = rename(state, AST_RULES)
    for name in [n for n in out.tensors if re.fullmatch(rf"layers\.\d+\.attention\.qkv\.{WEIGHT}", n)]:
        tensor, origin = out.tensors.pop(name), out.origin.pop(name)
        # tensor_split always gives three parts: a fused tensor of another size fails the shape check.
        for part, projection in zip(torch.tensor_split(tensor, 3), ("q_proj", "k_proj", "v_proj")):
            split_name = name.replace(".qkv.", f".{projection}.")
            out.tensors[split_name], out.origin[split_name] = part, origin
    return out


def timesformer_state_dict(state: Mapping[str, Tensor]) -> ConvertedState:
    """An original TimeSformer state dict in transformers TimesformerModel's names (its classifier dropped)."""
    return rename(state, TIMESFORMER_RULES)


# {layout: (a key only that layout's files have (any one of), the converter or None for the extractors'
# native layouts, which load as they are)}
LAYOUTS: dict[str, tuple[tuple[str, ...], Callable[[Mapping[str, Tensor]], ConvertedState] | None]] = {
    "torchvision-swin3d": (("features.0.0.attn.qkv.weight",), None),
    "video-swin": (("backbone.layers.0.blocks.0.attn.qkv.weight",), video_swin_state_dict),
    "pytorch-i3d": (("Conv3d_1a_7x7.conv3d.weight",), None),
    "hassony2-i3d": (("conv3d_1a_7x7.conv3d.weight",), hassony2_i3d_state_dict),
    "ast": (("module.v.blocks.0.attn.qkv.weight", "v.blocks.0.attn.qkv.weight"), ast_state_dict),
    "timesformer": (("model.blocks.0.temporal_attn.qkv.weight",), timesformer_state_dict),
}


def detect_layout(state: Mapping[str, Tensor], source: str) -> str:
    """The layout (a key of LAYOUTS) of a state dict, recognised by its key names."""
    for layout, (markers, _) in LAYOUTS.items():
        if any(marker in state for marker in markers):
            return layout
    first = sorted(state)[:5]
    raise CheckpointError(
        f"{source}: not a checkpoint of a known layout ({', '.join(LAYOUTS)}); its first keys are {first}")


# The containers the authors' training code wraps a state dict in: mmcv / mmengine ("state_dict", with
# "meta" and maybe "optimizer" beside it), PySlowFast ("model_state", with "optimizer_state" and "cfg").
WRAPPERS = ("state_dict", "model_state", "model")


def read_checkpoint(path: Path) -> dict[str, Tensor]:
    """The {name: tensor} state dict in a checkpoint file, unwrapped from its training code's container.

    Loaded with weights_only=True: tensors, numbers, strings and plain containers only, so metadata
    beside the weights (mmcv's "meta", PySlowFast's "cfg" text) loads too, and no code in the file runs."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{path}: not a checkpoint that loads with torch.load(weights_only=True) ({reason})") from None

    def is_state_dict(value: object) -> bool:
        return isinstance(value, Mapping) and bool(value) and all(isinstance(v, Tensor) for v in value.values())

    if is_state_dict(data):
        return dict(data)
    if isinstance(data, Mapping):
        for key in WRAPPERS:
            if is_state_dict(data.get(key)):
                return dict(data[key])
    keys = [str(k) for k in list(data)[:10]] if isinstance(data, Mapping) else type(data).__name__
    raise CheckpointError(f"{path}: holds no state dict (tensor name -> tensor), directly or under {list(WRAPPERS)}; "
                     f"found {keys}")


def names(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


# Buffers a file may lack: BatchNorm's step count, never read at inference, and Swin's relative position
# index, which the network computes from its window size exactly as the authors' code does.
DERIVED = ("num_batches_tracked", "relative_position_index")


def fit_state_dict(model: nn.Module, converted: ConvertedState, source: str) -> None:
    """Load `converted` into `model` if every tensor matches by name and shape, else one CheckpointError naming
    `source` and every leftover, missing and misshapen tensor."""
    expected = model.state_dict()
    leftover = converted.leftover + [converted.origin[n] for n in converted.tensors if n not in expected]
    missing = [n for n in expected if n not in converted.tensors and not n.endswith(DERIVED)]
    misshapen = [f"{converted.origin[n]} {tuple(t.shape)} -> {n} {tuple(expected[n].shape)}"
                 for n, t in converted.tensors.items() if n in expected and t.shape != expected[n].shape]
    problems = [f"{what} ({len(items)}): {names(items)}" for what, items in
                (("leftover keys", leftover), ("missing keys", missing), ("wrong shapes", misshapen)) if items]
    if problems:
        raise CheckpointError(f"{source} does not fit {type(model).__name__}: " + "; ".join(problems))
    model.load_state_dict(converted.tensors, strict=False)  # strict on everything but DERIVED


def load_original_checkpoint(model: nn.Module, path: Path, checkpoint: OriginalCheckpoint) -> None:
    """Read `path`, check it holds `checkpoint`'s layout, and load it into `model` by name and shape."""
    state = read_checkpoint(path)
    layout = detect_layout(state, str(path))
    if layout != checkpoint.layout:
        raise CheckpointError(f"{path} is a {layout} checkpoint, not the {checkpoint.layout} layout of "
                         f"{checkpoint.filename} ({checkpoint.what})")
    convert = LAYOUTS[layout][1]
    assert convert is not None  # every OriginalCheckpoint names a converted layout (tests check it)
    fit_state_dict(model, convert(state), str(path))
