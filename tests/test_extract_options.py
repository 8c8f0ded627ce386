"""`pipeline extract` options end to end: --retry-failed, --feature-dtype float16 (read back by train
and score), and each video file hashed once per run."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from manifests.cache import FeatureCache
from pipeline import videos
from pipeline.cli import main
from pipeline.extraction import entry as extraction_entry
from tests.conftest import TINY_EXTRACT_FLAGS
from tests.fixture_numbers import assert_features_close

TINY_TRAIN = ["--epochs", "2", "--batch-size", "4", "--hidden", "32", "--device", "cpu", "--quiet"]


def count_hashes(monkeypatch) -> list:
    """The video files hashed from now on (arrays' checksums are not counted)."""
    hashed = []
    real_hash = videos.file_sha256
    monkeypatch.setattr(videos, "file_sha256", lambda path: hashed.append(path.name) or real_hash(path))
    return hashed


def test_a_failed_video_is_retried_only_with_retry_failed(clip_folder, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "videos"
    folder.mkdir()
    for name in ("good.mp4", "wide.mov"):
        shutil.copy(clip_folder / name, folder / name)
    real_build, failing = extraction_entry.build_extractors, {"on": True}

    def build_flaky(config, device, weights):
        """The real backbones, whose rgb one runs out of memory on wide.mov's frames while failing["on"]."""
        extractors = real_build(config, device, weights)
        embed = extractors["rgb"].embed

        def flaky(frames):
            if failing["on"] and frames.shape[-2] > 2 * frames.shape[-3]:  # (B, F, H, W, 3): wide only
                raise RuntimeError("CUDA out of memory")
            return embed(frames)

        extractors["rgb"].embed = flaky
        return extractors

    monkeypatch.setattr(extraction_entry, "build_extractors", build_flaky)
    args = ["extract", "--videos", str(folder), "--out", str(tmp_path / "out"), "--modalities", "rgb", *TINY_EXTRACT_FLAGS]
    assert main(args) == 1
    cache = FeatureCache.open(tmp_path / "out")
    assert cache.read_record("good").status == "done"
    assert cache.read_record("wide").error == "backbone error: RuntimeError: CUDA out of memory"
    capsys.readouterr()

    failing["on"] = False
    record_file = cache.record_path("wide")
    before = (record_file.read_bytes(), record_file.stat().st_mtime_ns)
    assert main(args) == 1  # the same file failed before: reported again, not retried
    assert "0 extracted, 1 already done, 1 failed" in capsys.readouterr().out
    assert (record_file.read_bytes(), record_file.stat().st_mtime_ns) == before

    assert main([*args, "--retry-failed"]) == 0
    assert "1 extracted, 1 already done, 0 failed" in capsys.readouterr().out
    assert cache.read_record("wide").status == "done"
    assert main([*args[:4], str(tmp_path / "reference"), *args[5:]]) == 0
    reference = FeatureCache.open(tmp_path / "reference")
    for video_id in ("good", "wide"):
        np.testing.assert_array_equal(cache.load_features(video_id)["rgb"], reference.load_features(video_id)["rgb"])


def test_float16_features_are_stored_as_float16_and_train_and_score_read_them(extracted_clips, tmp_path, monkeypatch):
    out = tmp_path / "half"
    assert main(["extract", "--videos", str(extracted_clips.videos), "--out", str(out), *TINY_EXTRACT_FLAGS,
                 "--feature-dtype", "float16"]) == 0
    half, full = FeatureCache.open(out), FeatureCache.open(extracted_clips.cache)
    assert half.read_config()["extraction"]["feature_dtype"] == "float16"
    assert [r.video_id for r in half.records()] == [r.video_id for r in full.records()]
    for record in full.records():
        for modality in record.present_modalities():
            stored = np.load(half.feature_path(record.video_id, modality))
            assert stored.dtype == np.float16
            np.testing.assert_array_equal(stored, np.load(full.feature_path(record.video_id, modality)).astype(np.float16))
            loaded = half.load_features(record.video_id)[modality]
            assert loaded.dtype == np.float32 and np.array_equal(loaded, stored.astype(np.float32))

    run = tmp_path / "run"
    assert main(["train", "--features", str(out), "--labels", str(extracted_clips.labels), "--out", str(run),
                 *TINY_TRAIN]) == 0
    unseen = tmp_path / "new" / "unseen.mp4"  # a copy: other tests in this process may have hashed the fixture's
    unseen.parent.mkdir()
    shutil.copy(extracted_clips.unseen, unseen)
    hashed = count_hashes(monkeypatch)
    scores = tmp_path / "scores.csv"
    assert main(["score", str(unseen), "--run", str(run), "--out", str(scores), "--device", "cpu", "--quiet"]) == 0
    assert hashed == ["unseen.mp4"]  # looked up and extracted on one hash
    row = pd.read_csv(scores).iloc[0]
    assert np.isfinite(row["score"]) and row["present"] == "rgb,flow"
    (new,) = FeatureCache.open(run / "score_cache").records()
    assert np.load(FeatureCache.open(run / "score_cache").feature_path(new.video_id, "rgb")).dtype == np.float16

    # a training video recorded with the sampled fingerprint of older caches is still found by it
    old = half.read_record("clip05")
    old.fingerprint = videos.legacy_fingerprint(extracted_clips.videos / "clip05.mp4")
    half.write_record(old)
    assert main(["score", str(extracted_clips.videos / "clip05.mp4"), "--run", str(run), "--out", str(scores),
                 "--device", "cpu", "--quiet"]) == 0
    assert np.isfinite(pd.read_csv(scores).iloc[0]["score"])
    assert [r.video_id for r in FeatureCache.open(run / "score_cache").records()] == [new.video_id]  # not extracted


def test_each_video_file_is_hashed_once_per_run(clip_folder, tmp_path, monkeypatch, capsys):
    """Deciding what to do, checking nothing is left (to skip building the backbones) and opening the
    video for extraction share one hash of a new or changed file; --verify hashes afresh."""
    folder = tmp_path / "videos"
    folder.mkdir()
    shutil.copy(clip_folder / "good.mp4", folder / "good.mp4")
    args = ["extract", "--videos", str(folder), "--out", str(tmp_path / "out"), "--modalities", "rgb", *TINY_EXTRACT_FLAGS]
    hashed = count_hashes(monkeypatch)
    assert main(args) == 0 and hashed == ["good.mp4"]
    data = bytearray((folder / "good.mp4").read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, new content and mtime
    (folder / "good.mp4").write_bytes(bytes(data))
    hashed.clear()
    assert main(args) == 0 and hashed == ["good.mp4"]
    assert "1 extracted, 0 already done" in capsys.readouterr().out
    hashed.clear()
    assert main([*args, "--verify"]) == 0 and "good.mp4" in hashed  # although hashed unchanged in this process
    assert "0 extracted, 1 already done" in capsys.readouterr().out


def test_a_cache_written_before_the_loop_was_split_is_kept_and_reproduced(tmp_path, capsys):
    """tests/fixtures/extractloop: two clips extracted by the previous loop, sharing a batch. A rerun on
    that cache keeps both; a fresh extraction gives the same arrays within the cross-CPU tolerance
    (tests/fixture_numbers.py), and a second fresh one on this machine gives them bit for bit."""
    fixture = Path(__file__).parent / "fixtures" / "extractloop"
    shutil.copytree(fixture / "videos", tmp_path / "videos")  # new mtimes: the files are rehashed, found equal
    shutil.copytree(fixture / "cache", tmp_path / "old")
    base = ["extract", "--videos", str(tmp_path / "videos"), *TINY_EXTRACT_FLAGS, "--batch-segments", "3"]
    assert main([*base, "--out", str(tmp_path / "old")]) == 0
    assert "0 extracted, 2 already done, 0 failed" in capsys.readouterr().out
    assert main([*base, "--out", str(tmp_path / "new")]) == 0
    assert main([*base, "--out", str(tmp_path / "again")]) == 0
    old, new, again = (FeatureCache.open(tmp_path / name) for name in ("old", "new", "again"))
    assert old.root.name == new.root.name
    for video_id in ("quiet", "tiny"):
        assert set(new.load_features(video_id)) == set(old.load_features(video_id))
        for modality in old.read_record(video_id).present_modalities():
            stored, made, remade = (np.load(c.feature_path(video_id, modality)) for c in (old, new, again))
            assert stored.dtype == made.dtype
            assert_features_close(made, stored, modality, video_id)
            np.testing.assert_array_equal(remade, made, err_msg=f"{video_id} {modality}: same machine, same code")
        assert new.read_record(video_id).segments == old.read_record(video_id).segments


def test_another_flow_runtime_extracts_into_its_own_folder_within_tolerance_of_torch(clip_folder, tmp_path):
    folder = tmp_path / "videos"
    folder.mkdir()
    shutil.copy(clip_folder / "good.mp4", folder / "good.mp4")
    flags = ["extract", "--videos", str(folder), "--modalities", "flow", *TINY_EXTRACT_FLAGS]
    assert main([*flags, "--out", str(tmp_path / "torch")]) == 0
    assert main([*flags, "--out", str(tmp_path / "ort"), "--flow-runtime", "onnxruntime"]) == 0
    eager, ort = FeatureCache.open(tmp_path / "torch"), FeatureCache.open(tmp_path / "ort")
    assert ort.root.name != eager.root.name  # a setting that changes the numbers names its own folder
    config = ort.read_config()
    assert config["extraction"]["settings"]["flow"]["flow_runtime"] == "onnxruntime"
    assert config["extractors"]["flow"]["runtime"].startswith("onnxruntime ")
    assert "runtime" not in eager.read_config()["extractors"]["flow"]  # torch's caches describe as before
    expected, got = eager.load_features("good")["flow"], ort.load_features("good")["flow"]
    assert expected.shape == got.shape and np.abs(expected).max() > 0.01
    assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()  # the stated tolerance (README)
