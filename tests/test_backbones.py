"""The registered backbones: shapes, seeding, preprocessing, flow, AST windows, weight loading and errors.

Tiny architectures with random weights, except where a test loads saved weights through the
pretrained code paths (the same files and folders a user would download).
"""

import json
import sys

import cv2
import numpy as np
import pytest
import torch
from torchvision.models.optical_flow import raft_large
from torchvision.models.video import swin_transformer
from torchvision.models.video.swin_transformer import SwinTransformer3d

from extractors import (
    ExtractionConfig,
    WeightsSource,
    WeightsUnavailableError,
    available_backbones,
    build_extractors,
)
from extractors.base import BackboneUnavailableError
from extractors.audio_ast import ast_config, time_positions
from extractors.config import LAYOUT_1_SETTINGS
from extractors.flow_i3d import I3D_FLOW_URL
from extractors.i3d import inception_i3d
from extractors.optical_flow import RAFT_WEIGHTS, FarnebackFlow, flow_clip, flow_input
from extractors.rgb_timesformer import timesformer_config
from extractors import rgb_vst
from extractors.rgb_vst import PRETRAINED as VST_WEIGHTS
from extractors.transforms import centre_crop_box, uniform_frame_indices

CPU = torch.device("cpu")


def layout_1(config: ExtractionConfig, without: str | None = None) -> dict:
    """`config` as config.json spelled it before each backbone had its own settings: one top-level value
    per setting (optionally leaving `without` out, as a file written before that setting existed).
    Settings added after layout 1 never appeared in it."""
    data = {k: v for k, v in config.to_dict().items() if k not in ("settings", "schema_version")}
    for settings in config.to_dict()["settings"].values():  # only the settings layout 1 had
        data.update({k: v for k, v in settings.items() if k in LAYOUT_1_SETTINGS and k != without})
    return data


def tiny_config(modality: str, name: str, seed: int = 0) -> ExtractionConfig:
    return ExtractionConfig(
        modalities=(modality,), backbones={modality: name}, weights="random", arch_size="tiny", seed=seed
    )


def pretrained_config(modality: str, name: str) -> ExtractionConfig:
    return ExtractionConfig(modalities=(modality,), backbones={modality: name})


def random_frames(batch: int, frames: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, frames, 256, 340, 3), dtype=torch.uint8, generator=generator)


def random_waves(lengths: list[int], seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(0.1 * rng.standard_normal(n)).astype(np.float32) for n in lengths]


