"""Extraction's defences: colliding names, permissions, symlinked folders, damaged or non-finite
arrays, whole-file fingerprints, batching-independent features, caches written before all this."""

from __future__ import annotations

import json
import os
import shutil
import stat

import numpy as np
import pytest
import torch

from extractors.base import WeightsSource, build_extractors
from extractors.config import ExtractionConfig
from extractors.decode import DecodeError, VideoFrames, audio_windows, load_audio, open_audio, read_audio_windows
from manifests.cache import CacheConfig, FeatureCache, open_cache, video_dir_name
from pipeline.extraction import source as extract_source
from pipeline.cli import main
from pipeline.extraction import entry as extraction_entry
from pipeline.extraction.loop import extract_videos
from pipeline.samples import ClipSpec, write_clip
from pipeline.videos import discover_videos, file_fingerprint, legacy_fingerprint, same_file
from tests.conftest import TINY_EXTRACT_FLAGS, tiny_config

CPU = torch.device("cpu")
RGB_ONLY = dict(modalities=("rgb",), backbones={"rgb": "vst"})


def extract(videos, out, config, extractors=None, **kwargs):
    extractors = extractors or build_extractors(config, CPU, WeightsSource())
    cache = open_cache(out, CacheConfig.extracted(config, extractors))
    return cache, extract_videos(discover_videos(videos), cache, extractors, config, progress=False, **kwargs)


def copy_clips(clip_folder, folder, names=("good.mp4", "wide.mov")):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy(clip_folder / name, folder / name)
    return folder


def test_video_ids_never_collide_with_cache_files(clip_folder, tmp_path):
    videos = tmp_path / "videos"
    (videos / "x").mkdir(parents=True)
    shutil.copy(clip_folder / "good.mp4", videos / "x.mp4")
    shutil.copy(clip_folder / "wide.mov", videos / "x" / "record.json.mp4")  # would be the file videos/x/record.json
    shutil.copy(clip_folder / "good.mp4", videos / "x" / "rgb.npy.mp4")  # ... and videos/x/rgb.npy
    shutil.copy(clip_folder / "good.mp4", videos / "x" / "%y.mp4")
    config = tiny_config(**RGB_ONLY)
    cache, summary = extract(videos, tmp_path / "out", config)
    assert not summary.failed
    ids = ["x", "x/%y", "x/record.json", "x/rgb.npy"]
    assert [r.video_id for r in cache.records()] == ids
    assert video_dir_name("x/record.json") == "x/%record.json" and video_dir_name("x/%y") == "x/%%y"
    for video_id in ids:
        assert cache.load_features(video_id)["rgb"].shape[1] == cache.feature_dims["rgb"]
    assert len(cache.manifest()) == 4
    _, again = extract(videos, tmp_path / "out", config)
    assert sorted(again.skipped) == ids


def test_files_are_created_with_the_users_umask(clip_folder, tmp_path):
    from models.checkpoint import save_tensors

    previous = os.umask(0o002)
    try:
        cache, _ = extract(copy_clips(clip_folder, tmp_path / "videos", ("good.mp4",)), tmp_path / "out",
                           tiny_config(**RGB_ONLY))
        save_tensors(tmp_path / "run" / "best.safetensors", {"w": torch.zeros(2)})
    finally:
        os.umask(previous)
    files = [p for p in (tmp_path / "out").rglob("*") if p.is_file()] + [tmp_path / "run" / "best.safetensors"]
    assert len(files) >= 5
    modes = {p.relative_to(tmp_path).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in files}
    assert set(modes.values()) == {0o664}, modes  # group-readable and -writable, as the umask says


def test_symlinked_folders_are_followed_once(clip_folder, tmp_path):
    videos = copy_clips(clip_folder, tmp_path / "videos" / "clips", ("good.mp4",)).parent
    elsewhere = copy_clips(clip_folder, tmp_path / "elsewhere", ("wide.mov",))
    (videos / "more").symlink_to(elsewhere, target_is_directory=True)
    (videos / "clips" / "loop").symlink_to(videos, target_is_directory=True)  # a loop back up the tree
    assert [(s.video_id, s.path.name) for s in discover_videos(videos)] == [("clips/good", "good.mp4"),
                                                                            ("more/wide", "wide.mov")]


def test_same_size_edit_in_the_middle_changes_the_fingerprint(tmp_path):
    path = tmp_path / "big.mp4"
    data = bytearray(np.random.default_rng(0).integers(0, 256, 12 << 20, dtype=np.uint8).tobytes())
    path.write_bytes(data)
    size, before = file_fingerprint(path)
    legacy_before = legacy_fingerprint(path)
    data[6 << 20 : (6 << 20) + (64 << 10)] = bytes(64 << 10)  # 64 KiB zeroed in the middle, same size
    path.write_bytes(data)
    assert file_fingerprint(path) == (size, file_fingerprint(path)[1]) and file_fingerprint(path)[1] != before
    assert legacy_fingerprint(path) == legacy_before  # what the sampled fingerprint used to miss


