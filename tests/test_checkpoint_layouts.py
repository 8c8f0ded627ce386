"""The backbones' original checkpoint files (extractors/checkpoint_layouts.py), loaded through the extractors.

Each test writes a file in an original layout the way its authors' code saves it (mmcv's "meta" beside
the "state_dict", PySlowFast's "model_state" with optimizer and cfg, AST's DataParallel `module.`
prefix), from a small network with random weights: its tensors are renamed by an inverse mapping written
here (independently of the module's rules), the file goes into --weights-dir under its public name, and
the extractor built with the setting must compute what the same weights loaded natively compute.
"""

from __future__ import annotations

import re
import zipfile
from functools import partial
from pathlib import Path

import pytest
import torch
from torchvision.models.video.swin_transformer import SwinTransformer3d

from extractors import ExtractionConfig, WeightsSource, WeightsUnavailableError, build_extractors
from extractors import audio_ast, flow_i3d, rgb_timesformer, rgb_vst
from extractors.audio_ast import ast_config
from extractors.base import BackboneUnavailableError
from extractors.checkpoint_layouts import CHECKPOINTS, LAYOUTS, detect_layout, load_original_checkpoint, read_checkpoint
from extractors.i3d import HASSONY2_BN_EPS, PYTORCH_I3D_BN_EPS, inception_i3d
from extractors.rgb_timesformer import timesformer_config
from extractors.settings import SETTINGS, setting_fields

CPU = torch.device("cpu")
TINY_WIDTH = 1 / 8


@pytest.fixture(autouse=True)
def no_hub_cache(tmp_path, monkeypatch):
    """Keep torch hub's checkpoint cache of this machine out of the weight lookups."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))


def pretrained(modality: str, backbone: str, **settings) -> ExtractionConfig:
    return ExtractionConfig(modalities=(modality,), backbones={modality: backbone}, settings={modality: settings})


# ----------------------------------------------------------------------------- the original layouts


def swin_two_blocks() -> SwinTransformer3d:
    """A small swin3d_b layout with two blocks in its first stages: block 1 shifts its windows."""
    return SwinTransformer3d(patch_size=[2, 4, 4], embed_dim=16, depths=[2, 2, 1, 1], num_heads=[1, 1, 2, 2],
                             window_size=[8, 7, 7], stochastic_depth_prob=0.0)


def to_video_swin(state: dict) -> dict:
    """torchvision SwinTransformer3d names -> a Video-Swin-Transformer recognizer's, with a Kinetics-600 head."""
    out = {}
    for key, tensor in state.items():
        if key.startswith("head."):
            continue
        stage = re.match(r"features\.(\d+)\.(.*)", key)
        if stage is None:
            out[f"backbone.{key}"] = tensor
        elif int(stage[1]) % 2:
            out[f"backbone.layers.{int(stage[1]) // 2}.downsample.{stage[2]}"] = tensor
        else:
            rest = stage[2].replace("mlp.0.", "mlp.fc1.").replace("mlp.3.", "mlp.fc2.")
            out[f"backbone.layers.{int(stage[1]) // 2}.blocks.{rest}"] = tensor
    width = state["norm.weight"].shape[0]
    out["cls_head.fc_cls.weight"], out["cls_head.fc_cls.bias"] = torch.randn(600, width), torch.randn(600)
    return out


HASSONY2_BRANCH = {"b0": "branch_0", "b1a": "branch_1.0", "b1b": "branch_1.1", "b2a": "branch_2.0",
                   "b2b": "branch_2.1", "b3b": "branch_3.1"}


def to_hassony2(state: dict) -> dict:
    """pytorch-i3d InceptionI3d names -> kinetics_i3d_pytorch's (a file of 2018: no num_batches_tracked)."""
    out = {}
    for key, tensor in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        parts = key.replace(".bn.", ".batch3d.").split(".")
        if parts[0] == "logits":
            parts[0] = "conv3d_0c_1x1"
        elif parts[0].startswith("Mixed"):
            parts[0:2] = [parts[0].lower(), HASSONY2_BRANCH[parts[1]]]
        else:
            parts[0] = parts[0].lower()
        out[".".join(parts)] = tensor
    return out