@pytest.fixture
def no_hub_cache(tmp_path, monkeypatch):
    """Keep torch hub's checkpoint cache of this machine out of the weight lookups."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))


def test_registry_lists_every_backbone_defaults_first():
    assert available_backbones() == {
        "rgb": ["vst", "timesformer"],
        "flow": ["raft", "farneback", "tvl1"],
        "audio": ["ast"],
    }


@pytest.mark.parametrize(
    "modality, name, frames",
    [("rgb", "vst", 8), ("rgb", "timesformer", 8), ("flow", "farneback", 8), ("flow", "raft", 2)],
)
def test_frame_backbones_give_one_float32_vector_per_clip(modality, name, frames):
    extractor = build_extractors(tiny_config(modality, name), CPU, WeightsSource())[modality]
    features = extractor.embed(random_frames(2, frames))
    assert features.shape == (2, extractor.feature_dim)
    assert features.dtype == torch.float32 and features.device == CPU
    assert torch.isfinite(features).all()
    description = json.loads(json.dumps(extractor.describe()))  # recorded as JSON in config.json
    assert description["random_weights"] is True and description["feature_dim"] == extractor.feature_dim


def test_audio_backbone_gives_one_float32_vector_per_window():
    extractor = build_extractors(tiny_config("audio", "ast"), CPU, WeightsSource())["audio"]
    features = extractor.embed(random_waves([20480, 20479, 80000, 100]))
    assert features.shape == (4, extractor.feature_dim) and features.dtype == torch.float32
    assert torch.isfinite(features).all()
    assert "centre-cut from 1024 frames" in extractor.describe()["time_positions"]


def test_frozen_and_in_eval_mode():
    extractors = build_extractors(
        ExtractionConfig(
            backbones={"rgb": "vst", "flow": "farneback", "audio": "ast"}, weights="random", arch_size="tiny"
        ),
        CPU,
        WeightsSource(),
    )
    modules = [extractors["rgb"].model, extractors["flow"].i3d, extractors["audio"].model]
    for module in modules:
        assert not module.training
        assert not any(p.requires_grad for p in module.parameters())


def test_same_seed_same_features_other_seed_other_features():
    def features(seed: int) -> dict[str, torch.Tensor]:
        config = ExtractionConfig(
            backbones={"rgb": "vst", "flow": "farneback", "audio": "ast"},
            weights="random",
            arch_size="tiny",
            seed=seed,
        )
        extractors = build_extractors(config, CPU, WeightsSource())
        frames, waves = random_frames(1, 4), random_waves([16000])
        return {m: e.embed(waves if e.input_kind == "audio" else frames) for m, e in extractors.items()}

    first, again, other = features(0), features(0), features(1)
    for modality in first:
        assert torch.equal(first[modality], again[modality]), modality
        assert not torch.allclose(first[modality], other[modality]), modality


def test_ast_window_gives_the_same_feature_alone_or_batched():
    extractor = build_extractors(tiny_config("audio", "ast"), CPU, WeightsSource())["audio"]
    waves = random_waves([20480, 20480, 17083, 64000, 500])
    alone = extractor.embed([waves[0]])
    batched = extractor.embed(waves)
    torch.testing.assert_close(batched[0:1], alone, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(batched[2:3], extractor.embed([waves[2]]), rtol=1e-5, atol=1e-6)


def test_ast_windows_run_at_their_own_length():
    extractor = build_extractors(tiny_config("audio", "ast"), CPU, WeightsSource())["audio"]
    # 1.28 s at 16 kHz: 126 filterbank frames, 12 time patches covering the first 126 frames.
    fbank = extractor.model_input(random_waves([20480])[0])
    assert fbank.shape == (126, 128)
    assert extractor.time_patches(126) == 12
    assert extractor.model_input(np.zeros(10, dtype=np.float32)).shape == (16, 128)  # one patch at least


def test_ast_time_positions_are_centre_cut_or_interpolated():
    frequency, trained_time, dim = 12, 101, 4
    grid = torch.arange(frequency * trained_time, dtype=torch.float32).reshape(1, frequency * trained_time, 1)
    table = torch.cat([torch.full((1, 2, 1), -1.0), grid], dim=1).expand(1, -1, dim)
    cut = time_positions(table, frequency, 12)
    assert cut.shape == (1, 2 + frequency * 12, dim)
    assert torch.equal(cut[:, :2], table[:, :2])
    columns = cut[0, 2:, 0].reshape(frequency, 12)
    trained_columns = grid.reshape(frequency, trained_time)
    assert torch.equal(columns, trained_columns[:, 44:56])  # AST's cut: columns 50 - 12 // 2 onwards
    assert torch.equal(time_positions(table, frequency, trained_time), table)
    longer = time_positions(table, frequency, 150)
    assert longer.shape == (1, 2 + frequency * 150, dim)


def test_timesformer_uses_eight_uniformly_sampled_frames():
    extractor = build_extractors(tiny_config("rgb", "timesformer"), CPU, WeightsSource())["rgb"]
    clip = random_frames(1, 32)
    picked = clip[:, uniform_frame_indices(32, 8)]
    assert uniform_frame_indices(32, 8).tolist() == [2, 6, 10, 14, 18, 22, 26, 30]
    assert torch.equal(extractor.embed(clip), extractor.embed(picked))


def test_crops_follow_the_protocol_at_any_decode_size():
    assert centre_crop_box(256, 455, (224, 300)) == (16, 77, 224, 300)
    assert centre_crop_box(455, 256, (224, 300)) == (115, 0, 224, 256)  # portrait: clamped to the width
    assert centre_crop_box(128, 228, (224, 300)) == (8, 39, 112, 150)  # half-size decode, half-size crop
    assert flow_input(random_frames(1, 2), CPU).shape == (1, 2, 3, 224, 224)


def test_bad_frames_are_rejected_with_their_shape():
    extractor = build_extractors(tiny_config("rgb", "vst"), CPU, WeightsSource())["rgb"]
    with pytest.raises(ValueError, match=r"\(B, F, H, W, 3\)"):
        extractor.embed(torch.zeros(2, 8, 256, 340, dtype=torch.uint8))
    with pytest.raises(TypeError, match="uint8"):
        extractor.embed(torch.zeros(2, 8, 256, 340, 3))


def test_farneback_flow_of_a_translated_image_has_the_right_sign_and_scale():
    rng = np.random.default_rng(0)
    texture = cv2.GaussianBlur(rng.integers(0, 256, (256, 340)).astype(np.float32), (0, 0), 3)
    texture = cv2.normalize(texture, None, 0, 255, cv2.NORM_MINMAX)
    dx, dy = 3, -2  # content moves 3 px right and 2 px up
    moved = np.roll(texture, shift=(dy, dx), axis=(0, 1))
    frames = np.stack([texture, moved]).astype(np.uint8)
    frames = torch.from_numpy(np.repeat(frames[None, :, :, :, None], 3, axis=-1))
    flow = flow_clip(FarnebackFlow()(flow_input(frames, CPU)))  # (1, 2, 1, 224, 224)
    assert flow.shape == (1, 2, 1, 224, 224)
    interior = flow[0, :, 0, 32:-32, 32:-32]
    assert interior[0].median().item() == pytest.approx(dx / 20, abs=0.02)
    assert interior[1].median().item() == pytest.approx(dy / 20, abs=0.02)


def test_flow_is_clipped_to_20_pixels_and_scaled_to_unit_range():
    flow = torch.tensor([30.0, -50.0, 10.0, 0.0]).reshape(1, 1, 2, 1, 2)  # (B, F-1, 2, H, W)
    clipped = flow_clip(flow)
    assert clipped.shape == (1, 2, 1, 1, 2)
    assert clipped.flatten().tolist() == [1.0, -1.0, 0.5, 0.0]


def test_tvl1_without_opencv_contrib_says_what_to_install(monkeypatch):
    monkeypatch.delattr(cv2, "optflow", raising=False)
    with pytest.raises(BackboneUnavailableError, match="opencv-contrib-python"):
        build_extractors(tiny_config("flow", "tvl1"), CPU, WeightsSource())


@pytest.mark.parametrize(
    "modality, name, missing",
    [
        ("rgb", "vst", VST_WEIGHTS.url.rsplit("/", 1)[-1]),
        ("rgb", "timesformer", "timesformer-base-finetuned-k400"),
        ("flow", "raft", RAFT_WEIGHTS.url.rsplit("/", 1)[-1]),
        ("flow", "farneback", "flow_imagenet.pt"),
        ("audio", "ast", "ast-finetuned-audioset-10-10-0.4593"),
    ],
)
def test_missing_weights_offline_name_the_file_and_the_flag(tmp_path, no_hub_cache, modality, name, missing):
    weights = WeightsSource(weights_dir=tmp_path, offline=True)
    with pytest.raises(WeightsUnavailableError) as error:
        build_extractors(pretrained_config(modality, name), CPU, weights)
    assert missing in str(error.value) and "--weights-dir" in str(error.value)


def test_hugging_face_models_load_from_the_weights_dir(tmp_path, no_hub_cache):  # the SHA-256 memo too
    from transformers import ASTModel, TimesformerModel

    torch.manual_seed(0)
    saved = {"rgb": TimesformerModel(timesformer_config("tiny")), "audio": ASTModel(ast_config("tiny"))}
    saved["rgb"].save_pretrained(tmp_path / "timesformer-base-finetuned-k400")
    saved["audio"].save_pretrained(tmp_path / "ast-finetuned-audioset-10-10-0.4593")
    config = ExtractionConfig(modalities=("rgb", "audio"), backbones={"rgb": "timesformer", "audio": "ast"})
    loaded = build_extractors(config, CPU, WeightsSource(weights_dir=tmp_path, offline=True))
    for modality, extractor in loaded.items():
        expected = saved[modality].state_dict()
        state = extractor.model.state_dict()
        assert set(state) == set(expected)
        for key, value in state.items():
            assert torch.equal(value, expected[key]), key
        assert extractor.describe()["random_weights"] is False
        assert extractor.feature_dim == 32
    assert loaded["audio"].embed(random_waves([20480])).shape == (1, 32)
    assert loaded["rgb"].embed(random_frames(1, 8)).shape == (1, 32)


def test_flow_checkpoints_load_from_the_weights_dir(tmp_path, no_hub_cache):
    torch.manual_seed(0)
    raft_state = raft_large().state_dict()
    i3d_state = inception_i3d(in_channels=2).state_dict()
    torch.save(raft_state, tmp_path / RAFT_WEIGHTS.url.rsplit("/", 1)[-1])
    torch.save(i3d_state, tmp_path / I3D_FLOW_URL.rsplit("/", 1)[-1])
    weights = WeightsSource(weights_dir=tmp_path, offline=True)
    extractor = build_extractors(pretrained_config("flow", "raft"), CPU, weights)["flow"]
    for key, value in extractor.flow.model.state_dict().items():
        assert torch.equal(value, raft_state[key]), key
    for key, value in extractor.i3d.state_dict().items():
        assert torch.equal(value, i3d_state[key]), key
    assert extractor.feature_dim == 1024
    assert extractor.describe()["flow"]["weights"] == "Raft_Large_Weights.C_T_SKHT_V2"


def test_video_swin_loads_its_torchvision_file_from_the_weights_dir(tmp_path, no_hub_cache, monkeypatch):
    # The file path and loading code are those of the full model; the architecture is shrunk so the
    # test does not build and save swin3d_b's 88M parameters.
    monkeypatch.setattr(rgb_vst, "swin3d_b", rgb_vst.swin3d_tiny)
    torch.manual_seed(0)
    state = rgb_vst.swin3d_tiny().state_dict()
    torch.save(state, tmp_path / VST_WEIGHTS.url.rsplit("/", 1)[-1])
    weights = WeightsSource(weights_dir=tmp_path, offline=True)
    extractor = build_extractors(pretrained_config("rgb", "vst"), CPU, weights)["rgb"]
    loaded = extractor.model.state_dict()
    assert set(loaded) == {k for k in state if not k.startswith("head.")}  # classifier removed
    for key, value in loaded.items():
        assert torch.equal(value, state[key]), key
    assert extractor.describe()["pretrained"] == "Swin3D_B_Weights.KINETICS400_V1"
    assert extractor.embed(random_frames(1, 4)).shape == (1, extractor.feature_dim)


def swin3d_tiny_shifted() -> SwinTransformer3d:
    """swin3d_tiny with two blocks in its first two stages: the second block of a stage shifts its windows
    (swin3d_tiny's single blocks never do)."""
    return SwinTransformer3d(patch_size=[2, 4, 4], embed_dim=16, depths=[2, 2, 1, 1], num_heads=[1, 1, 2, 2],
                             window_size=[8, 7, 7], stochastic_depth_prob=0.0)


@pytest.mark.parametrize("attention", ["fused", "matmul"])
def test_window_attention_matches_torchvision_with_the_same_weights(attention):
    """Shifted and unshifted windows, padding (a 10x9 token grid is no multiple of the 7x7 windows) and a
    batch of two clips: equal up to float rounding, and the weights / state_dict are untouched."""
    torch.manual_seed(0)
    reference = swin3d_tiny_shifted().eval()
    replaced = swin3d_tiny_shifted()
    replaced.load_state_dict(reference.state_dict())
    rgb_vst.use_window_attention(replaced.eval(), attention)
    kinds = {type(m) for m in replaced.modules()}
    assert rgb_vst.WINDOW_ATTENTION[attention] in kinds and swin_transformer.ShiftedWindowAttention3d not in kinds
    assert any(sum(m.shift_size) > 0 for m in replaced.modules() if isinstance(m, rgb_vst.FusedWindowAttention3d))
    assert replaced.state_dict().keys() == reference.state_dict().keys()
    clips = torch.randn(2, 3, 16, 40, 36)
    with torch.no_grad():
        expected, got = reference(clips), replaced(clips)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5), (got - expected).abs().max()
    assert expected.std() > 0.01  # a real output, not zeros on both sides


