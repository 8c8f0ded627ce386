"""The extract stage on real generated clips: segmentation, alignment, cache, resume, bad input, CLI."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from extractors.base import WeightsSource, build_extractors
from extractors.config import ExtractionConfig
from extractors.decode import VideoFrames, audio_windows, load_audio, plan_segments
from manifests.cache import CacheConfig, FeatureCache, open_cache
from pipeline.cli import main
from manifests.claims import Claims
from pipeline.extraction.loop import extract_videos
from pipeline.samples import ClipSpec, write_clip
from pipeline.videos import discover_videos
from tests.conftest import tiny_config

CPU = torch.device("cpu")


def run_extract(videos, out, config, **kwargs):
    extractors = build_extractors(config, CPU, WeightsSource())
    cache = open_cache(out, CacheConfig.extracted(config, extractors))
    return cache, extract_videos(discover_videos(videos), cache, extractors, config, progress=False, **kwargs)


def good_only(clip_folder, tmp_path):
    folder = tmp_path / "videos"
    folder.mkdir()
    for name in ("good.mp4", "wide.mov"):
        shutil.copy(clip_folder / name, folder / name)
    return folder


# --------------------------------------------------------------------------- segmentation


def test_rg_segments_drop_the_remainder_and_honour_the_stride():
    config = ExtractionConfig(segment_frames=32, frame_stride=2)
    plan = plan_segments(200, 25.0, config)
    assert plan.num_segments == 3  # 200 // 64
    assert plan.frame_indices.shape == (3, 32)
    assert plan.frame_indices[1, :3].tolist() == [64, 66, 68]
    assert plan.start_frame.tolist() == [0, 64, 128] and plan.end_frame.tolist() == [64, 128, 192]
    assert plan.start_s[1] == pytest.approx(64 / 25) and plan.end_s[1] == pytest.approx(128 / 25)


def test_fs1000_windows_hop_two_seconds_with_eight_frame_clips():
    config = ExtractionConfig(protocol="fs1000")
    plan = plan_segments(25 * 12, 25.0, config)  # 12 s: windows start at 0, 2, 4, 6 s
    assert plan.num_segments == 4
    assert plan.clips_per_segment == 125 // 8 and plan.clip_frames == 8
    assert plan.start_s.tolist() == pytest.approx([0, 2, 4, 6])
    assert plan.end_s.tolist() == pytest.approx([5, 7, 9, 11])
    assert plan_segments(25 * 4, 25.0, config).num_segments == 0  # shorter than one window


def test_audio_windows_cover_exactly_the_segment_spans(clip_folder):
    config = ExtractionConfig(segment_frames=8)
    video = VideoFrames(clip_folder / "good.mp4", 64)
    plan = video.plan(config)
    waveform = load_audio(clip_folder / "good.mp4", 16000)
    windows = audio_windows(waveform, plan, 16000)
    assert len(windows) == plan.num_segments == 80 // 8
    assert all(len(w) == round(8 / 25 * 16000) for w in windows)
    # the second window starts where the second segment starts
    first_sample = int(round(plan.start_s[1] * 16000))
    np.testing.assert_array_equal(windows[1][:100], waveform[first_sample : first_sample + 100])


def test_no_audio_track_is_missing_not_an_error(clip_folder):
    assert load_audio(clip_folder / "sub" / "good.mp4", 16000) is None


def test_rotation_metadata_is_applied(clip_folder):
    upright, rotated = VideoFrames(clip_folder / "good.mp4", 64), VideoFrames(clip_folder / "rotated.mp4", 64)
    assert (upright.info.width, upright.info.height) == (192, 144)
    assert (rotated.info.width, rotated.info.height) == (144, 192)
    assert rotated.read(np.array([0])).shape == (1, 86, 64, 3)  # short side 64, portrait


def test_frames_are_resized_at_decode_time(clip_folder):
    video = VideoFrames(clip_folder / "wide.mov", 64)
    frames = video.read(np.array([[0, 1], [2, 3]]))
    assert frames.shape == (2, 2, 64, 170, 3) and frames.dtype == np.uint8
    assert video.info.fps == pytest.approx(30.0) and video.info.frame_count == 60


def test_video_ids_are_unique_across_subfolders(clip_folder):
    ids = [s.video_id for s in discover_videos(clip_folder)]
    assert "good" in ids and "sub/good" in ids and len(ids) == len(set(ids))
    assert "ünï cødé" in ids


# --------------------------------------------------------------------------- the whole stage


@pytest.fixture(scope="module")
def extracted(clip_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache")
    return run_extract(clip_folder, out, tiny_config())


def test_every_video_gets_a_row_and_bad_ones_a_reason(extracted):
    cache, summary = extracted
    records = {r.video_id: r for r in cache.records()}
    assert set(records) == {"good", "sub/good", "wide", "ünï cødé", "short", "empty", "notvideo", "audioonly",
                            "truncated", "rotated"}
    assert {v for v, r in records.items() if r.status == "done"} == {"good", "sub/good", "wide", "ünï cødé", "rotated"}
    assert "too short" in records["short"].error
    assert "empty" in records["empty"].error
    assert "cannot decode video" in records["notvideo"].error
    assert records["audioonly"].status == "failed"
    assert records["truncated"].error.startswith("cannot decode video: av_read_frame failed")
    assert all("\n" not in r.error for r in records.values() if r.error)
    assert len(summary.failed) == 5


def test_modalities_share_T_and_missing_audio_is_recorded(extracted):
    cache, _ = extracted
    dims = cache.feature_dims
    for video_id in ("good", "wide", "sub/good"):
        features = cache.load_features(video_id)
        record = cache.read_record(video_id)
        assert {f.shape[0] for f in features.values()} == {record.num_segments}
        for modality, array in features.items():
            assert array.shape[1] == dims[modality] and array.dtype == np.float32
            assert np.isfinite(array).all()
    assert cache.read_record("good").num_segments == 10  # 80 frames / 8
    assert cache.read_record("wide").num_segments == 7  # 60 frames / 8
    no_audio = cache.read_record("sub/good")
    assert no_audio.modalities["audio"].status == "missing"
    assert set(cache.load_features("sub/good")) == {"rgb", "flow"}
    assert not cache.feature_path("sub/good", "audio").exists()


def test_cache_layout_config_and_manifest(extracted):
    cache, _ = extracted
    config = json.loads((cache.root / "config.json").read_text())
    assert cache.root.name == tiny_config().config_hash() == config["config_hash"]
    assert config["random_weights"] is True and "RANDOM" in config["note"]
    assert all(e["random_weights"] for e in config["extractors"].values())
    np.load(cache.feature_path("good", "rgb"), allow_pickle=False)
    manifest = cache.manifest()
    assert {"video_id", "path", "size_bytes", "fingerprint", "fps", "frame_count", "duration_s", "T",
            "rgb_status", "audio_shape", "error", "random_weights", "started_at"} <= set(manifest.columns)
    assert (cache.root / "manifest.csv").is_file()
    segments = cache.read_record("good").segments
    assert segments["start_frame"][:2] == [0, 8] and segments["end_s"][0] == pytest.approx(8 / 25)


def test_rerun_does_nothing_that_is_done(extracted, clip_folder):
    cache, _ = extracted
    before = {r.video_id: r.finished_at for r in cache.records()}
    extractors = build_extractors(tiny_config(), CPU, WeightsSource())
    summary = extract_videos(discover_videos(clip_folder), cache, extractors, tiny_config(), progress=False)
    assert sorted(summary.skipped) == ["good", "rotated", "sub/good", "wide", "ünï cødé"]
    assert len(summary.failed) == 5  # unchanged bad files are reported again, not retried
    assert {r.video_id: r.finished_at for r in cache.records()} == before


def test_changed_file_is_extracted_again(clip_folder, tmp_path):
    folder = good_only(clip_folder, tmp_path)
    config = tiny_config(modalities=("rgb",), backbones={"rgb": "vst"})
    cache, _ = run_extract(folder, tmp_path / "out", config)
    old = cache.load_features("good")["rgb"]
    write_clip(ClipSpec("good", 0.1, seconds=1.6, seed=9), folder / "good.mp4")
    cache, summary = run_extract(folder, tmp_path / "out", config)
    assert summary.skipped == ["wide"]
    new = cache.load_features("good")["rgb"]
    assert new.shape[0] == 5 and old.shape[0] == 10


class Interrupt(BaseException):
    """Stands in for Ctrl-C / a kill: not an Exception, so nothing may swallow it."""


@pytest.mark.parametrize("crash_after_calls", [1, 3], ids=["inside-first-video", "between-videos"])
def test_interrupted_run_finishes_with_identical_features(clip_folder, tmp_path, crash_after_calls):
    folder = good_only(clip_folder, tmp_path)
    config = tiny_config(modalities=("rgb", "audio"), backbones={"rgb": "vst", "audio": "ast"})
    reference, _ = run_extract(folder, tmp_path / "reference", config, batch_segments=4)

    extractors = build_extractors(config, CPU, WeightsSource())
    cache = open_cache(tmp_path / "crashed", CacheConfig.extracted(config, extractors))
    real_embed, calls = extractors["rgb"].embed, {"n": 0}

    def crashing_embed(batch):
        calls["n"] += 1
        if calls["n"] > crash_after_calls:
            raise Interrupt()
        return real_embed(batch)

    extractors["rgb"].embed = crashing_embed
    with pytest.raises(Interrupt):
        extract_videos(discover_videos(folder), cache, extractors, config, batch_segments=4, progress=False)
    finished = {r.video_id for r in cache.records()}
    assert finished == ({"good"} if crash_after_calls == 3 else set())  # good: 10 segments = 3 calls
    assert not list((cache.root / "claims").iterdir())  # claims released on the way out

    cache, summary = run_extract(folder, tmp_path / "crashed", config, batch_segments=4)
    assert not summary.failed
    for video_id in ("good", "wide"):
        expected, got = reference.load_features(video_id), cache.load_features(video_id)
        for modality in expected:
            np.testing.assert_array_equal(got[modality], expected[modality])


def test_stale_claim_of_a_killed_process_is_taken_over(clip_folder, tmp_path):
    folder = good_only(clip_folder, tmp_path)
    config = tiny_config(modalities=("rgb",), backbones={"rgb": "vst"})
    extractors = build_extractors(config, CPU, WeightsSource())
    cache = open_cache(tmp_path / "out", CacheConfig.extracted(config, extractors))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    claims = Claims(cache.root / "claims")
    host = claims.me["host"]  # claims in the format written before tokens and start times: still honoured
    claims.path("good").write_text(json.dumps({"video_id": "good", "host": host, "pid": dead.pid}))
    claims.path("wide").write_text(json.dumps({"video_id": "wide", "host": host, "pid": os.getppid()}))
    summary = extract_videos(discover_videos(folder), cache, extractors, config, progress=False)
    assert [r.video_id for r in summary.records] == ["good"]
    assert summary.claimed_elsewhere == ["wide"]  # a live process holds it: left alone


def test_random_backbones_are_seeded(clip_folder, tmp_path):
    folder = good_only(clip_folder, tmp_path)
    config = tiny_config(modalities=("flow",), backbones={"flow": "farneback"})
    first, _ = run_extract(folder, tmp_path / "a", config)
    second, _ = run_extract(folder, tmp_path / "b", config)
    other, _ = run_extract(folder, tmp_path / "c", tiny_config(modalities=("flow",), backbones={"flow": "farneback"}, seed=1))
    a, b, c = (x.load_features("wide")["flow"] for x in (first, second, other))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


# --------------------------------------------------------------------------- CLI


def test_cli_exit_codes_and_summary(clip_folder, tmp_path, capsys):
    tiny = ["--backbones", "random", "--arch-size", "tiny", "--segment-frames", "8", "--quiet"]
    folder = good_only(clip_folder, tmp_path)
    assert main(["extract", "--videos", str(folder), "--out", str(tmp_path / "ok"), "--modalities", "rgb", *tiny]) == 0
    out = capsys.readouterr().out
    assert "2 extracted" in out and "0 failed" in out
    shutil.copy(clip_folder / "empty.mp4", folder / "empty.mp4")
    assert main(["extract", "--videos", str(folder), "--out", str(tmp_path / "ok"), "--modalities", "rgb", *tiny]) == 1
    assert "empty file" in capsys.readouterr().out
    empty_folder = tmp_path / "nothing"
    empty_folder.mkdir()
    assert main(["extract", "--videos", str(empty_folder), "--out", str(tmp_path / "x"), *tiny]) == 2
    assert main(["extract", "--videos", str(folder), "--out", str(tmp_path / "x"), "--modalities", "smell", *tiny]) == 2
    with pytest.raises(SystemExit) as exc:
        main(["extract", "--videos", str(tmp_path / "does-not-exist"), "--out", str(tmp_path / "x")])
    assert exc.value.code == 2


def test_missing_weights_stop_before_any_video(clip_folder, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # no cached hub checkpoints
    folder = good_only(clip_folder, tmp_path)
    code = main(["extract", "--videos", str(folder), "--out", str(tmp_path / "out"), "--modalities", "rgb",
                 "--offline", "--weights-dir", str(tmp_path / "no-weights"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert "--weights-dir" in err and "swin3d_b" in err
    assert not list((tmp_path / "out").rglob("record.json"))


def test_fs1000_averages_the_clips_of_each_window(clip_folder, tmp_path):
    folder = good_only(clip_folder, tmp_path)
    config = tiny_config(protocol="fs1000", window_seconds=1.0, hop_seconds=0.5, clip_frames=8,
                         modalities=("rgb", "audio"), backbones={"rgb": "vst", "audio": "ast"})
    cache, summary = run_extract(folder, tmp_path / "out", config)
    assert not summary.failed
    record = cache.read_record("good")  # 80 frames at 25 fps: 25-frame windows every 12.5 frames
    assert record.num_segments == 5
    assert record.segments["start_s"] == pytest.approx([0, 0.52, 1.0, 1.52, 2.0])
    features = cache.load_features("good")
    assert features["rgb"].shape[0] == features["audio"].shape[0] == 5

    # window 1 = frames 13..36: three 8-frame clips through the backbone, averaged
    extractor = build_extractors(config, CPU, WeightsSource())["rgb"]
    video = VideoFrames(clip_folder / "good.mp4", config.decode_short_side)
    frames = video.read(np.arange(13, 37).reshape(3, 8))
    expected = extractor.embed(torch.from_numpy(frames)).mean(dim=0).numpy()
    np.testing.assert_allclose(features["rgb"][1], expected, rtol=1e-5, atol=1e-6)


def test_two_processes_on_one_output_split_the_work(clip_folder, tmp_path):
    folder = tmp_path / "videos"
    for index, name in enumerate(["good.mp4", "wide.mov", "sub/good.mp4", "ünï cødé.mkv"] * 2):
        target = folder / f"copy{index}" / Path(name).name
        target.parent.mkdir(parents=True)
        shutil.copy(clip_folder / name, target)
    command = [sys.executable, "-m", "pipeline.cli", "extract", "--videos", str(folder), "--out", str(tmp_path / "out"),
               "--modalities", "rgb", "--backbones", "random", "--arch-size", "tiny", "--segment-frames", "8",
               "--batch-segments", "2", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    workers = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env) for _ in range(2)]
    outputs = [w.communicate(timeout=300) for w in workers]
    assert [w.returncode for w in workers] == [0, 0], [o[1].decode()[-2000:] for o in outputs]
    cache = FeatureCache.open(tmp_path / "out")
    records = cache.records()
    assert len(records) == 8 and all(r.status == "done" for r in records)
    # Each process's summary table lists the videos it extracted itself (not those it skipped or left to
    # the other): together they are every video, none of them twice.
    extracted = [re.findall(r"^\s*(copy\d)/.* done ", out.decode(), re.MULTILINE) for out, _ in outputs]
    counts = [int(re.search(r"^(\d+) extracted,", out.decode(), re.MULTILINE).group(1)) for out, _ in outputs]
    assert counts == [len(ids) for ids in extracted] and sum(counts) == 8, outputs
    assert sorted(extracted[0] + extracted[1]) == [f"copy{i}" for i in range(8)]
    reference, _ = run_extract(folder, tmp_path / "single", tiny_config(modalities=("rgb",), backbones={"rgb": "vst"}))
    for record in records:
        np.testing.assert_array_equal(cache.load_features(record.video_id)["rgb"],
                                      reference.load_features(record.video_id)["rgb"])
    assert len(cache.manifest()) == 8


def test_a_cache_of_older_random_flow_features_is_not_extended(clip_folder, tmp_path):
    """Random-weight flow features changed in version 2 (scale-preserving I3D init): a version-1 cache must
    refuse new videos instead of mixing the two; pretrained flow features did not change (still version 1)."""
    config = tiny_config(modalities=("flow",))
    flow = build_extractors(config, CPU, WeightsSource())["flow"]
    assert flow.describe()["version"] == "2"
    assert flow.feature_version(dataclasses.replace(config, weights="pretrained", arch_size="full")) == "1"
    cache, _ = run_extract(good_only(clip_folder, tmp_path), tmp_path / "out", config)
    stored = cache.read_config()
    stored["extractors"]["flow"]["version"] = "1"  # as the previous code wrote it
    cache.write_config(CacheConfig.from_dict(stored))
    with pytest.raises(Exception, match="extract into a new --out folder"):
        run_extract(clip_folder / "good.mp4", tmp_path / "out", config)
