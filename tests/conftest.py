"""Shared fixtures: short generated clips on disk, a tiny random-weight extraction config, labelled
clips extracted with it, and a tiny offline LLM folder for LIMSSR; fsync skipped for the files tests
write."""

from __future__ import annotations

import csv
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from extractors.config import ExtractionConfig
from extractors.decode import ffmpeg_binary
from pipeline.samples import ClipSpec, sample_set, score_of, write_clip

# One thread: tiny models gain nothing from more, and oversubscribed cores slow them down many-fold.
torch.set_num_threads(1)

REAL_FSYNC = os.fsync


def checked_no_sync(fd: int) -> None:
    os.fstat(fd)  # a bad descriptor still fails, as fsync would


@pytest.fixture(scope="session", autouse=True)
def no_fsync():
    """Files written in a test's temporary folder are thrown away: syncing each to disk only waits on
    it (a training test writes its resume state every epoch: 3 s of test_train's 41 s MCMoE test on a
    quiet disk, 10 s of 62 s profiled on a busy one).
    tests/test_outputs.py::test_an_atomic_write_is_synced_before_the_rename runs the real fsync.
    Processes the tests start (CLI subprocesses, Ray workers) still sync."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "fsync", checked_no_sync)
        yield


def tiny_config(**overrides) -> ExtractionConfig:
    """The real extractors (VST, Farneback + I3D, AST) in tiny random-weight form."""
    settings = dict(
        modalities=("rgb", "flow", "audio"),
        backbones={"rgb": "vst", "flow": "farneback", "audio": "ast"},
        weights="random",
        arch_size="tiny",
        segment_frames=8,
    )
    settings.update(overrides)
    return ExtractionConfig(**settings)


def write_audio_only(path: Path, seconds: float = 2.0) -> Path:
    command = [ffmpeg_binary(), "-y", "-loglevel", "error", "-f", "lavfi", "-i",
               f"sine=frequency=330:sample_rate=44100:duration={seconds}", "-c:a", "aac", str(path)]
    subprocess.run(command, check=True, capture_output=True)
    return path


@pytest.fixture(scope="session")
def clip_folder(tmp_path_factory) -> Path:
    """A folder of videos covering the cases extraction must handle.

    good:      with audio, 25 fps, 3.2 s            sub/good:   same name in a sub-folder, no audio
    wide:      320x120 at 30 fps, with audio        ünï cødé:   non-ASCII name, no audio, mkv
    short:     0.2 s (too short for one segment)    empty:      0 bytes
    notvideo:  a text file named .avi               audioonly:  an AAC track in an mp4, no video
    truncated: the first half of good.mp4           rotated:    good.mp4 with 90-degree rotation metadata
    """
    root = tmp_path_factory.mktemp("clips")
    write_clip(ClipSpec("good", 0.7, seconds=3.2, seed=1), root / "good.mp4")
    write_clip(ClipSpec("good", 0.3, seconds=2.0, with_audio=False, seed=2), root / "sub" / "good.mp4")
    write_clip(ClipSpec("wide", 0.5, seconds=2.0, fps=30, width=320, height=120, seed=3), root / "wide.mov")
    write_clip(ClipSpec("uni", 0.4, seconds=1.5, with_audio=False, seed=4), root / "ünï cødé.mkv")
    write_clip(ClipSpec("short", 0.4, seconds=0.2, seed=5), root / "short.mp4")
    (root / "empty.mp4").write_bytes(b"")
    (root / "notvideo.avi").write_text("this is not a video\n")
    write_audio_only(root / "audioonly.mp4")
    write_truncated(root / "good.mp4", root / "truncated.mp4")
    rotate(root / "good.mp4", root / "rotated.mp4")
    return root


def write_truncated(source: Path, path: Path) -> Path:
    """The first half of an mp4 whose index is at the front (+faststart): opens, but its frames are gone."""
    indexed = path.with_suffix(".full.mp4")
    subprocess.run([ffmpeg_binary(), "-y", "-loglevel", "error", "-i", str(source), "-c", "copy",
                    "-movflags", "+faststart", str(indexed)], check=True, capture_output=True)
    data = indexed.read_bytes()
    indexed.unlink()
    path.write_bytes(data[: len(data) // 2])
    return path


def rotate(source: Path, path: Path, degrees: int = 90) -> Path:
    """A copy carrying display-rotation metadata, as phones write portrait videos."""
    subprocess.run([ffmpeg_binary(), "-y", "-loglevel", "error", "-display_rotation", str(degrees), "-i", str(source),
                    "-c", "copy", str(path)], check=True, capture_output=True)
    return path


# `pipeline extract` flags of the tiny random-weight backbones (the same features as tiny_config()).
TINY_EXTRACT_FLAGS = ["--backbones", "random", "--arch-size", "tiny", "--flow", "farneback",
                      "--segment-frames", "8", "--device", "cpu", "--quiet"]


@dataclass
class ExtractedClips:
    root: Path
    videos: Path  # clip00.mp4 ... clip07.mp4
    cache: Path  # `pipeline extract --out` folder of those videos
    labels: Path  # video_id,score,split: clip06 and clip07 are split=test
    unseen: Path  # a clip without audio, in no cache


@pytest.fixture(scope="session")
def extracted_clips(tmp_path_factory) -> ExtractedClips:
    """Eight labelled generated clips (every third without audio) extracted once per session through the
    CLI with the tiny backbones; tests write their runs elsewhere and never add to this cache."""
    from pipeline.cli import main

    root = tmp_path_factory.mktemp("extracted")
    videos = root / "videos"
    with open(root / "labels.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["video_id", "score", "split"])
        for index, spec in enumerate(sample_set(8, seed=3)):
            write_clip(ClipSpec(spec.name, spec.quality, seconds=1.5, with_audio=spec.with_audio, seed=spec.seed),
                       videos / f"{spec.name}.mp4")
            writer.writerow([spec.name, score_of(spec.quality), "test" if index >= 6 else "train"])
    assert main(["extract", "--videos", str(videos), "--out", str(root / "cache"), *TINY_EXTRACT_FLAGS]) == 0
    unseen = write_clip(ClipSpec("unseen", 0.6, seconds=1.2, with_audio=False, seed=77), root / "new" / "unseen.mp4")
    return ExtractedClips(root, videos, root / "cache", root / "labels.csv", unseen)


@pytest.fixture(scope="session")
def tiny_llm_folder(tmp_path_factory) -> Path:
    """A 2-layer random-weight Qwen2 LM with its tokenizer, usable as `--llm FOLDER`."""
    from models.tiny_llm import save_tiny_llm

    return save_tiny_llm(tmp_path_factory.mktemp("tiny_llm"), hidden_size=32, num_heads=4, num_kv_heads=2)