def test_changed_file_is_redone_and_a_touched_one_is_not(clip_folder, tmp_path):
    videos = copy_clips(clip_folder, tmp_path / "videos", ("good.mp4", "wide.mov"))
    config = tiny_config(**RGB_ONLY)
    extractors = build_extractors(config, CPU, WeightsSource())
    cache, _ = extract(videos, tmp_path / "out", config, extractors)
    record = cache.read_record("good")
    assert record.fingerprint.startswith("sha256:") and record.mtime_ns == (videos / "good.mp4").stat().st_mtime_ns
    os.utime(videos / "good.mp4")  # same content, new mtime: rehashed, found equal, kept
    data = bytearray((videos / "wide.mov").read_bytes())
    middle = len(data) // 2
    data[middle : middle + 16] = bytes(x ^ 0xFF for x in data[middle : middle + 16])
    (videos / "wide.mov").write_bytes(data)  # same size, new content
    assert same_file(cache.read_record("good"), videos / "good.mp4")
    assert not same_file(cache.read_record("wide"), videos / "wide.mov")
    _, summary = extract(videos, tmp_path / "out", config, extractors)
    assert summary.skipped == ["good"] and [r.video_id for r in summary.records] == ["wide"]


def test_damaged_arrays_are_redone_and_verify_checks_contents(clip_folder, tmp_path):
    videos = copy_clips(clip_folder, tmp_path / "videos", ("good.mp4", "wide.mov"))
    config = tiny_config(modalities=("rgb", "audio"), backbones={"rgb": "vst", "audio": "ast"})
    extractors = build_extractors(config, CPU, WeightsSource())
    cache, _ = extract(videos, tmp_path / "out", config, extractors)
    reference = {v: cache.load_features(v) for v in ("good", "wide")}
    record = cache.read_record("good").modalities["rgb"]
    assert record.bytes == cache.feature_path("good", "rgb").stat().st_size and record.sha256.startswith("sha256:")

    def rerun(**kwargs):
        _, summary = extract(videos, tmp_path / "out", config, extractors, **kwargs)
        return [r.video_id for r in summary.records]

    rgb, audio = cache.feature_path("good", "rgb"), cache.feature_path("wide", "audio")
    rgb.write_bytes(rgb.read_bytes()[:-7])  # truncated
    audio.write_bytes(b"")  # emptied
    assert rerun() == ["good", "wide"]
    cache.feature_path("good", "audio").unlink()  # deleted
    assert rerun() == ["good"]
    data = bytearray(rgb.read_bytes())
    data[-4:] = np.float32(123.0).tobytes()  # same size, header intact: only the checksum tells
    rgb.write_bytes(bytes(data))
    assert rerun() == []  # the cheap check (sizes and shapes) cannot see it
    assert rerun(verify=True) == ["good"]
    for video_id, arrays in reference.items():
        for modality, array in arrays.items():
            np.testing.assert_array_equal(cache.load_features(video_id)[modality], array)


def test_non_finite_features_fail_the_video_naming_the_modality(clip_folder, tmp_path):
    videos = copy_clips(clip_folder, tmp_path / "videos", ("good.mp4", "wide.mov"))
    config = tiny_config(modalities=("rgb", "audio"), backbones={"rgb": "vst", "audio": "ast"})
    extractors = build_extractors(config, CPU, WeightsSource())
    real_embed = extractors["audio"].embed

    def nan_for_short_windows(windows):
        out = real_embed(windows)
        out[0, 3] = float("nan") if len(windows[0]) == round(8 / 25 * 16000) else out[0, 3]  # good.mp4 (25 fps)
        return out

    extractors["audio"].embed = nan_for_short_windows
    cache, summary = extract(videos, tmp_path / "out", config, extractors, batch_segments=1)
    assert [r.video_id for r in summary.failed] == ["good"]
    record = cache.read_record("good")
    assert record.status == "failed" and record.error.startswith("audio features: NaN/inf values in 10 of 10 segments (first: segment 0)")
    assert record.modalities["audio"].status == "failed" and "not saved" in record.modalities["rgb"].reason
    assert not cache.feature_path("good", "audio").exists() and cache.read_record("wide").status == "done"

    half = tiny_config(**RGB_ONLY, feature_dtype="float16")
    rgb = build_extractors(half, CPU, WeightsSource())
    rgb["rgb"].embed = lambda frames: torch.full((len(frames), rgb["rgb"].feature_dim), 1e6)  # > float16 max
    cache, summary = extract(videos, tmp_path / "half", half, rgb)
    assert len(summary.failed) == 2 and all(r.error.startswith("rgb features: NaN/inf") for r in summary.failed)


