"""Each backbone's own settings (extractors/settings.py): the cache folder names they make, and what
declaring one costs a contributor."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from extractors import base as extractors_base
from extractors import settings as settings_module
from extractors.base import Extractor, register
from extractors.config import ExtractionConfig
from extractors.settings import BackboneSettings, backbone_settings, setting
from manifests.cache import FeatureCache
from manifests.hashing import feature_hash, hashed_fields
from pipeline.cli import build_parser, extraction_config_from_args, main
from tests.conftest import TINY_EXTRACT_FLAGS

# config.json's "extraction" as it was written before each backbone had its own settings: one
# top-level value of each setting for every backbone.
LAYOUT_1 = {
    "protocol": "rg", "segment_frames": 32, "frame_stride": 1, "window_seconds": 5.0, "hop_seconds": 2.0,
    "clip_frames": 8, "modalities": ["rgb", "flow", "audio"], "backbones": {"rgb": "vst", "flow": "raft", "audio": "ast"},
    "weights": "random", "arch_size": "tiny", "seed": 0, "decode_short_side": 256, "audio_sample_rate": 16000,
    "feature_dtype": "float32", "attention": "fused", "memory_format": "channels_last", "cpu_linear": "onednn",
    "flow_runtime": "torch",
}
TINY = ["--backbones", "random", "--arch-size", "tiny"]

# Folder names measured once with the code of 7fd2923 (ExtractionConfig(...).config_hash() with the
# settings at the top level), for today's default and each setting's other values: (extract flags,
# the same configuration in layout 1, its folder name).
TODAYS_NAMES = [
    ([], {"weights": "pretrained", "arch_size": "full"}, "024baf0d183f"),
    (TINY, {}, "140b934a6e44"),
    (TINY + ["--attention", "reference"], {"attention": "reference"}, "5967e6b191b0"),
    (TINY + ["--memory-format", "contiguous"], {"memory_format": "contiguous"}, "8079a3c1f6e9"),
    (TINY + ["--cpu-linear", "torch"], {"cpu_linear": "torch"}, "0f9534333ea3"),
    (TINY + ["--flow-runtime", "onnxruntime"], {"flow_runtime": "onnxruntime"}, "1cd55b4dd0bc"),
    (TINY + ["--flow-runtime", "openvino"], {"flow_runtime": "openvino"}, "bf7e3d01be08"),
    (TINY + ["--attention", "reference", "--memory-format", "contiguous", "--cpu-linear", "torch", "--flow-runtime",
             "openvino"],
     {"attention": "reference", "memory_format": "contiguous", "cpu_linear": "torch", "flow_runtime": "openvino"},
     "101446f1b9fc"),
    (TINY + ["--modalities", "rgb", "--attention", "reference"],
     {"modalities": ["rgb"], "backbones": {"rgb": "vst"}, "attention": "reference"}, "19ef73de092d"),
    (TINY + ["--modalities", "audio", "--cpu-linear", "torch"],
     {"modalities": ["audio"], "backbones": {"audio": "ast"}, "cpu_linear": "torch"}, "71878dafb471"),
    (TINY + ["--rgb", "timesformer", "--flow", "farneback", "--cpu-linear", "torch"],
     {"backbones": {"rgb": "timesformer", "flow": "farneback", "audio": "ast"}, "cpu_linear": "torch"}, "ef02647eba53"),
]


@pytest.mark.parametrize("flags, layout_1, name", TODAYS_NAMES)
def test_todays_settings_keep_their_cache_folder_names(flags, layout_1, name):
    # Broken on purpose once: settings_hash spelling every setting as `modality.name` gave 8c0919a5e16d
    # for --attention reference instead of 5967e6b191b0 (and a new name on every non-default row).
    args = build_parser().parse_args(["extract", "--videos", ".", "--out", "out", *flags])
    from_flags = extraction_config_from_args(args, "cuda")  # raft, the flow default these names were made with
    assert from_flags.config_hash() == name
    recorded = ExtractionConfig.from_dict({**LAYOUT_1, **layout_1}, source="a cache's config.json in layout 1")
    assert recorded.config_hash() == name
    assert recorded == from_flags


def test_a_setting_differing_between_backbones_hashes_under_each_modality():
    # Broken on purpose once: hashing it as plain `cpu_linear` made rgb-only torch collide with both on torch.
    both = ExtractionConfig(weights="random", arch_size="tiny", settings={"rgb": {"cpu_linear": "torch"}})
    hashed = both.settings_hash()
    assert hashed == {"rgb.cpu_linear": "torch"}  # AST keeps oneDNN: not the layout-1 spelling of all on torch
    everywhere = ExtractionConfig(weights="random", arch_size="tiny", settings={m: {"cpu_linear": "torch"} for m in ("rgb", "audio")})
    assert everywhere.settings_hash() == {"cpu_linear": "torch"}
    assert both.config_hash() != everywhere.config_hash()


@pytest.fixture
def toy_backbone(monkeypatch):
    """A backbone registered for one test: its settings class and its extractor, as a contributor writes them."""
    monkeypatch.setattr(settings_module, "SETTINGS", dict(settings_module.SETTINGS))
    monkeypatch.setattr(extractors_base, "REGISTRY", dict(extractors_base.REGISTRY))

    @backbone_settings("rgb", "toy")
    @dataclass
    class ToySettings(BackboneSettings):
        # The whole of a new setting: this one field. Its flag, its place in config.json and in the cache
        # folder's hash come from it; the extractor below reads it.
        gain: float = setting(1.0, help="multiplies every feature")

    @register("rgb", "toy")
    class ToyExtractor(Extractor):
        input_kind = "frames"
        feature_dim = 3

        def embed(self, batch):
            return torch.as_tensor(batch).float().mean(dim=(1, 2, 3)) / 255 * self.settings.gain

    return ToySettings


def test_one_field_makes_a_flag_a_recorded_setting_and_a_hash_entry_only_when_not_default(
        toy_backbone, clip_folder, tmp_path, capsys):
    # Broken on purpose once: BackboneSettings.changed() returning every field put "gain": 1.0 into the
    # default's hash, and the default folder's name stopped being the one without the setting.
    with pytest.raises(SystemExit):
        main(["extract", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--gain GAIN toy: multiplies every feature (default: 1.0)" in help_text
    assert "--rgb {vst,timesformer,toy}" in help_text

    out = tmp_path / "out"
    flags = ["extract", "--videos", str(clip_folder / "good.mp4"), "--out", str(out), "--modalities", "rgb",
             "--rgb", "toy", *TINY_EXTRACT_FLAGS]
    assert main(flags) == 0
    assert main([*flags, "--gain", "2.5"]) == 0
    caches = {FeatureCache(folder).config.extraction["settings"]["rgb"]["gain"]: FeatureCache(folder)
              for folder in out.iterdir()}
    assert set(caches) == {1.0, 2.5}

    default = ExtractionConfig.from_dict(caches[1.0].config.extraction)
    without_settings = hashed_fields(default, ExtractionConfig.HASHED_SINCE_V1)
    assert caches[1.0].root.name == feature_hash(without_settings)  # the default is not hashed
    assert caches[2.5].root.name == feature_hash({**without_settings, "gain": 2.5})
    plain, scaled = caches[1.0].load_features("good")["rgb"], caches[2.5].load_features("good")["rgb"]
    assert plain.max() > 0
    np.testing.assert_allclose(scaled, 2.5 * plain, rtol=1e-6)  # the extractor received it
    with pytest.raises(ValueError, match="gain"):
        ExtractionConfig(modalities=("rgb",), backbones={"rgb": "toy"}, settings={"rgb": {"gain": 2.5, "gian": 1}})