def to_original_ast(state: dict) -> dict:
    """transformers ASTModel names -> YuanGongND/ast's saved from DataParallel, with its classifiers."""
    renames = [("embeddings.distillation_token", "dist_token"), ("embeddings.cls_token", "cls_token"),
               ("embeddings.position_embeddings", "pos_embed"), ("embeddings.patch_embeddings.projection", "patch_embed.proj"),
               ("layers.", "blocks."), ("layernorm_before", "norm1"), ("layernorm_after", "norm2"),
               ("attention.o_proj", "attn.proj"), ("layernorm.", "norm.")]
    out = {}
    for key, tensor in state.items():
        if ".k_proj." in key or ".v_proj." in key:
            continue
        if ".q_proj." in key:  # timm's fused rows: query, key, value
            tensor = torch.cat([state[key], state[key.replace("q_proj", "k_proj")], state[key.replace("q_proj", "v_proj")]])
            key = key.replace("attention.q_proj", "attn.qkv")
        for old, new in renames:
            key = key.replace(old, new)
        out[f"module.v.{key}"] = tensor
    width = state["layernorm.weight"].shape[0]
    for head in ("module.v.head", "module.v.head_dist", "module.mlp_head.1"):
        out[f"{head}.weight"], out[f"{head}.bias"] = torch.randn(527, width), torch.randn(527)
    out["module.mlp_head.0.weight"], out["module.mlp_head.0.bias"] = torch.ones(width), torch.zeros(width)
    return out


TIMESFORMER_RENAMES = [
    ("embeddings.cls_token", "cls_token"), ("embeddings.position_embeddings", "pos_embed"),
    ("embeddings.time_embeddings", "time_embed"), ("embeddings.patch_embeddings.projection", "patch_embed.proj"),
    ("encoder.layer.", "blocks."), ("temporal_attention.attention.qkv", "temporal_attn.qkv"),
    ("temporal_attention.output.dense", "temporal_attn.proj"), ("temporal_layernorm", "temporal_norm1"),
    ("temporal_dense", "temporal_fc"), ("attention.attention.qkv", "attn.qkv"), ("attention.output.dense", "attn.proj"),
    ("layernorm_before", "norm1"), ("layernorm_after", "norm2"), ("intermediate.dense", "mlp.fc1"),
    ("output.dense", "mlp.fc2"), ("layernorm.", "norm."),
]


def to_original_timesformer(state: dict) -> dict:
    """transformers TimesformerModel names -> facebookresearch/TimeSformer's `model.*`, with a K600 head."""
    out = {}
    for key, tensor in state.items():
        for old, new in TIMESFORMER_RENAMES:
            key = key.replace(old, new)
        out[f"model.{key}"] = tensor
    width = state["layernorm.weight"].shape[0]
    out["model.head.weight"], out["model.head.bias"] = torch.randn(600, width), torch.randn(600)
    return out


