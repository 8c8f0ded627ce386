"""`--precision bf16`: the backbones compute in bf16 where the hardware does, features stay float32, and
bf16 features never share a cache folder with fp32 ones."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from extractors.onednn import OneDNNLinear
from extractors.settings import settings_from_values
from manifests.cache import CONFIG_NAME, CacheConfig, CacheError, FeatureCache, open_cache
from pipeline.cli import main
from pipeline.devices import native_bf16, resolve_precision
from pipeline.inference import other_precision_only
from pipeline.extraction.entry import extract_into
from pipeline.videos import VideoSource
from tests.conftest import TINY_EXTRACT_FLAGS, tiny_config

CPU = torch.device("cpu")
needs_native_bf16 = pytest.mark.skipif(
    not native_bf16(CPU), reason="this CPU has neither AVX512_BF16 nor AMX: bf16 would be emulated, and is refused")

# Largest difference between bf16 and fp32 features of the tiny backbones, relative to the largest fp32
# value, per modality. bf16 keeps 8 bits of mantissa (relative rounding 2**-9 = 2e-3 per operation); the
# tiny random backbones measured 3e-3 to 1.6e-2 on AMD Zen 4 (2026-12-06). The floor proves bf16 was
# used: fp32 runs agree to 1e-6.
BF16_TOLERANCE = 0.05
BF16_FLOOR = 1e-4


@needs_native_bf16
def test_bf16_features_are_float32_and_within_tolerance_of_fp32(clip_folder, tmp_path):
    video = [VideoSource("good", clip_folder / "good.mp4")]
    features = {}
    for precision in ("fp32", "bf16"):
        _, cache = extract_into(tmp_path / "out", tiny_config(precision=precision), video, progress=False)
        features[precision] = cache.load_features("good")
    assert set(features["bf16"]) == {"rgb", "flow", "audio"}
    for modality, fp32 in features["fp32"].items():
        bf16 = features["bf16"][modality]
        assert bf16.dtype == np.float32 and bf16.shape == fp32.shape
        relative = np.abs(bf16 - fp32).max() / np.abs(fp32).max()
        print(f"{modality}: bf16 vs fp32 relative difference {relative:.2e}")
        assert BF16_FLOOR < relative < BF16_TOLERANCE, modality


@needs_native_bf16
def test_matmul_window_attention_runs_bf16_within_tolerance_of_fp32(clip_folder, tmp_path):
    """attention="matmul" under bf16: the features stay within bf16's tolerance of fp32 (with the fused
    attention) and differ from the fused attention's bf16 features, which keep float32 scores."""
    video = [VideoSource("good", clip_folder / "good.mp4")]
    features = {}
    for precision, attention in (("fp32", "fused"), ("bf16", "fused"), ("bf16", "matmul")):
        settings = {"rgb": settings_from_values("rgb", "vst", {"attention": attention})}
        config = tiny_config(modalities=("rgb",), backbones={"rgb": "vst"}, precision=precision, settings=settings)
        _, cache = extract_into(tmp_path / "out", config, video, progress=False)
        features[precision, attention] = cache.load_features("good")["rgb"]
    fp32, fused, matmul = features["fp32", "fused"], features["bf16", "fused"], features["bf16", "matmul"]
    scale = np.abs(fp32).max()
    assert BF16_FLOOR < np.abs(matmul - fp32).max() / scale < BF16_TOLERANCE
    assert np.abs(matmul - fused).max() / scale > BF16_FLOOR  # not the fused kernel under another name