@pytest.mark.parametrize("padded, window, shift", [
    ((16, 56, 56), (8, 7, 7), (4, 3, 3)),  # Swin-B's first stage
    ((16, 7, 7), (8, 7, 7), (4, 0, 0)),  # its last: the window fills the frame, no shift there
    ((8, 14, 21), (8, 7, 7), (0, 3, 3)),  # 8 frames (fs1000)
    ((4, 12, 10), (2, 6, 5), (1, 2, 3)),  # a shift past half the window
])
def test_shifted_window_mask_is_torchvisions_exactly(padded, window, shift):
    expected = swin_transformer._compute_attention_mask_3d(torch.zeros(1), padded, window, shift)
    got = rgb_vst.shifted_window_mask(padded, window, shift)
    assert got.dtype == expected.dtype and torch.equal(got, expected)
    assert (expected == -100).any() and (expected == 0).any()


def test_torch_compile_builds_and_matches_a_shifted_window_block():
    """torch.compile (inductor's C++ code) of one shifted-window block; torchvision's own mask code does not
    build on torch 2.10/2.11 CPUs (pytorch/pytorch#179135), which stopped the compile of Swin-B."""
    torch.manual_seed(0)
    block = rgb_vst.use_window_attention(swin3d_tiny_shifted()).features[0][1].eval()
    assert sum(block.attn.shift_size) > 0
    tokens = torch.randn(1, 16, 14, 14, 16)  # windows shift along all three axes (torchvision's mask fails here)
    with torch.inference_mode():  # compiled first: a mask made by an eager call before could be reused
        got = torch.compile(block)(tokens)
        expected = block(tokens)
    torch._dynamo.reset()
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5), (got - expected).abs().max()