def test_features_do_not_depend_on_batching(clip_folder, tmp_path):
    """Bitwise: every modality, batches of 1, 3 and 8 segments filled across videos (as with two
    processes splitting the videos differently)."""
    videos = copy_clips(clip_folder, tmp_path / "videos", ("good.mp4", "wide.mov", "ünï cødé.mkv"))
    config = tiny_config()
    extractors = build_extractors(config, CPU, WeightsSource())
    results = []
    for batch in (1, 3, 8):
        cache, summary = extract(videos, tmp_path / f"b{batch}", config, extractors, batch_segments=batch)
        assert not summary.failed
        results.append({r.video_id: cache.load_features(r.video_id) for r in cache.records()})
    for other in results[1:]:
        for video_id, arrays in results[0].items():
            for modality, array in arrays.items():
                np.testing.assert_array_equal(other[video_id][modality], array, err_msg=f"{video_id} {modality}")


def test_audio_read_per_window_equals_the_whole_track_cut(clip_folder):
    config = tiny_config(segment_frames=8)
    plan = VideoFrames(clip_folder / "good.mp4", 64).plan(config)
    whole = audio_windows(load_audio(clip_folder / "good.mp4", 16000), plan, 16000)
    stream = open_audio(clip_folder / "good.mp4", 16000)
    parts = read_audio_windows(stream, plan, 16000, range(2, 7))
    stream.close()
    for got, expected in zip(parts, whole[2:7]):
        np.testing.assert_array_equal(got, expected)


def test_overlapping_audio_windows_are_read_without_holding_the_track(tmp_path):
    """fs1000 windows (5 s every 2 s) overlap: each is read from the stream as from the whole track,
    and the stream never holds more than one window."""
    write_clip(ClipSpec("long", 0.5, seconds=11.0, width=64, height=48, seed=9), tmp_path / "long.mp4")
    config = ExtractionConfig(protocol="fs1000")
    plan = VideoFrames(tmp_path / "long.mp4", 48).plan(config)
    track = load_audio(tmp_path / "long.mp4", 16000)
    stream = open_audio(tmp_path / "long.mp4", 16000)
    windows = read_audio_windows(stream, plan, 16000, range(plan.num_segments))
    stream.close()
    assert plan.num_segments == 4
    for got, expected in zip(windows, audio_windows(track, plan, 16000)):
        np.testing.assert_array_equal(got, expected)
    assert stream.max_held == 5 * 16000 < len(track) / 2


def test_extraction_holds_one_audio_window_at_a_time(clip_folder, tmp_path, monkeypatch):
    """The audio streams extraction opens never hold more samples than one window, while the track is
    ten windows long: reading the whole track at once (as decord's AudioReader did) fails here."""
    opened = []

    def recording_open_audio(path, sample_rate):
        stream = open_audio(path, sample_rate)
        opened.append(stream)
        return stream

    monkeypatch.setattr(extract_source, "open_audio", recording_open_audio)
    videos = copy_clips(clip_folder, tmp_path / "videos", ("good.mp4",))
    config = tiny_config(segment_frames=8, modalities=("audio",), backbones={"audio": "ast"})
    cache, summary = extract(videos, tmp_path / "out", config)
    assert not summary.failed and cache.load_features("good")["audio"].shape[0] == 10
    (stream,) = opened
    window = round(8 / 25 * 16000)
    assert 0 < stream.max_held <= window
    assert len(load_audio(videos / "good.mp4", 16000)) >= 10 * window
    assert stream._process.poll() is not None  # the ffmpeg process ended with the video


