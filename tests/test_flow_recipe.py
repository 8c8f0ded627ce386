"""The published RG / Fis-V flow front end as settings of the flow extractor: denseflow's uint8 flow
images, their JPEG round trip, torchvision's PIL geometry, the flows crossing into the next segment, and
TV-L1 with denseflow's parameters (extractors/optical_flow.py, extractors/transforms.py)."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as vtf

from extractors import ExtractionConfig, WeightsSource, build_extractors
from extractors.base import BackboneUnavailableError
from extractors.optical_flow import FarnebackFlow, TVL1Flow, flow_pairs, quantise_flow, read_back
from extractors.settings import FlowI3DSettings
from extractors.transforms import jpeg_round_trip, pil_resize_crop

CPU = torch.device("cpu")
needs_optflow = pytest.mark.skipif(
    not hasattr(cv2, "optflow"),
    reason=f"TV-L1 needs OpenCV's contrib module cv2.optflow, absent from this OpenCV ({cv2.__version__}): "
    "install opencv-contrib-python to run these tests")

# torchvision's transforms as the published features' extraction script composed them.
PUBLISHED_GEOMETRY = vtf.Compose([vtf.Resize(256), vtf.CenterCrop((224, 300)), vtf.Resize((224, 224))])
PUBLISHED_READ_BACK = vtf.Compose([vtf.ToTensor(), vtf.Normalize(mean=[0.5], std=[0.5])])


def flow_config(name: str = "farneback", decode_short_side: int = 0, segment_frames: int = 8, **settings):
    return ExtractionConfig(modalities=("flow",), backbones={"flow": name}, weights="random", arch_size="tiny",
                            segment_frames=segment_frames, decode_short_side=decode_short_side,
                            settings={"flow": settings})


def build_flow(config: ExtractionConfig):
    return build_extractors(config, CPU, WeightsSource())["flow"]


def texture(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Smooth random grey texture: trackable by any flow method."""
    noise = np.random.default_rng(seed).uniform(0, 255, (height // 8 + 2, width // 8 + 2)).astype(np.float32)
    return cv2.resize(noise, (width + 16, height + 16), interpolation=cv2.INTER_CUBIC)[8:-8, 8:-8]


def shifted_pair(height: int, width: int, dx: int, dy: int) -> torch.Tensor:
    """(1, 2, H, W, 3) uint8: a texture, then the same moved by (dx, dy) pixels."""
    image = texture(height, width).clip(0, 255).astype(np.uint8)
    frames = np.stack([image, np.roll(image, shift=(dy, dx), axis=(0, 1))])
    return torch.from_numpy(np.repeat(frames[None, ..., None], 3, axis=-1))


# ----------------------------------------------------------------------------- quantisation and read-back


def test_quantisation_matches_denseflow_at_the_edges_and_rounds_halves_to_even():
    flow = np.array([-20, 20, 0, -25, 25, -20.001, 20.001, 1, -8, 8, -16, 16], dtype=np.float32)
    # 0 -> 127.5 -> 128; -8 -> 76.5 -> 76 and 8 -> 178.5 -> 178 (half to even, as cvRound: half up gives
    # 77 and 179); -16 -> 25.5 -> 26; 16 -> 229.5 -> 230; 1 -> 133.875 -> 134.
    # Broken on purpose once: np.floor(x + 0.5) (half up) gave 77 and 179.
    assert quantise_flow(flow).tolist() == [0, 255, 128, 0, 255, 0, 255, 134, 76, 178, 26, 230]
    assert quantise_flow(flow).dtype == np.uint8


def test_read_back_is_torchvisions_to_tensor_and_normalize_of_the_grey_image():
    images = np.arange(256, dtype=np.uint8).reshape(1, 16, 16)
    expected = PUBLISHED_READ_BACK(Image.fromarray(images[0]))
    assert torch.equal(read_back(images)[0], expected[0])
    assert read_back(np.array([0, 255], dtype=np.uint8)).tolist() == [-1.0, 1.0]
    # 128 (a flow of 0 px) reads back as 1/255, not 0: the published features' offset.
    assert read_back(np.array([128], dtype=np.uint8)).item() == pytest.approx(1 / 255, abs=1e-7)


# ----------------------------------------------------------------------------- pairs


def test_flow_pairs_within_and_crossing():
    assert flow_pairs(4, "within") == [(0, 1), (1, 2), (2, 3)]
    crossing = flow_pairs(32 + 2, "crossing")
    assert len(crossing) == 32
    assert crossing[:31] == [(t, t + 1) for t in range(31)] and crossing[31] == (32, 33)
    with pytest.raises(ValueError, match="at least 2 frames"):
        flow_pairs(1, "within")
    with pytest.raises(ValueError, match="pair of frames"):
        flow_pairs(2, "crossing")


def identity_flow(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """A fake flow method: x = the first frame's grey value / 10 px, y = the second's."""
    x = np.full(first.shape, first[0, 0] / 10, dtype=np.float32)
    return np.dstack([x, np.full(first.shape, second[0, 0] / 10, dtype=np.float32)])


def numbered_frames(values: list[int], height: int = 24, width: int = 32) -> torch.Tensor:
    """(1, len(values), H, W, 3): frame i all grey at values[i]."""
    frames = torch.tensor(values, dtype=torch.uint8).view(1, -1, 1, 1, 1)
    return frames.expand(1, len(values), height, width, 3).contiguous()


def paired_values(extractor, frames: torch.Tensor) -> list[tuple[int, int]]:
    flow = extractor.flow_stream(frames)  # (1, 2, P, 224, 224) = grey / 10 / 20
    return [(round(x * 200), round(y * 200)) for x, y in flow[0, :, :, 100, 100].T.tolist()]


def test_crossing_gives_32_flows_the_last_into_the_next_segment_and_repeats_at_the_video_end(monkeypatch):
    monkeypatch.setattr(FarnebackFlow, "pair_flow", staticmethod(identity_flow))
    extractor = build_flow(flow_config(decode_short_side=256, segment_frames=32, flow_pairs="crossing"))
    assert extractor.extra_frames == 2
    grey = [4 * t + 10 for t in range(33)]  # frame t of the video; a clip of 32 and the next segment's first
    inside = numbered_frames(grey[:32] + [grey[31], grey[32]])  # the pair: (clip's last, next segment's first)
    pairs = paired_values(extractor, inside)
    assert len(pairs) == 32
    assert pairs == [(grey[t], grey[t + 1]) for t in range(32)]
    # Broken on purpose once: pairing (F, F + 1) dropped and the clip's F-1 flows padded by the last gave
    # (grey[30], grey[31]) as the 32nd flow here.
    at_the_end = numbered_frames(grey[:32] + [grey[30], grey[31]])  # the last segment: flow 30 again
    pairs = paired_values(extractor, at_the_end)
    assert pairs[31] == pairs[30] == (grey[30], grey[31])

    within = build_flow(flow_config(decode_short_side=256, segment_frames=32))
    assert within.extra_frames == 0
    assert paired_values(within, numbered_frames(grey[:32])) == [(grey[t], grey[t + 1]) for t in range(31)]


# ----------------------------------------------------------------------------- geometry and JPEG


@pytest.mark.parametrize("height, width", [(720, 1280), (640, 480)])
@pytest.mark.parametrize("colour", [False, True])
def test_pil_resize_crop_is_torchvisions_pil_transforms_bit_for_bit(height, width, colour):
    # 1280x720: the crop's left offset is 77.5, rounded to even (78); 480x640 portrait: 256 wide, zero-padded
    # to the crop's 300, top offset 58.5 -> 58.
    rng = np.random.default_rng(height)
    shape = (2, height, width, 3) if colour else (2, height, width)
    images = (texture(height, width)[None, ..., None] if colour else texture(height, width)[None]) \
        + rng.normal(0, 20, shape)
    images = images.clip(0, 255).astype(np.uint8)
    expected = np.stack([np.asarray(PUBLISHED_GEOMETRY(Image.fromarray(image))) for image in images])
    out = pil_resize_crop(images)
    assert out.dtype == np.uint8 and out.shape == (2, 224, 224, 3)[: images.ndim]
    # Broken on purpose once: round((W - 300) / 2) replaced by (W - 300) // 2 moved 1280x720 by a pixel.
    np.testing.assert_array_equal(out, expected)


def test_pil_resize_crop_refuses_what_is_not_uint8_images():
    with pytest.raises(ValueError, match="uint8"):
        pil_resize_crop(np.zeros((1, 8, 8), dtype=np.float32))
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        pil_resize_crop(np.zeros((8, 8, 2), dtype=np.uint8)[None])


@pytest.mark.parametrize("colour", [False, True])
def test_jpeg_round_trip_is_imwrite_then_imread_as_the_published_files(tmp_path, colour):
    rng = np.random.default_rng(1)
    base = texture(48, 64)[..., None] if colour else texture(48, 64)
    images = (base[None] + rng.normal(0, 25, (2, 48, 64, 3) if colour else (2, 48, 64))).clip(0, 255)
    images = images.astype(np.uint8)
    expected = []
    for i, image in enumerate(images):  # as denseflow wrote and the published extraction script read them
        path = str(tmp_path / f"{i}.jpg")
        cv2.imwrite(path, cv2.cvtColor(image, cv2.COLOR_RGB2BGR) if colour else image)  # imwrite: quality 95
        expected.append(cv2.cvtColor(cv2.imread(path), cv2.COLOR_BGR2RGB) if colour
                        else cv2.imread(path, cv2.IMREAD_GRAYSCALE))
    out = jpeg_round_trip(images, 95)
    # Broken on purpose once: encoding the RGB array as is (no BGR order) changed the colour images.
    np.testing.assert_array_equal(out, np.stack(expected))
    assert (out != images).any()  # JPEG changed pixels
    assert jpeg_round_trip(images, 0) is images  # quality 0: no round trip


@pytest.mark.parametrize("quality", [-1, 101, 95.0, True])
def test_jpeg_round_trip_refuses_a_quality_outside_0_to_100(quality):
    with pytest.raises(ValueError, match="JPEG quality"):
        jpeg_round_trip(np.zeros((1, 8, 8), dtype=np.uint8), quality)


# ----------------------------------------------------------------------------- the vectors keep source pixels


def test_flow_at_source_resolution_keeps_source_pixels_through_the_geometry(monkeypatch):
    extractor = build_flow(flow_config(flow_resolution="source", flow_encoding="u8"))
    # Real Farneback on a 640x360 texture moved 3 px right, 2 px up: the 224x224 image is a 0.62 scale, but
    # the values stay 3/20 and -2/20 (rescaled they would be 0.093 and -0.062).
    flow = extractor.flow_stream(shifted_pair(360, 640, dx=3, dy=-2))
    assert flow.shape == (1, 2, 1, 224, 224)
    interior = flow[0, :, 0, 40:-40, 40:-40]
    assert interior[0].median().item() == pytest.approx(3 / 20, abs=0.01)
    assert interior[1].median().item() == pytest.approx(-2 / 20, abs=0.01)
    # A constant flow reads back exactly as its quantised value everywhere: round(255 * 23 / 40) = 147.
    # Broken on purpose once: multiplying the flow by the geometry's scale (224 / 360) before quantising.
    monkeypatch.setattr(FarnebackFlow, "pair_flow",
                        staticmethod(lambda a, b: np.dstack([np.full(a.shape, 3.0), np.full(a.shape, -2.0)])))
    flow = extractor.flow_stream(shifted_pair(360, 640, dx=3, dy=-2))
    assert (flow[0, 0] == read_back(np.array([147], dtype=np.uint8))).all()
    assert (flow[0, 1] == read_back(quantise_flow(np.array([-2.0])))).all()


# ----------------------------------------------------------------------------- settings


@pytest.mark.parametrize("settings, message", [
    ({"jpeg_quality": 101}, "jpeg_quality must be an integer from 0"),
    ({"jpeg_quality": -5, "flow_encoding": "u8"}, "jpeg_quality must be an integer from 0"),
    ({"jpeg_quality": "95", "flow_encoding": "u8"}, "jpeg_quality must be an integer from 0"),
    ({"jpeg_quality": 95}, "needs flow_encoding 'u8'"),
    ({"flow_resolution": "source"}, "needs flow_encoding 'u8'"),
    ({"flow_pairs": "across"}, "flow_pairs must be one of"),
    ({"flow_encoding": "png"}, "flow_encoding must be one of"),
])
def test_settings_refuse_bad_values_and_combinations(settings, message):
    # Broken on purpose once: without the jpeg / u8 check, jpeg_quality 95 with float flow was accepted.
    with pytest.raises(ValueError, match=message):
        FlowI3DSettings(**settings)
    with pytest.raises(ValueError, match=f"the flow backbone farneback: .*{message}"):
        flow_config(**settings)


def test_defaults_are_todays_flow_and_keep_its_description():
    assert FlowI3DSettings().changed() == {}
    extractor = build_flow(flow_config(decode_short_side=256))
    described = extractor.describe()
    assert described["flow_input"] == "centre 224x224 at short side 256, resized to 224x224 if decoded at another size"
    assert described["flow_pairs"] == "consecutive frames of the clip (F-1 flow fields)"
    assert described["flow_scaling"] == "clipped to [-20, 20] px, divided by 20"
    assert "flow_jpeg" not in described and "flow_geometry" not in described


def test_source_resolution_needs_source_frames_and_an_opencv_method():
    with pytest.raises(BackboneUnavailableError, match="decode_short_side 0"):
        build_flow(flow_config(decode_short_side=256, flow_resolution="source", flow_encoding="u8"))
    with pytest.raises(BackboneUnavailableError, match="not raft"):
        build_flow(flow_config("raft", flow_resolution="source", flow_encoding="u8"))


# ----------------------------------------------------------------------------- the extractor end to end


@pytest.mark.parametrize("name, settings", [
    ("farneback", {"flow_resolution": "source", "flow_encoding": "u8", "jpeg_quality": 95, "flow_pairs": "crossing"}),
    ("farneback", {"flow_encoding": "u8", "jpeg_quality": 90}),
    pytest.param("tvl1", {"flow_resolution": "source", "flow_encoding": "u8", "jpeg_quality": 95,
                          "flow_pairs": "crossing"}, marks=needs_optflow),
])
def test_extractor_with_the_published_front_end(name, settings):
    extractor = build_flow(flow_config(name, segment_frames=6, **settings))
    clip = 6 + extractor.extra_frames
    frames = torch.from_numpy(np.stack([np.roll(texture(48, 80, seed=b), 2 * t, axis=1)
                                        for b in range(2) for t in range(clip)]).reshape(2, clip, 48, 80))
    frames = frames.clip(0, 255).to(torch.uint8)[..., None].expand(2, clip, 48, 80, 3).contiguous()
    features = extractor.embed(frames)
    assert features.shape == (2, extractor.feature_dim) and extractor.feature_dim == 1024 // 8
    assert torch.isfinite(features).all()
    described = json.loads(json.dumps(extractor.describe()))  # recorded as JSON in config.json
    assert "round(255 * (f + 20) / 40)" in described["flow_scaling"]
    assert str(settings["jpeg_quality"]) in described["flow_jpeg"]
    if settings.get("flow_resolution") == "source":
        assert "CenterCrop((224, 300))" in described["flow_geometry"]
        assert "next segment's first frame" in described["flow_pairs"]


# ----------------------------------------------------------------------------- TV-L1


@needs_optflow
def test_tvl1_runs_with_denseflows_parameters():
    solver = TVL1Flow().solver()
    assert (solver.getTau(), solver.getLambda(), solver.getTheta(), solver.getScalesNumber(),
            solver.getWarpingsNumber(), solver.getEpsilon(), solver.getScaleStep(), solver.getGamma()) == \
        (0.25, 0.15, 0.3, 5, 5, 0.01, 0.8, 0.0)
    # CUDA: 300 iterations per warp, no median filter.
    assert (solver.getInnerIterations(), solver.getOuterIterations(), solver.getMedianFiltering()) == (300, 1, 1)
    assert solver.getUseInitialFlow() is False
    described = TVL1Flow().describe()
    assert described["parameters"]["inner_iterations"] == 300 and "not_matched" in described
    first, second = shifted_pair(48, 64, dx=2, dy=1)[0, :, :, :, 0].numpy()
    flow = TVL1Flow().pair_flow(first, second)
    assert np.median(flow[12:-12, 12:-12, 0]) == pytest.approx(2, abs=0.2)
    assert np.median(flow[12:-12, 12:-12, 1]) == pytest.approx(1, abs=0.2)


def test_tvl1_features_say_they_use_denseflows_parameters():
    from extractors.flow_i3d import FarnebackI3DExtractor, TVL1I3DExtractor

    config = flow_config("tvl1")
    assert TVL1I3DExtractor.feature_version(config) == FarnebackI3DExtractor.feature_version(config) + "+denseflow"