def test_attention_setting_reaches_the_video_swin_and_only_reference_changes_the_cache_name():
    tiny = dict(weights="random", arch_size="tiny", modalities=("rgb",))
    fused, reference = ExtractionConfig(**tiny), ExtractionConfig(**tiny, settings={"rgb": {"attention": "reference"}})
    kinds = lambda config: {type(m).__name__ for m in build_extractors(config, torch.device("cpu"), WeightsSource())["rgb"].model.modules()}  # noqa: E731
    assert "FusedWindowAttention3d" in kinds(fused) and "FusedWindowAttention3d" not in kinds(reference)
    before = layout_1(fused, without="attention")
    assert ExtractionConfig.from_dict(before).config_hash() == fused.config_hash()  # a cache made before the field
    assert reference.config_hash() != fused.config_hash()
    with pytest.raises(ValueError, match="attention must be one of"):
        ExtractionConfig(**tiny, settings={"rgb": {"attention": "flash"}})


def test_memory_format_reaches_the_i3d_keeps_features_and_only_contiguous_changes_the_cache_name():
    tiny = dict(weights="random", arch_size="tiny", modalities=("flow",), backbones={"flow": "farneback"})
    channels_last = ExtractionConfig(**tiny)
    contiguous = ExtractionConfig(**tiny, settings={"flow": {"memory_format": "contiguous"}})
    fast = build_extractors(channels_last, torch.device("cpu"), WeightsSource())["flow"]
    plain = build_extractors(contiguous, torch.device("cpu"), WeightsSource())["flow"]
    conv = lambda extractor: next(m for m in extractor.i3d.modules() if isinstance(m, torch.nn.Conv3d)).weight  # noqa: E731
    assert conv(fast).is_contiguous(memory_format=torch.channels_last_3d)
    assert not conv(plain).is_contiguous(memory_format=torch.channels_last_3d)
    frames = random_frames(2, 8)
    expected, got = plain.embed(frames), fast.embed(frames)
    assert expected.abs().max() > 0.01  # a real output, not zeros on both sides
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()
    before = layout_1(channels_last, without="memory_format")
    assert ExtractionConfig.from_dict(before).config_hash() == channels_last.config_hash()  # a cache made before
    assert contiguous.config_hash() != channels_last.config_hash()
    with pytest.raises(ValueError, match="memory_format must be one of"):
        ExtractionConfig(**tiny, settings={"flow": {"memory_format": "nhwc"}})


