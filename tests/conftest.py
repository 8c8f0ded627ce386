"""Shared fixtures: short generated clips on disk, and a tiny random-weight extraction config."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from extractors.config import ExtractionConfig
from pipeline.samples import ClipSpec, ffmpeg_binary, write_clip

# One thread: tiny models gain nothing from more, and oversubscribed cores slow them down many-fold.
torch.set_num_threads(1)


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
    return root