@needs_native_bf16
def test_precision_is_recorded_and_names_its_own_folder(clip_folder, tmp_path):
    # Broken on purpose once: with `precision` left out of the hash, both runs wrote one folder and the
    # fp32 run found the bf16 features already there.
    out = tmp_path / "out"
    flags = ["--videos", str(clip_folder / "good.mp4"), "--out", str(out), *TINY_EXTRACT_FLAGS, "--modalities", "rgb"]
    assert main(["extract", *flags, "--precision", "bf16"]) == 0
    (bf16_folder,) = out.iterdir()
    bf16_manifest = (bf16_folder / "manifest.csv").read_bytes()
    bf16_config = json.loads((bf16_folder / CONFIG_NAME).read_text())["extraction"]
    assert bf16_config["precision"] == "bf16"
    assert bf16_config["settings"]["rgb"]["attention"] == "matmul"  # bf16's own default on a CPU, recorded
    assert main(["extract", *flags]) == 0  # fp32, the CPU's default
    (fp32_folder,) = [f for f in out.iterdir() if f != bf16_folder]
    assert fp32_folder.name == tiny_config(modalities=("rgb",)).config_hash()  # fp32 keeps the names it had
    fp32_config = json.loads((fp32_folder / CONFIG_NAME).read_text())["extraction"]
    assert fp32_config["precision"] == "fp32" and fp32_config["settings"]["rgb"]["attention"] == "fused"
    assert (bf16_folder / "manifest.csv").read_bytes() == bf16_manifest


def test_a_setting_takes_its_cpu_bf16_default_only_for_bf16_on_a_cpu_and_never_over_a_given_value():
    assert settings_from_values("rgb", "vst", {}, "bf16", "cpu").attention == "matmul"
    assert settings_from_values("rgb", "vst", {"attention": "fused"}, "bf16", "cpu").attention == "fused"
    assert settings_from_values("rgb", "vst", {}, "bf16", "cuda").attention == "fused"
    assert settings_from_values("rgb", "vst", {}, "fp32", "cpu").attention == "fused"
    assert settings_from_values("rgb", "vst", {}).attention == "fused"
    # the same extraction in the other precision moves the setting along, unless it is neither default
    bf16 = tiny_config(precision="bf16", settings={"rgb": settings_from_values("rgb", "vst", {}, "bf16", "cpu")})
    assert bf16.in_precision("fp32", "cpu").config_hash() == tiny_config().config_hash()
    assert tiny_config().in_precision("bf16", "cpu").config_hash() == bf16.config_hash()
    reference = tiny_config(settings={"rgb": settings_from_values("rgb", "vst", {"attention": "reference"})})
    assert reference.in_precision("bf16", "cpu").settings["rgb"].attention == "reference"


def test_features_of_either_device_count_as_differing_in_precision_only():
    """A GPU's bf16 features keep the fused attention, a CPU's take matmul: both are the fp32 run's
    features in another precision, and a bf16 run of either takes fp32 features; other settings still count."""
    payload = lambda config: {"config_hash": config.config_hash(), "extraction": config.to_dict()}  # noqa: E731
    fp32, gpu_bf16 = tiny_config(), tiny_config(precision="bf16")
    cpu_bf16 = fp32.in_precision("bf16", "cpu")
    assert cpu_bf16.config_hash() != gpu_bf16.config_hash()
    for bf16 in (gpu_bf16, cpu_bf16):
        assert other_precision_only(payload(fp32), payload(bf16))
        assert other_precision_only(payload(bf16), payload(fp32))
    assert not other_precision_only(payload(fp32), payload(tiny_config(precision="bf16", seed=1)))
    assert not other_precision_only(payload(fp32), payload(fp32))  # the same precision is no precision difference


def test_a_bf16_cache_is_never_extended_with_fp32_features(tmp_path):
    # Broken on purpose once: without open_cache's precision check the fp32 config opened the bf16 folder.
    class Described:  # what CacheConfig.extracted reads of an extractor
        def describe(self) -> dict:
            return {"name": "vst", "version": "1", "feature_dim": 16}

    bf16, fp32 = (tiny_config(modalities=("rgb",), precision=p) for p in ("bf16", "fp32"))
    made = CacheConfig.extracted(bf16, {"rgb": Described()})
    open_cache(tmp_path, made)
    renamed = CacheConfig.extracted(fp32, {"rgb": Described()})
    renamed.config_hash = made.config_hash  # as if the folder had been copied under the fp32 name
    with pytest.raises(CacheError, match="computed in bf16, not fp32"):
        open_cache(tmp_path, renamed)
    assert FeatureCache(tmp_path / made.config_hash).config.extraction["precision"] == "bf16"