def test_fused_attention_keeps_each_blocks_mask_until_its_weights_change():
    torch.manual_seed(0)
    fused = rgb_vst.use_window_attention(rgb_vst.swin3d_tiny().eval())
    clips = torch.randn(1, 3, 16, 40, 36)
    blocks = [m for m in fused.modules() if type(m).__name__ == "FusedWindowAttention3d"]
    with torch.no_grad():
        fused(clips)
        masks = [block._cached_mask[1] for block in blocks]
        fused(clips)
        assert all(block._cached_mask[1] is mask for block, mask in zip(blocks, masks))
        reference = rgb_vst.swin3d_tiny().eval()  # other weights, loaded into the fused model in place
        fused.load_state_dict(reference.state_dict())
        expected, got = reference(clips), fused(clips)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5), (got - expected).abs().max()


def test_fused_attention_still_trains_the_relative_position_bias():
    torch.manual_seed(0)
    fused = rgb_vst.use_window_attention(rgb_vst.swin3d_tiny().eval())
    clips = torch.randn(1, 3, 16, 40, 36)
    with torch.no_grad():
        fused(clips)  # frozen use first: each block keeps a mask without gradient
    fused.train()(clips).square().sum().backward()
    tables = [m.relative_position_bias_table for m in fused.modules() if type(m).__name__ == "FusedWindowAttention3d"]
    assert all(table.grad is not None and table.grad.abs().sum() > 0 for table in tables)