def randomise(model: torch.nn.Module) -> torch.nn.Module:
    """Every parameter and BatchNorm statistic random: fresh LayerNorms (1, 0) and statistics (0, 1) would
    hide a tensor loaded into the wrong place."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point():
                tensor.copy_(torch.rand_like(tensor) + 0.5 if "running_var" in name else 0.1 * torch.randn_like(tensor))
    return model.eval()


def mmcv_file(state: dict) -> dict:
    return {"meta": {"mmcv_version": "1.3.1", "epoch": 30, "iter": 12345, "time": "Sat Jun 26 2021",
                     "config": "model = dict(type='Recognizer3D')", "CLASSES": None}, "state_dict": state}


def slowfast_file(state: dict) -> dict:
    return {"epoch": 15, "model_state": state, "cfg": "MODEL:\n  NUM_CLASSES: 600\n",
            "optimizer_state": {"state": {0: {"momentum_buffer": torch.zeros(3)}},
                                "param_groups": [{"lr": 0.005, "momentum": 0.9, "params": [0]}]}}


def tiny_ast():
    from transformers import ASTModel

    config = ast_config("tiny")
    config.layer_norm_eps = audio_ast.ORIGINAL_LAYER_NORM_EPS
    return ASTModel(config)


def tiny_timesformer():
    from transformers import TimesformerModel

    return TimesformerModel(timesformer_config("tiny"))


# {setting value: (modality, backbone, setting name, the native network with random weights, the file's
# contents from its state dict, what to monkeypatch so the extractor builds that small network)}
CASES = {
    "mmaction2-k600-22k": ("rgb", "vst", "vst_checkpoint", swin_two_blocks, lambda s: mmcv_file(to_video_swin(s)),
                           [(rgb_vst, "swin3d_b", swin_two_blocks)]),
    "hassony2-kinetics": ("flow", "farneback", "i3d_checkpoint",
                          partial(inception_i3d, width_multiplier=TINY_WIDTH, bn_eps=HASSONY2_BN_EPS,
                                  static_padding=True), to_hassony2,
                          [(flow_i3d, "inception_i3d", lambda **kw: inception_i3d(**{**kw, "width_multiplier": TINY_WIDTH}))]),
    "original-audioset": ("audio", "ast", "ast_checkpoint", tiny_ast, to_original_ast,
                          [(audio_ast, "ast_config", lambda size: ast_config("tiny"))]),
    "original-k600": ("rgb", "timesformer", "timesformer_checkpoint", tiny_timesformer,
                      lambda s: slowfast_file(to_original_timesformer(s)),
                      [(rgb_timesformer, "timesformer_config", lambda size: timesformer_config("tiny"))]),
}


def write_original(case: str, folder: Path, change=None) -> tuple[torch.nn.Module, Path]:
    """The native network with random weights, and its weights written in the original layout as
    `folder`/<public file name> (`change` edits the original state dict first)."""
    modality, backbone, name, build, to_file, _ = CASES[case]
    native = randomise(build())
    contents = to_file({k: v.clone() for k, v in native.state_dict().items()})
    if change is not None:
        change(contents.get("state_dict") or contents.get("model_state") or contents)
    path = folder / CHECKPOINTS[case].filename
    # hassony2's file dates from 2018: torch.save's format before the zip one.
    torch.save(contents, path, _use_new_zipfile_serialization=case != "hassony2-kinetics")
    return native, path


def built_network(extractor) -> torch.nn.Module:
    return extractor.i3d if extractor.modality == "flow" else extractor.model


def network_input(case: str) -> dict:
    generator = torch.Generator().manual_seed(1)
    if case == "mmaction2-k600-22k":
        return {"x": torch.randn(1, 3, 4, 64, 64, generator=generator)}
    if case == "hassony2-kinetics":
        return {"x": torch.randn(1, 2, 8, 64, 64, generator=generator)}
    if case == "original-audioset":
        return {"input_values": torch.randn(1, 1024, 128, generator=generator)}
    return {"pixel_values": torch.randn(1, 8, 3, 224, 224, generator=generator)}


def network_output(network: torch.nn.Module, case: str) -> torch.Tensor:
    with torch.no_grad():
        if case == "hassony2-kinetics":
            return network.extract_features(**network_input(case))
        out = network(**network_input(case))
    return out if isinstance(out, torch.Tensor) else out.last_hidden_state


# ----------------------------------------------------------------------------- the tests


@pytest.mark.parametrize("case", list(CASES))
def test_an_original_file_in_the_weights_dir_gives_the_natively_loaded_network(case, tmp_path, monkeypatch):
    # Broken on purpose once each: VIDEO_SWIN_RULES sending mlp.fc2 to mlp.2 (missing mlp.3, leftover
    # fc2), AST's qkv split as k, q, v (outputs differ by ~1e-1), HASSONY2_BRANCHES swapping b1a and b2a
    # (wrong shapes), and the flow extractor ignoring i3d_checkpoint's eps (outputs differ, eps 1e-3 asserted).
    modality, backbone, name, _, _, patches = CASES[case]
    for module, attribute, replacement in patches:
        monkeypatch.setattr(module, attribute, replacement)
    native, path = write_original(case, tmp_path)
    config = pretrained(modality, backbone, **{name: case})
    extractor = build_extractors(config, CPU, WeightsSource(weights_dir=tmp_path, offline=True))[modality]
    network = built_network(extractor)
    if case == "mmaction2-k600-22k":
        native.head = torch.nn.Identity()  # the extractor's, whatever head the file held
    expected, got = network_output(native, case), network_output(network, case)
    assert expected.abs().max() > 1e-3
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    description = extractor.describe()
    assert description["pretrained"] == path.name
    assert (description["checkpoint"], description["checkpoint_layout"]) == (case, CHECKPOINTS[case].layout)
    if case == "hassony2-kinetics":
        assert not zipfile.is_zipfile(path)  # the legacy format loads with weights_only too
        assert {m.eps for m in network.modules() if isinstance(m, torch.nn.BatchNorm3d)} == {HASSONY2_BN_EPS}
        assert description["batch_norm_eps"] == HASSONY2_BN_EPS and network.Conv3d_1a_7x7.static_padding


def test_a_video_swin_file_without_relative_position_indices_uses_the_networks_own(tmp_path):
    # Broken on purpose once: without relative_position_index in DERIVED, the load named every index missing.
    def drop_indices(state: dict) -> None:
        for key in [k for k in state if k.endswith("relative_position_index")]:
            del state[key]

    native, path = write_original("mmaction2-k600-22k", tmp_path, drop_indices)
    native.head = torch.nn.Identity()
    network = swin_two_blocks()
    network.head = torch.nn.Identity()
    load_original_checkpoint(network, path, CHECKPOINTS["mmaction2-k600-22k"])
    torch.testing.assert_close(network_output(network, "mmaction2-k600-22k"), network_output(native, "mmaction2-k600-22k"))


@pytest.mark.parametrize("case", list(CASES))
def test_a_leftover_a_missing_and_a_misshapen_tensor_are_named_together_with_the_file(case, tmp_path):
    # Broken on purpose once: fit_state_dict raising on the first kind of problem only named the leftover;
    # and once CheckpointError as a plain ValueError (pipeline extract printed a traceback).
    def damage(state: dict) -> None:
        weights = [k for k, v in state.items() if v.ndim >= 2 and "head" not in k]
        first, second, last = weights[0], weights[1], weights[-1]
        state[first + "_extra"] = state[first]
        del state[second]
        state[last] = state[last][:-1]
        damage.names = (first + "_extra", last)

    _, path = write_original(case, tmp_path, damage)
    network = CASES[case][3]()
    if case == "mmaction2-k600-22k":
        network.head = torch.nn.Identity()  # as the extractor loads it
    with pytest.raises(ValueError) as error:
        load_original_checkpoint(network, path, CHECKPOINTS[case])
    message = str(error.value)
    assert str(path) in message and "\n" not in message
    assert isinstance(error.value, BackboneUnavailableError)  # so `pipeline extract` says it in one line
    leftover, misshapen = damage.names
    assert f"leftover keys (1): {leftover}" in message
    assert "missing keys (1" in message  # the deleted tensor, under the network's name
    assert f"wrong shapes (1): {misshapen}" in message


def test_weights_only_loading_takes_mmcv_metadata_and_refuses_pickled_code(tmp_path):
    # Broken on purpose once: read_checkpoint without "state_dict" among the wrappers refused the mmcv file.
    state = {"backbone.norm.weight": torch.ones(2)}
    torch.save(mmcv_file(state), tmp_path / "mmcv.pth")
    assert read_checkpoint(tmp_path / "mmcv.pth").keys() == state.keys()
    torch.save({"state_dict": state, "meta": {"where": Path("/somewhere")}}, tmp_path / "code.pth")
    with pytest.raises(ValueError, match=r"code\.pth: not a checkpoint that loads with torch.load\(weights_only=True\)"):
        read_checkpoint(tmp_path / "code.pth")
    torch.save({"meta": {"epoch": 3}}, tmp_path / "empty.pth")
    with pytest.raises(ValueError, match=r"empty\.pth: holds no state dict.*\['meta'\]"):
        read_checkpoint(tmp_path / "empty.pth")


def test_a_file_of_another_layout_under_the_expected_name_says_which_it_is(tmp_path):
    native = inception_i3d(width_multiplier=TINY_WIDTH)
    path = tmp_path / CHECKPOINTS["hassony2-kinetics"].filename
    torch.save(native.state_dict(), path)  # pytorch-i3d's layout, renamed to hassony2's file
    assert detect_layout(read_checkpoint(path), str(path)) == "pytorch-i3d"
    with pytest.raises(ValueError, match=r"model_flow\.pth is a pytorch-i3d checkpoint, not the hassony2-i3d layout"):
        load_original_checkpoint(inception_i3d(width_multiplier=TINY_WIDTH), path, CHECKPOINTS["hassony2-kinetics"])
    with pytest.raises(ValueError, match=r"x\.pth: not a checkpoint of a known layout .*\['a\.weight'\]"):
        detect_layout({"a.weight": torch.ones(1)}, "x.pth")


@pytest.mark.parametrize("case, modality, backbone, name, filename", [
    ("mmaction2-k600-22k", "rgb", "vst", "vst_checkpoint", "swin_base_patch244_window877_kinetics600_22k.pth"),
    ("mmaction2-k400-1k", "rgb", "vst", "vst_checkpoint", "swin_base_patch244_window877_kinetics400_1k.pth"),
    ("hassony2-kinetics", "flow", "farneback", "i3d_checkpoint", "model_flow.pth"),
    ("original-audioset", "audio", "ast", "ast_checkpoint", "audioset_10_10_0.4593.pth"),
    ("original-k400", "rgb", "timesformer", "timesformer_checkpoint", "TimeSformer_divST_8x32_224_K400.pyth"),
])
def test_a_missing_original_file_is_named_offline_with_the_flag(case, modality, backbone, name, filename, tmp_path):
    # Broken on purpose once: checkpoint_path naming files by the URL's whole last part asked for
    # "audioset_10_10_0.4593.pth?dl=1".
    with pytest.raises(WeightsUnavailableError) as error:
        build_extractors(pretrained(modality, backbone, **{name: case}), CPU, WeightsSource(weights_dir=tmp_path, offline=True))
    assert f"{filename} is in neither --weights-dir" in str(error.value)


def test_every_checkpoint_choice_names_a_file_and_defaults_change_nothing():
    fields = setting_fields()
    names = ("vst_checkpoint", "i3d_checkpoint", "ast_checkpoint", "timesformer_checkpoint")
    choices = [c for name in names for c in fields[name][0].metadata["choices"][1:]]
    assert sorted(choices) == sorted(CHECKPOINTS)  # every non-default choice is an original file, and no other
    assert all(LAYOUTS[c.layout][1] is not None for c in CHECKPOINTS.values())
    assert [fields[name][0].default for name in names] == ["torchvision-k400", "pytorch-i3d-imagenet", "hf-audioset", "hf-k400"]
    # The recipe that reproduces PAMFN's features sets these names.
    assert {"mmaction2-k600-22k", "hassony2-kinetics", "original-audioset"} <= set(CHECKPOINTS)
    config = ExtractionConfig(weights="random", arch_size="tiny")
    assert config.settings_hash() == {}  # the new settings enter no default's hash (cache names unchanged)
    assert all(cls().changed() == {} for cls in set(SETTINGS.values()))


def test_random_weights_take_the_checkpoints_architecture_only():
    # Broken on purpose once: the eps following i3d_checkpoint only for pretrained weights left 1e-3 here.
    base = dict(modalities=("flow", "audio"), backbones={"flow": "farneback", "audio": "ast"}, weights="random",
                arch_size="tiny")
    plain = build_extractors(ExtractionConfig(**base), CPU, WeightsSource())
    original = build_extractors(ExtractionConfig(**base, settings={"flow": {"i3d_checkpoint": "hassony2-kinetics"},
                                                                   "audio": {"ast_checkpoint": "original-audioset"}}),
                                CPU, WeightsSource())
    eps = lambda e: {m.eps for m in e.i3d.modules() if isinstance(m, torch.nn.BatchNorm3d)}  # noqa: E731
    assert (eps(plain["flow"]), eps(original["flow"])) == ({PYTORCH_I3D_BN_EPS}, {HASSONY2_BN_EPS})
    assert (plain["flow"].i3d.Mixed_5c.b3a.static_padding, original["flow"].i3d.Mixed_5c.b3a.static_padding) == (False, True)
    assert (plain["audio"].model.config.layer_norm_eps, original["audio"].model.config.layer_norm_eps) == (1e-12, 1e-6)
    assert "checkpoint" not in plain["flow"].describe() and "batch_norm_eps" not in plain["flow"].describe()
    assert original["flow"].describe()["checkpoint"] == "hassony2-kinetics"
    assert original["flow"].describe()["pretrained"] is None
