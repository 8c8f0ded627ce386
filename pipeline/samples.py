"""Synthetic performance clips, made on the spot for the demo and the tests.

A clip shows a bright disc moving over a textured floor, with an optional soundtrack. A hidden
quality q in [0, 1] shapes it: a better performance moves faster and more smoothly and its music is
steadier. The clips are real H.264/AAC files written by the ffmpeg binary that imageio-ffmpeg ships,
so they go through exactly the decoding path real videos take.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class ClipSpec:
    name: str
    quality: float  # hidden quality in [0, 1]; the clip's label is derived from it
    seconds: float = 3.0
    fps: float = 25.0
    width: int = 192
    height: int = 144
    with_audio: bool = True
    seed: int = 0


def ffmpeg_binary() -> str:
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def render_frames(spec: ClipSpec) -> np.ndarray:
    """uint8 (N, H, W, 3) frames of the performance."""
    rng = np.random.default_rng(spec.seed)
    count = int(round(spec.seconds * spec.fps))
    yy, xx = np.mgrid[0 : spec.height, 0 : spec.width].astype(np.float32)
    floor = (
        96 + 40 * np.sin(xx / 7.0 + rng.uniform(0, 6)) * np.cos(yy / 9.0 + rng.uniform(0, 6))
    ).astype(np.float32)
    radius = 0.12 * min(spec.width, spec.height)
    speed = 0.5 + 1.5 * spec.quality  # loops around the floor per clip
    wobble = (1.0 - spec.quality) * 0.25
    frames = np.empty((count, spec.height, spec.width, 3), np.uint8)
    for index in range(count):
        t = index / max(count - 1, 1)
        phase = 2 * np.pi * speed * t + wobble * np.sin(37 * t + rng.uniform(0, 0.3))
        cx = spec.width * (0.5 + 0.3 * np.cos(phase))
        cy = spec.height * (0.5 + 0.3 * np.sin(2 * phase))
        disc = ((xx - cx) ** 2 + (yy - cy) ** 2) < radius**2
        image = np.repeat(floor[..., None], 3, axis=2)
        image[disc] = (230, 200 - 120 * spec.quality, 60 + 150 * spec.quality)
        frames[index] = np.clip(image + rng.normal(0, 3, image.shape), 0, 255)
    return frames


def render_audio(spec: ClipSpec, sample_rate: int = 44100) -> np.ndarray:
    """float32 mono soundtrack: a beat whose steadiness and pitch follow the quality."""
    rng = np.random.default_rng(spec.seed + 1)
    t = np.arange(int(spec.seconds * sample_rate)) / sample_rate
    pitch = 220 + 440 * spec.quality
    jitter = (1 - spec.quality) * 0.2 * np.sin(2 * np.pi * 0.7 * t)
    beat = 0.5 * (1 + np.sign(np.sin(2 * np.pi * (2 + jitter) * t)))
    tone = np.sin(2 * np.pi * pitch * t) * (0.3 + 0.5 * beat)
    return (0.4 * tone + 0.02 * rng.normal(size=t.shape)).astype(np.float32)


def write_clip(spec: ClipSpec, path: Path) -> Path:
    """Write the clip as H.264 (+ AAC when spec.with_audio) to `path` (mp4/mkv/mov by extension)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = render_frames(spec)
    command = [ffmpeg_binary(), "-y", "-loglevel", "error"]
    command += ["-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{spec.width}x{spec.height}"]
    command += ["-r", f"{spec.fps}", "-i", "pipe:0"]
    audio_file = None
    if spec.with_audio:
        audio_file = path.with_suffix(".tmp.f32")
        render_audio(spec).tofile(audio_file)
        command += ["-f", "f32le", "-ar", "44100", "-ac", "1", "-i", str(audio_file)]
    command += ["-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p"]
    if spec.with_audio:
        command += ["-c:a", "aac", "-b:a", "96k"]
    command += [str(path)]
    try:
        subprocess.run(command, input=frames.tobytes(), check=True, capture_output=True)
    except subprocess.CalledProcessError as exc:
        raise RuntimeError(f"ffmpeg could not write {path}: {exc.stderr.decode(errors='replace')}") from None
    finally:
        if audio_file is not None:
            audio_file.unlink(missing_ok=True)
    return path


def score_of(quality: float, score_range: float = 25.0) -> float:
    """The label a judge would give a performance of hidden quality q (RG-like 0-25 scale)."""
    return round(score_range * (0.3 + 0.6 * quality), 3)


def sample_set(count: int, seed: int = 0, without_audio_every: int = 3) -> list[ClipSpec]:
    """`count` clips of spread-out quality; every `without_audio_every`-th one has no audio track."""
    rng = np.random.default_rng(seed)
    qualities = rng.permutation(np.linspace(0.05, 0.95, count))
    return [
        ClipSpec(
            name=f"clip{index:02d}",
            quality=float(q),
            seconds=float(rng.uniform(2.6, 4.0)),
            with_audio=(without_audio_every <= 0 or index % without_audio_every != without_audio_every - 1),
            seed=seed * 1000 + index,
        )
        for index, q in enumerate(qualities)
    ]