@pytest.mark.parametrize("modality, backbone", [("rgb", "vst"), ("rgb", "timesformer"), ("audio", "ast")])
def test_cpu_linear_runs_the_transformers_on_onednn_with_the_same_features(modality, backbone):
    tiny = dict(weights="random", arch_size="tiny", modalities=(modality,), backbones={modality: backbone})
    onednn, plain = ExtractionConfig(**tiny), ExtractionConfig(**tiny, settings={modality: {"cpu_linear": "torch"}})
    fast = build_extractors(onednn, torch.device("cpu"), WeightsSource())[modality]
    reference = build_extractors(plain, torch.device("cpu"), WeightsSource())[modality]
    kinds = lambda extractor: {type(m).__name__ for m in extractor.model.modules()}  # noqa: E731
    assert "OneDNNLinear" in kinds(fast) and "Linear" not in kinds(fast)
    assert "OneDNNLinear" not in kinds(reference)
    batch = random_frames(2, 8) if modality == "rgb" else random_waves([20480, 20480])
    expected, got = reference.embed(batch), fast.embed(batch)
    assert expected.abs().max() > 0.01
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()
    length = 20480 if modality == "audio" else 8
    assert fast.flops_per_clip(length) == reference.flops_per_clip(length)  # the counter sees oneDNN's linears
    before = layout_1(onednn, without="cpu_linear")
    assert ExtractionConfig.from_dict(before).config_hash() == onednn.config_hash()  # a cache made before
    assert plain.config_hash() != onednn.config_hash()


