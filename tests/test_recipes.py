"""Recipes (extractors/recipes.py): named extraction configurations, their command line, the 25 fps
resampling and the flow pair crossing into the next segment that the published recipe needs, and the
recipe a run's weights expect."""

from __future__ import annotations

import numpy as np
import pytest

from extractors.config import ExtractionConfig
from extractors.decode import VideoFrames, plan_segments, resampled_frames
from extractors.recipes import RECIPES
from pipeline.cli import build_parser, extraction_config_from_args, main
from pipeline.extraction.source import DecoderSource
from pipeline.samples import ClipSpec, write_clip


def parse(*flags: str):
    return build_parser().parse_args(["extract", "--videos", ".", "--out", "out", *flags])


def test_extract_help_lists_every_recipe(capsys):
    with pytest.raises(SystemExit):
        main(["extract", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name, chosen in RECIPES.items():
        assert f"{name}: {' '.join(chosen.summary.split())[:40]}" in text


def test_a_recipe_sets_what_it_fixes_and_gets_its_own_folder():
    config = extraction_config_from_args(parse("--recipe", "skating-mixer", "--backbones", "random"), "cpu")
    assert (config.recipe, config.protocol, config.modalities) == ("skating-mixer", "fs1000", ("rgb", "audio"))
    assert config.backbones == {"rgb": "timesformer", "audio": "ast"}
    same_values = ExtractionConfig(protocol="fs1000", modalities=("rgb", "audio"), weights="random",
                                   backbones={"rgb": "timesformer", "audio": "ast"})
    # The same values under the project's name are another folder: the recipe is part of what they mean.
    assert config.config_hash() != same_values.config_hash()
    assert ExtractionConfig.from_dict(config.to_dict()) == config
    # The project's recipe adds nothing to the folder name of today's configurations.
    assert ExtractionConfig().config_hash() == "024baf0d183f"


def test_a_flag_against_the_recipe_is_refused_in_one_line(capsys, tmp_path):
    extract = ["extract", "--videos", str(tmp_path), "--out", str(tmp_path / "out"), "--recipe", "skating-mixer"]
    assert main([*extract, "--rgb", "vst"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "recipe skating-mixer extracts rgb with timesformer, not vst" in err[0], err
    # Given at the project's default value, a flag is still given: the recipe's own value is another.
    assert main([*extract, "--protocol", "rg"]) == 2
    assert "recipe skating-mixer has protocol 'fs1000', not 'rg'" in capsys.readouterr().err
    # A modality the recipe does not name takes the project's backbone.
    config = extraction_config_from_args(parse("--recipe", "skating-mixer", "--modalities", "rgb,flow,audio"), "cpu")
    assert config.backbones["flow"] == "farneback"


def test_a_config_claiming_a_recipe_must_have_its_values():
    data = ExtractionConfig.from_recipe("skating-mixer", weights="random").to_dict()
    with pytest.raises(ValueError, match="recipe skating-mixer has window_seconds 5.0, not 4.0"):
        ExtractionConfig.from_dict({**data, "window_seconds": 4.0})


def test_resampling_to_25_fps_takes_the_nearest_frame():
    # 30 fps -> 25 fps: output frame k is due at k/25 s; source frame i starts at i/30 s.
    starts = np.arange(90) / 30
    timestamps = np.stack([starts, starts + 1 / 30], axis=1)
    source = resampled_frames(timestamps, 25.0)
    assert len(source) == 75  # floor(3 s * 25)
    assert source[:7].tolist() == [0, 1, 2, 4, 5, 6, 7]  # 0, 1.2, 2.4, 3.6, 4.8, 6.0, 7.2 source frames
    expected = [int(np.argmin(np.abs(starts - k / 25))) for k in range(75)]
    assert source.tolist() == expected
    # 20 fps -> 25 fps repeats frames; a video already at 25 fps is left alone.
    slow = resampled_frames(np.stack([np.arange(40) / 20, np.arange(1, 41) / 20], axis=1), 25.0)
    assert len(slow) == 50 and np.all(np.diff(slow) >= 0) and len(set(slow.tolist())) == 40
    config = ExtractionConfig(segment_frames=8, frame_rate=25.0)
    plan = plan_segments(90, 30.0, config, timestamps)
    assert plan.num_segments == 75 // 8
    assert plan.frame_indices[1].tolist() == source[8:16].tolist()
    assert plan_segments(80, 25.0, config).frame_indices.tolist() == plan_segments(80, 25.0, ExtractionConfig(
        segment_frames=8)).frame_indices.tolist()


def crossing(segment_frames: int = 8) -> ExtractionConfig:
    return ExtractionConfig(segment_frames=segment_frames, modalities=("flow",), backbones={"flow": "farneback"},
                            settings={"flow": {"flow_pairs": "crossing", "flow_encoding": "u8"}})


def test_the_final_flow_pair_crosses_into_the_next_segment_and_repeats_at_the_end():
    config = crossing()
    assert config.extra_frames == 2
    plan = plan_segments(20, 25.0, config)  # 2 segments, 4 frames left over
    assert plan.final_pair.tolist() == [[7, 8], [15, 16]]
    plan = plan_segments(16, 25.0, config)  # the video ends with the second segment
    assert plan.final_pair.tolist() == [[7, 8], [14, 15]]
    frames = DecoderSource.frame_indices(plan, 0, 2)
    assert frames.shape == (2, 10) and frames[1].tolist() == [*range(8, 16), 14, 15]
    # Without crossing pairs nothing extra is read.
    assert plan_segments(16, 25.0, ExtractionConfig(segment_frames=8)).final_pair is None


def test_source_size_decoding_and_the_crossing_pair_reach_the_frames(tmp_path):
    path = write_clip(ClipSpec("a", 0.5, seconds=1.0, fps=30, width=96, height=64, seed=1), tmp_path / "a.mp4")
    video = VideoFrames(path, decode_short_side=0)
    plan = video.plan(ExtractionConfig(segment_frames=8, frame_rate=25.0, decode_short_side=0, modalities=("flow",),
                                       backbones={"flow": "farneback"},
                                       settings={"flow": {"flow_pairs": "crossing", "flow_encoding": "u8"}}))
    assert plan.num_segments == 3  # 1 s at 25 fps = 25 frames
    frames = video.read(DecoderSource.frame_indices(plan, 0, plan.num_segments))
    assert frames.shape == (3, 10, 64, 96, 3)
    # 30 frames resampled to 25: the pair after the last segment's frame (resampled 23) is resampled 24.
    assert plan.final_pair[2].tolist() == [plan.frame_indices[2, -1], 29]
    assert np.array_equal(frames[2, 8], frames[2, 7])


@pytest.fixture(scope="module")
def pamfn_extracted(tmp_path_factory):
    """Two generated clips through `pipeline extract --recipe pamfn` with tiny random backbones: one with a
    48 kHz stereo track, one at 30 fps (resampled to 25)."""
    from tests.test_audio_recipe import STEREO_RATE, stereo_track, with_track

    root = tmp_path_factory.mktemp("pamfn")
    videos = root / "videos"
    videos.mkdir()
    # Small frames: TV-L1 at the source size is most of the time.
    silent = write_clip(ClipSpec("st", 0.5, seconds=2.7, width=96, height=72, with_audio=False, seed=21),
                        root / "silent.mp4")
    with_track(silent, stereo_track(seconds=2.7), STEREO_RATE, videos / "stereo48.mkv")
    # 2.2 s: 66 frames at 30 fps would make 2 segments, 55 at 25 fps make 1.
    write_clip(ClipSpec("f30", 0.4, seconds=2.2, fps=30, width=96, height=64, seed=22), videos / "fps30.mp4")
    code = main(["extract", "--videos", str(videos), "--out", str(root / "cache"), "--recipe", "pamfn",
                 "--backbones", "random", "--arch-size", "tiny", "--device", "cpu", "--quiet"])
    return code, root


def test_pamfn_end_to_end_its_own_folder_a_complete_config_and_the_published_segment_count(pamfn_extracted):
    from manifests.cache import FeatureCache

    code, root = pamfn_extracted
    assert code == 0
    (folder,) = (root / "cache").iterdir()
    cache = FeatureCache.open(folder)
    config = cache.read_config()
    assert folder.name == ExtractionConfig.from_recipe("pamfn", weights="random", arch_size="tiny").config_hash()
    assert folder.name != ExtractionConfig(weights="random", arch_size="tiny", backbones=RECIPES["pamfn"].backbones).config_hash()
    extraction = config["extraction"]
    assert (extraction["recipe"], extraction["frame_rate"], extraction["decode_short_side"]) == ("pamfn", 25.0, 0)
    for modality, values in RECIPES["pamfn"].settings.items():
        assert {k: extraction["settings"][modality][k] for k in values} == values
    assert config["recipe"]["name"] == "pamfn" and config["recipe"]["unverified"]
    assert "pamfn" in str(config["extractors"]["audio"]) and "next segment's first frame" in str(config["extractors"]["flow"])
    # T: frames at 25 fps // 32 (PAMFN's rule), every modality alike.
    for record in cache.records():
        seconds, segments = (2.7, 2) if record.video_id.startswith("stereo") else (2.2, 1)
        assert record.num_segments == int(seconds * 25) // 32 == segments
        assert {m: a.shape[0] for m, a in cache.load_features(record.video_id).items()} == dict.fromkeys(
            ("rgb", "flow", "audio"), segments)


def test_the_pil_frame_transform_feeds_swin_torchvisions_pil_steps():
    import torch
    from PIL import Image
    from torchvision import transforms

    from extractors.base import WeightsSource
    from extractors.rgb_vst import VideoSwinExtractor

    config = ExtractionConfig(modalities=("rgb",), backbones={"rgb": "vst"}, weights="random", arch_size="tiny",
                              decode_short_side=0, settings={"rgb": {"frame_transform": "pil"}})
    extractor = VideoSwinExtractor(config, torch.device("cpu"), WeightsSource())
    frames = np.random.default_rng(0).integers(0, 256, (1, 2, 90, 160, 3), dtype=np.uint8)
    published = transforms.Compose([transforms.Resize(256), transforms.CenterCrop((224, 300)),
                                    transforms.Resize((224, 224)), transforms.PILToTensor()])
    expected = torch.stack([published(Image.fromarray(frame)) for frame in frames[0]])[None].float()
    assert torch.equal(extractor.input_frames(torch.from_numpy(frames)), expected)
