"""Synthetic performance clips that carry a score, made on the spot for the demo and the tests.

A clip shows a striped disc (the performer) circling over a textured floor, with an optional
soundtrack. Four hidden latents in [0, 1] shape it, as in real judging where every modality shows
part of the performance and no single one shows all of it:

    quality     shared by every modality (a good performer moves, looks and sounds better)
    appearance  seen only in the picture: the costume's colour and the density of its stripes
    motion      seen only in the movement: how fast the performer circles (pixels per second)
    sound       heard only in the soundtrack: the key, tempo and loudness of the music

Each modality shows `SHARED_WEIGHT * quality + (1 - SHARED_WEIGHT) * its own latent` (its level), and
the judge's score is the mean of the three levels (`ClipSpec.label`). So every modality alone predicts the score
partly (Spearman about 0.8 with these weights), the three together predict it fully, and a missing
modality can be partly guessed from the others through the shared latent, which is what MCMoE's
generators are for. The signals are chosen to survive random-weight backbones: colour and texture
reach Video Swin's pooled tokens, speed is what Farneback flow measures, pitch moves energy between
AST's mel bins.

The music also changes from phrase to phrase (phrases of 0.4 to 0.9 s, up to 0.2 octave around the
clip's key, louder as it rises): musical content, not quality. `music_starts_s` / `music_ends_s` put
silence around the music, which lets a test check that audio windows line up with the video segments.

The clips are real H.264/AAC files written by the ffmpeg binary that imageio-ffmpeg ships, so they
go through exactly the decoding path real videos take.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from extractors.decode import ffmpeg_binary

SHARED_WEIGHT = 0.5
MODALITY_LATENTS = {"rgb": "appearance", "flow": "motion", "audio": "sound"}
AUDIO_RATE = 44100


@dataclass(frozen=True)
class ClipSpec:
    name: str
    quality: float  # the latent every modality shows, in [0, 1]
    seconds: float = 3.0
    fps: float = 25.0
    width: int = 192
    height: int = 144
    with_audio: bool = True
    seed: int = 0
    appearance: float | None = None  # latent only the picture shows (None: equal to quality)
    motion: float | None = None  # latent only the movement shows
    sound: float | None = None  # latent only the soundtrack shows
    flat: tuple[str, ...] = ()  # modalities whose signal is removed: rendered at a fixed level, label unchanged
    music_starts_s: float = 0.0  # silence before the music (the audio track still covers the whole clip)
    music_ends_s: float | None = None  # silence after it

    def level(self, modality: str) -> float:
        """How good the performance is in what `modality` perceives, in [0, 1]."""
        own = getattr(self, MODALITY_LATENTS[modality])
        own = self.quality if own is None else own
        return SHARED_WEIGHT * self.quality + (1 - SHARED_WEIGHT) * own

    def shown(self, modality: str) -> float:
        """What the clip shows of `level(modality)`: a fixed 0.5 for a modality in `flat`."""
        return 0.5 if modality in self.flat else self.level(modality)

    @property
    def overall(self) -> float:
        """The performance a judge scores: the mean of the three levels, in [0, 1]."""
        return float(np.mean([self.level(m) for m in MODALITY_LATENTS]))

    @property
    def label(self) -> float:
        return score_of(self.overall)

    def phrases(self) -> tuple[np.ndarray, np.ndarray]:
        """(start seconds, pitch offset in octaves) of the music's phrases; the first starts at 0."""
        rng = np.random.default_rng(self.seed + 2)
        starts, offsets, t = [], [], 0.0
        while t < self.seconds:
            starts.append(t)
            offsets.append(rng.uniform(-0.2, 0.2))
            t += rng.uniform(0.4, 0.9)
        return np.array(starts), np.array(offsets)

    def key_hz(self) -> float:
        return 165.0 * 2.0 ** (3.0 * self.shown("audio"))  # 165 Hz to 1320 Hz