def test_bf16_where_it_would_be_emulated_is_refused(monkeypatch, clip_folder, tmp_path, capsys):
    monkeypatch.setattr("pipeline.devices.native_bf16", lambda device: False)
    monkeypatch.setattr("pipeline.extraction.entry.native_bf16", lambda device: False)
    assert resolve_precision("auto", CPU) == "fp32"
    flags = ["--videos", str(clip_folder / "good.mp4"), "--out", str(tmp_path / "out"), *TINY_EXTRACT_FLAGS]
    assert main(["extract", *flags, "--precision", "bf16"]) == 2
    assert "no native bf16" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    with pytest.raises(Exception, match="without native bf16"):  # the stage itself refuses too (Ray, score)
        extract_into(tmp_path / "out", tiny_config(precision="bf16"), [], progress=False)


def test_published_recipes_stay_fp32(clip_folder, tmp_path, capsys):
    flags = ["--videos", str(clip_folder / "good.mp4"), "--out", str(tmp_path / "out"), "--recipe", "pamfn",
             "--backbones", "random", "--device", "cpu", "--quiet"]
    assert main(["extract", *flags, "--precision", "bf16"]) == 2
    assert "recipe pamfn has precision 'fp32'" in capsys.readouterr().err
    assert resolve_precision("auto", CPU, fixed="fp32") == "fp32"


@needs_native_bf16
def test_onednn_linear_runs_bf16_under_autocast_on_weights_converted_once():
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 32)
    layer.__class__ = OneDNNLinear
    layer.gelu = True
    x = torch.randn(10, 64)
    with torch.no_grad():
        fp32 = F.gelu(F.linear(x, layer.weight, layer.bias))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            first, second = layer(x), layer(x)
        weight = layer.bf16_parameters()[0]
        assert first.dtype == torch.bfloat16 and torch.equal(first, second)
        assert 1e-4 < (first.float() - fp32).abs().max() / fp32.abs().max() < 2e-2
        assert layer.bf16_parameters()[0] is weight  # converted once, not per call
        layer.load_state_dict({"weight": torch.zeros(32, 64), "bias": torch.zeros(32)})
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert layer(x).abs().max() == 0  # new weights are converted again
        assert layer(x).dtype == torch.float32  # outside autocast: fp32 as before


@needs_native_bf16
def test_a_bf16_run_scores_where_bf16_is_not_native_in_fp32_with_a_note(extracted_clips, tmp_path, monkeypatch, capsys):
    # Broken on purpose once: without precision_here, score stopped with "without native bf16" and no score.
    cache = tmp_path / "cache"
    assert main(["extract", "--videos", str(extracted_clips.videos), "--out", str(cache), *TINY_EXTRACT_FLAGS,
                 "--precision", "bf16"]) == 0
    assert main(["train", "--features", str(cache), "--labels", str(extracted_clips.labels), "--out", str(tmp_path / "run"),
                 "--epochs", "1", "--batch-size", "4", "--hidden", "32", "--device", "cpu", "--quiet"]) == 0
    for module in ("pipeline.stages.score", "pipeline.extraction.entry"):
        monkeypatch.setattr(f"{module}.native_bf16", lambda device: False)
    capsys.readouterr()
    out_csv = tmp_path / "scores.csv"
    assert main(["score", str(extracted_clips.unseen), "--run", str(tmp_path / "run"), "--out", str(out_csv),
                 "--device", "cpu", "--quiet"]) == 0
    assert "the clips' are computed in fp32 (this CPU has no native bf16)" in capsys.readouterr().err
    rows = pd.read_csv(out_csv)
    assert rows.loc[0, "error"] != rows.loc[0, "error"] and 0 <= rows.loc[0, "score"]  # no error (NaN), a score
    assert rows.loc[0, "config_hash"] == tiny_config().config_hash()  # the fp32 features of the run's config