def test_decoding_runs_at_most_a_few_segments_ahead_of_the_backbones(tmp_path, monkeypatch):
    """Decoded frames wait for the backbones in a bounded queue: segments decoded but not yet embedded
    never exceed LOOKAHEAD_SEGMENTS plus the batch being decoded and the batch being embedded, however
    long the video. (A queue of 4 batches let 32 segments wait at 8 per batch: a long video's peak grew.)"""
    write_clip(ClipSpec("long", 0.5, seconds=24.0, width=160, height=120, seed=1, with_audio=False),
               tmp_path / "videos" / "long.mp4")
    config = tiny_config(segment_frames=8, modalities=("rgb",), backbones={"rgb": "vst"})
    extractors = build_extractors(config, CPU, WeightsSource())
    counts = {"decoded": 0, "embedded": 0, "ahead": 0}
    original_read, original_embed = VideoFrames.read, extractors["rgb"].embed

    def counting_read(self, frame_indices):
        frames = original_read(self, frame_indices)
        counts["decoded"] += len(frame_indices)
        counts["ahead"] = max(counts["ahead"], counts["decoded"] - counts["embedded"])
        return frames

    def counting_embed(batch):
        features = original_embed(batch)
        counts["embedded"] += len(batch)
        return features

    monkeypatch.setattr(VideoFrames, "read", counting_read)
    monkeypatch.setattr(extractors["rgb"], "embed", counting_embed)
    batch = 8
    cache, summary = extract(tmp_path / "videos", tmp_path / "out", config, extractors, batch_segments=batch)
    segments = cache.load_features("long")["rgb"].shape[0]
    assert not summary.failed and segments >= 60 and counts["embedded"] == segments
    assert counts["ahead"] <= extract_source.LOOKAHEAD_SEGMENTS + 2 * batch, counts


def test_unreadable_audio_is_a_one_line_decode_error(clip_folder):
    with pytest.raises(DecodeError) as error:
        open_audio(clip_folder / "notvideo.avi", 16000)
    message = str(error.value)
    assert message.startswith("cannot decode audio: ") and "\n" not in message, message
    assert open_audio(clip_folder / "sub" / "good.mp4", 16000) is None  # no track: missing, not an error


def test_extract_with_nothing_to_do_builds_no_backbone(clip_folder, tmp_path, monkeypatch, capsys):
    videos = copy_clips(clip_folder, tmp_path / "videos", ("good.mp4",))
    args = ["extract", "--videos", str(videos), "--out", str(tmp_path / "out"), "--modalities", "rgb", *TINY_EXTRACT_FLAGS]
    assert main(args) == 0
    capsys.readouterr()

    def refuse(*_, **__):
        raise AssertionError("backbones built although every video is done")

    monkeypatch.setattr(extraction_entry, "build_extractors", refuse)
    assert main(args) == 0
    assert "0 extracted, 1 already done" in capsys.readouterr().out
    cache = FeatureCache.open(tmp_path / "out")
    cache.feature_path("good", "rgb").write_bytes(b"")
    with pytest.raises(AssertionError, match="backbones built"):
        main(args)  # a damaged array is work to do


def test_leftover_temporary_files_are_cleaned_when_the_video_is_redone(clip_folder, tmp_path):
    videos = copy_clips(clip_folder, tmp_path / "videos", ("good.mp4",))
    config = tiny_config(**RGB_ONLY)
    cache, _ = extract(videos, tmp_path / "out", config)
    left = cache.video_dir("good") / ".rgb.npy.k3j2h1g0.tmp"  # as a kill during a write leaves it
    left.write_bytes(b"partial")
    cache.record_path("good").unlink()
    extract(videos, tmp_path / "out", config)
    assert not left.exists() and cache.read_record("good").status == "done"


def test_a_cache_written_before_these_changes_still_opens_and_is_kept(clip_folder, tmp_path):
    """Records as the previous code wrote them: sampled fingerprint, no mtime, sizes or checksums,
    the folder named by the raw id."""
    videos = copy_clips(clip_folder, tmp_path / "videos", ("good.mp4",))
    (videos / "other").mkdir()
    shutil.copy(clip_folder / "wide.mov", videos / "other" / "rgb.npy.mov")  # escaped now; raw was fine here
    config = tiny_config(**RGB_ONLY)
    extractors = build_extractors(config, CPU, WeightsSource())
    cache, _ = extract(videos, tmp_path / "out", config, extractors)
    shutil.move(cache.videos_dir / "other" / "%rgb.npy", cache.videos_dir / "other" / "rgb.npy")
    for path in cache.videos_dir.rglob("record.json"):
        record = json.loads(path.read_text())
        source = videos / ("good.mp4" if record["video_id"] == "good" else "other/rgb.npy.mov")
        record["fingerprint"] = legacy_fingerprint(source)
        del record["mtime_ns"]
        for modality in record["modalities"].values():
            del modality["bytes"], modality["sha256"]
        path.write_text(json.dumps(record))
    old = FeatureCache.open(tmp_path / "out")
    assert [r.video_id for r in old.records()] == ["good", "other/rgb.npy"]
    assert old.load_features("other/rgb.npy")["rgb"].shape[0] == old.read_record("other/rgb.npy").num_segments
    _, summary = extract(videos, tmp_path / "out", config, extractors)
    assert sorted(summary.skipped) == ["good", "other/rgb.npy"] and not summary.records