def test_onednn_linear_leaves_gradients_and_other_dtypes_to_torch():
    from extractors.onednn import OneDNNLinear, use_onednn_linears

    layer = use_onednn_linears(torch.nn.Sequential(torch.nn.Linear(8, 4)))[0]
    assert type(layer) is OneDNNLinear
    x = torch.randn(3, 8)
    layer(x).sum().backward()  # oneDNN's op has no backward: this must take torch's path
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    with torch.no_grad():
        assert torch.allclose(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias), atol=1e-6)
        assert layer.double()(x.double()).dtype == torch.float64


def test_onednn_linear_takes_in_the_gelu_that_follows_it():
    from extractors.onednn import use_onednn_linears

    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Dropout(0.0), torch.nn.Linear(64, 16))
    x = torch.randn(5, 16)
    with torch.no_grad():
        expected = mlp(x)
        use_onednn_linears(mlp)
        assert mlp[0].gelu and isinstance(mlp[1], torch.nn.Identity) and not mlp[3].gelu
        assert torch.allclose(mlp(x), expected, rtol=1e-5, atol=1e-6)
    mlp(x).sum().backward()  # torch's path, GELU included
    assert mlp[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_another_runtime_runs_the_i3d_with_torchs_weights_and_flops(runtime):
    from extractors.cpu_runtimes import RuntimeNetwork

    tiny = dict(weights="random", arch_size="tiny", modalities=("flow",), backbones={"flow": "farneback"})
    config = ExtractionConfig(**tiny, settings={"flow": {"flow_runtime": runtime}})
    other = build_extractors(config, torch.device("cpu"), WeightsSource())["flow"]
    eager = build_extractors(ExtractionConfig(**tiny), torch.device("cpu"), WeightsSource())["flow"]
    assert isinstance(other.run_i3d, RuntimeNetwork) and other.run_i3d.runtime == runtime
    frames = random_frames(2, 8)
    expected, got = eager.embed(frames), other.embed(frames)
    assert expected.abs().max() > 0.01
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()  # the stated tolerance (README)
    assert other.flops_per_clip(8) == eager.flops_per_clip(8) > 0  # counted on torch's I3D
    assert isinstance(other.run_i3d, RuntimeNetwork)  # and the runtime runs it again afterwards
    assert len(other.run_i3d.compiled) == 1  # one conversion for one clip shape, not one per call
    assert other.describe()["runtime"].startswith(runtime + " ") and "runtime" not in eager.describe()
    with pytest.raises(BackboneUnavailableError, match="on a CPU only"):
        build_extractors(config, torch.device("cuda"), WeightsSource())


def test_flow_runtime_counts_only_when_flow_is_extracted_and_names_how_to_install(monkeypatch):
    from extractors import cpu_runtimes

    tiny = dict(weights="random", arch_size="tiny")
    runtime = {"flow": {"flow_runtime": "openvino"}}
    config = ExtractionConfig(**tiny, modalities=("rgb",), settings=runtime)
    assert "flow" not in config.settings  # no flow extracted: not part of the hash either
    assert config.config_hash() == ExtractionConfig(**tiny, modalities=("rgb",)).config_hash()
    old = {**layout_1(config), "flow_runtime": "openvino"}  # layout 1 kept it, unused, at the top level
    assert ExtractionConfig.from_dict(old).config_hash() == config.config_hash()
    torch_flow = ExtractionConfig(**tiny)
    before = layout_1(torch_flow, without="flow_runtime")
    assert ExtractionConfig.from_dict(before).config_hash() == torch_flow.config_hash()  # caches made before
    hashes = {ExtractionConfig(**tiny, settings={"flow": {"flow_runtime": r}}).config_hash()
              for r in ("torch", "onnxruntime", "openvino")}
    assert len(hashes) == 3
    with pytest.raises(ValueError, match="flow_runtime must be one of"):
        ExtractionConfig(settings={"flow": {"flow_runtime": "tensorrt"}})
    monkeypatch.setitem(sys.modules, "openvino", None)  # as if not installed
    with pytest.raises(BackboneUnavailableError, match=r'pip install -e "\.\[openvino\]"'):
        cpu_runtimes.RuntimeNetwork("openvino", torch.nn.Identity())