@needs_native_bf16
def test_openvino_runs_the_i3d_in_bf16_and_onnxruntime_refuses_it():
    # Broken on purpose once: with the hint left at f32, OpenVINO's features matched fp32 to 1e-7 (the floor).
    from extractors.base import BackboneUnavailableError, WeightsSource, build_extractors

    pytest.importorskip("openvino", reason="the openvino extra is not installed")
    flow = dict(modalities=("flow",), backbones={"flow": "farneback"}, segment_frames=8)
    eager = build_extractors(tiny_config(**flow), CPU, WeightsSource())["flow"]
    openvino = build_extractors(tiny_config(**flow, precision="bf16", settings={"flow": {"flow_runtime": "openvino"}}),
                                CPU, WeightsSource())["flow"]
    frames = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (1, 8, 64, 80, 3), dtype=np.uint8))
    fp32, bf16 = eager.embed(frames), openvino.embed(frames)
    assert bf16.dtype == torch.float32
    assert BF16_FLOOR < (bf16 - fp32).abs().max() / fp32.abs().max() < BF16_TOLERANCE
    with pytest.raises(BackboneUnavailableError, match="computes in fp32 only"):
        build_extractors(tiny_config(**flow, precision="bf16", settings={"flow": {"flow_runtime": "onnxruntime"}}),
                         CPU, WeightsSource())


@needs_native_bf16
def test_raft_computes_in_bf16_when_asked():
    # The GPU's default flow (precision auto is bf16 there), run on the CPU.
    # Broken on purpose once: with RaftFlow's autocast left disabled, bf16 equalled fp32 exactly.
    from extractors.optical_flow import RaftFlow

    torch.manual_seed(0)
    fp32 = RaftFlow("small")
    bf16 = RaftFlow("small", bf16=True)
    bf16.load_state_dict(fp32.state_dict())
    frames = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (1, 3, 3, 128, 128))).float()
    with torch.no_grad():
        expected, got = fp32(frames), bf16(frames)
    assert got.dtype == torch.float32
    assert BF16_FLOOR < (got - expected).abs().max() / expected.abs().max() < 0.1  # 2.3e-2 measured (Zen 4)


@needs_native_bf16
def test_a_fp32_run_takes_bf16_features_with_a_note(extracted_clips, tmp_path, capsys):
    # Broken on purpose once: without other_precision_only, evaluate refused the bf16 cache ("config.json
    # differs in ['config_hash']"), and score --precision bf16 scored the clip from its fp32 features.
    run, cache = tmp_path / "run", tmp_path / "cache"
    assert main(["train", "--features", str(extracted_clips.cache), "--labels", str(extracted_clips.labels),
                 "--out", str(run), "--epochs", "1", "--batch-size", "4", "--hidden", "32", "--device", "cpu",
                 "--quiet"]) == 0
    assert main(["extract", "--videos", str(extracted_clips.videos), "--out", str(cache), *TINY_EXTRACT_FLAGS,
                 "--precision", "bf16"]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--run", str(run), "--labels", str(extracted_clips.labels), "--features", str(cache),
                 "--device", "cpu"]) == 0
    assert "were computed in bf16, run" in capsys.readouterr().err
    out_csv = tmp_path / "scores.csv"
    assert main(["score", str(extracted_clips.unseen), "--run", str(run), "--out", str(out_csv), "--device", "cpu",
                 "--quiet", "--precision", "bf16"]) == 0
    assert "the clips' are computed in bf16 (--precision bf16)" in capsys.readouterr().err
    # the features `extract --precision bf16` makes here (their own attention on a CPU), in the folder it made
    (bf16_folder,) = cache.iterdir()
    assert pd.read_csv(out_csv).loc[0, "config_hash"] == tiny_config().in_precision("bf16", "cpu").config_hash() \
        == bf16_folder.name
    # features made otherwise than in precision are still refused
    assert main(["extract", "--videos", str(extracted_clips.videos), "--out", str(tmp_path / "other"),
                 *TINY_EXTRACT_FLAGS, "--precision", "bf16", "--seed", "1"]) == 0
    assert main(["evaluate", "--run", str(run), "--labels", str(extracted_clips.labels), "--features",
                 str(tmp_path / "other"), "--device", "cpu"]) == 2