def render_frames(spec: ClipSpec) -> np.ndarray:
    """uint8 (N, H, W, 3) frames of the performance."""
    rng = np.random.default_rng(spec.seed)
    count = int(round(spec.seconds * spec.fps))
    yy, xx = np.mgrid[0 : spec.height, 0 : spec.width].astype(np.float32)
    floor = 96 + 40 * np.sin(xx / rng.uniform(5, 9) + rng.uniform(0, 6)) * np.cos(yy / rng.uniform(7, 11) + rng.uniform(0, 6))
    floor = np.repeat(floor[..., None], 3, axis=2) * rng.uniform(0.93, 1.07, size=3)  # lighting differs per venue
    side = min(spec.width, spec.height)
    radius = 0.24 * side
    # appearance: costume colour from orange to violet, stripes from sparse to dense
    look = spec.shown("rgb")
    colour = np.array([235 - 150 * look, 150 - 60 * look, 40 + 200 * look], np.float32)
    stripe_period = side * (0.16 - 0.11 * look)
    # motion: angular speed chosen so the performer covers 40 to 160 px per second at a 144-pixel short side
    path_radius = 0.26 * side
    px_per_second = (side / 144) * (40 + 120 * spec.shown("flow"))
    angular_speed = px_per_second / path_radius
    phase0 = rng.uniform(0, 2 * np.pi)
    # sensor noise: a few noise frames drawn once and reused, which looks the same to the backbones
    noise = rng.normal(0, 3, size=(4, *floor.shape)).astype(np.float32)
    frames = np.empty((count, spec.height, spec.width, 3), np.uint8)
    for index in range(count):
        phase = phase0 + angular_speed * index / spec.fps
        cx = spec.width / 2 + path_radius * np.cos(phase) * spec.width / side
        cy = spec.height / 2 + path_radius * np.sin(phase)
        dx, dy = xx - cx, yy - cy
        disc = dx**2 + dy**2 < radius**2
        stripes = np.sin(2 * np.pi * (dx + dy) / stripe_period) > 0
        image = floor + noise[index % len(noise)]
        image[disc] = colour
        image[disc & stripes] = colour * 0.45 + 20
        np.clip(image, 0, 255, out=image)
        frames[index] = image
    return frames


def render_audio(spec: ClipSpec, sample_rate: int = AUDIO_RATE) -> np.ndarray:
    """float32 mono soundtrack: a beat whose key, tempo and loudness follow what the audio shows, in phrases."""
    rng = np.random.default_rng(spec.seed + 1)
    t = np.arange(int(spec.seconds * sample_rate)) / sample_rate
    starts, offsets = spec.phrases()
    phrase = offsets[np.searchsorted(starts, t, side="right") - 1]
    pitch = spec.key_hz() * 2.0 ** phrase
    phase = 2 * np.pi * np.cumsum(pitch) / sample_rate  # continuous across phrase changes
    tempo = 1.5 + 2.5 * spec.shown("audio")  # beats per second
    beat = 0.5 * (1 + np.sign(np.sin(2 * np.pi * tempo * t)))
    tone = (np.sin(phase) + 0.3 * np.sin(2 * phase)) * (0.3 + 0.5 * beat)
    loudness = (0.15 + 0.3 * spec.shown("audio")) * 2.0 ** (3 * phrase)  # phrases also swell and fade
    playing = (t >= spec.music_starts_s) & (t < (np.inf if spec.music_ends_s is None else spec.music_ends_s))
    loudness[~playing] = 0.0
    hiss = 0.02 * rng.normal(size=t.shape) * playing  # true silence outside the music
    return (loudness * tone + hiss).astype(np.float32)


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
        command += ["-f", "f32le", "-ar", str(AUDIO_RATE), "-ac", "1", "-i", str(audio_file)]
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


def score_of(overall: float, score_range: float = 25.0) -> float:
    """The label a judge would give a performance of overall level in [0, 1] (RG-like 0-25 scale)."""
    return round(score_range * (0.3 + 0.6 * overall), 3)


def sample_set(
    count: int,
    seed: int = 0,
    without_audio_every: int = 3,
    seconds: tuple[float, float] = (2.6, 4.0),
    independent: bool = True,
    prefix: str = "clip",
    vary_format: bool = True,
) -> list[ClipSpec]:
    """`count` clips of spread-out quality; every `without_audio_every`-th one has no audio track.

    With `independent`, each modality's own latent is drawn independently of the shared one, so losing
    a modality loses information; otherwise every modality shows the shared quality alone. Durations
    vary, and with `vary_format` frame rates (24 to 30 fps) and frame sizes too, as real footage does.
    """
    rng = np.random.default_rng(seed)
    qualities = rng.permutation(np.linspace(0.05, 0.95, count))
    specs = []
    for index, q in enumerate(qualities):
        own = rng.uniform(0, 1, size=3) if independent else [None] * 3
        scale, fps = rng.choice([1.0, 1.0, 1.25]), float(rng.choice([24.0, 25.0, 25.0, 30.0]))
        if not vary_format:
            scale, fps = 1.0, 25.0
        specs.append(ClipSpec(
            name=f"{prefix}{index:02d}",
            quality=float(q),
            seconds=float(rng.uniform(*seconds)),
            fps=fps,
            width=int(192 * scale) // 2 * 2,
            height=int(144 * scale) // 2 * 2,
            with_audio=(without_audio_every <= 0 or index % without_audio_every != without_audio_every - 1),
            seed=seed * 1000 + index,
            appearance=None if own[0] is None else float(own[0]),
            motion=None if own[1] is None else float(own[1]),
            sound=None if own[2] is None else float(own[2]),
        ))
    return specs
