"""Decoding (decord) and segmentation: video file -> time-aligned segments of frames and audio.

Frames are resized to `decode_short_side` inside the decoder and read a batch of segments at a time,
so a 10-minute 1080p video never sits in memory. Every segment's span is kept in frame indices and in
seconds (from the container's timestamps), and the audio window of a segment is cut from exactly that
span, so all modalities share the same T and the same time axis. (The pamfn audio front end instead
cuts the whole track into T equal chunks, as PAMFN's published features were made: `open_track_chunks`.)
"""

from __future__ import annotations

import os
import re
import struct
import subprocess
import sys
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from extractors.config import ExtractionConfig


class DecodeError(RuntimeError):
    """A video cannot be decoded or segmented; the message is one line, fit for the manifest."""


# decord prefixes its messages with "[hh:mm:ss] /path/to/source.cc:123: "; the user needs the rest.
_DECORD_PREFIX = re.compile(r"^\[[\d:]+\] \S+\.cc:\d+: (Error: )?")


# ffmpeg prefixes its messages with "[mov,mp4,m4a,3gp,3g2,mj2 @ 0x55d0c0a8b2c0] " or "[in#0 @ 0x5639fcb03dc0] ".
_FFMPEG_PREFIX = re.compile(r"^\[[^\]]+ @ 0x[0-9a-f]+\] ")
_OPENING = re.compile(r"^ERROR opening: .*, ")  # decord's "ERROR opening: <path>, <ffmpeg's reason>"
_FD2 = threading.Lock()


def _one_line(exc: BaseException, messages: list[str] | None = None) -> str:
    """The reason for a decoding failure: the exception's first line, with what ffmpeg / decord printed
    meanwhile in brackets; only the printed messages when the exception just says "Error reading <file>"."""
    text = str(exc).strip().splitlines()
    first = _DECORD_PREFIX.sub("", text[0]) if text else type(exc).__name__
    printed = "; ".join(messages[:2]) if messages else ""
    if printed and first.startswith("Error reading"):
        first = printed
    elif printed:
        first = f"{first} ({printed})"
    return first[:300]


@contextmanager
def decoder_messages() -> Iterator[list[str]]:
    """Collect what ffmpeg and decord print meanwhile (from C, on file descriptor 2, past sys.stderr).

    Their messages ("moov atom not found", "video_reader.cc:83: ERROR opening") would land in the
    middle of the progress bar; caught here, they become the failed video's reason in the manifest.
    File descriptor 2 is the whole process's, so anything else written to it meanwhile is caught too:
    the extraction progress bar writes to its own copy of the terminal's descriptor."""
    messages: list[str] = []
    with _FD2, tempfile.TemporaryFile() as sink:
        try:
            sys.stderr.flush()
        except (AttributeError, ValueError, OSError):
            pass
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)
        try:
            yield messages
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            for line in sink.read().decode("utf-8", "replace").splitlines():
                line = _OPENING.sub("", _DECORD_PREFIX.sub("", _FFMPEG_PREFIX.sub("", line.strip())))
                if line and line not in messages:
                    messages.append(line)


@dataclass(frozen=True)
class VideoInfo:
    path: Path
    fps: float
    frame_count: int
    duration_s: float
    width: int
    height: int


@dataclass(frozen=True)
class SegmentPlan:
    """Which source frames feed each segment, and the span each segment covers.

    frame_indices: (T, clips_per_segment * clip_frames) source frame indices fed to frame backbones;
    clips_per_segment is 1 for the rg protocol, K 8-frame clips per window for fs1000.
    start_frame/end_frame: (T,) the span [start, end) of source frames; start_s/end_s the same in s.
    final_pair: (T, 2) source indices of the two frames whose flow is each segment's last, when the
    configuration's flow crosses into the next segment (ExtractionConfig.extra_frames), else None.
    """

    frame_indices: np.ndarray
    clips_per_segment: int
    clip_frames: int
    start_frame: np.ndarray
    end_frame: np.ndarray
    start_s: np.ndarray
    end_s: np.ndarray
    final_pair: np.ndarray | None = None

    @property
    def num_segments(self) -> int:
        return int(self.frame_indices.shape[0])

    def to_dict(self) -> dict[str, list]:
        return {
            "start_frame": self.start_frame.tolist(),
            "end_frame": self.end_frame.tolist(),
            "start_s": [round(float(t), 6) for t in self.start_s],
            "end_s": [round(float(t), 6) for t in self.end_s],
        }


def _decoder_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(width, height) with the short side at `short_side`, aspect kept, both even; the source's own size
    when `short_side` is 0."""
    if short_side == 0:
        return width, height
    scale = short_side / min(width, height)
    new_w = max(short_side, int(round(width * scale / 2)) * 2)
    new_h = max(short_side, int(round(height * scale / 2)) * 2)
    return new_w, new_h


class VideoFrames:
    """An open video: metadata, and frames read on demand at decode size."""

    def __init__(self, path: Path, decode_short_side: int) -> None:
        import decord  # imported here so that modules which only plan segments need no decord

        self.path = Path(path)
        if not self.path.is_file():
            raise DecodeError(f"no such file: {self.path}")
        size = self.path.stat().st_size
        if size == 0:
            raise DecodeError("empty file (0 bytes)")
        with decoder_messages() as messages:
            try:
                probe = decord.VideoReader(str(self.path), num_threads=1)
                width, height = probe[0].shape[1], probe[0].shape[0]
                frame_count = len(probe)
                fps = float(probe.get_avg_fps())
                # Container timestamps (seconds) keep the time axis right for unusual or variable rates.
                self._timestamps = probe.get_frame_timestamp(np.arange(frame_count)).astype(np.float64)
                del probe
                out_w, out_h = _decoder_size(width, height, decode_short_side)
                self._reader = decord.VideoReader(str(self.path), width=out_w, height=out_h, num_threads=0)
                failure = None
            except Exception as exc:  # decord raises its own error types, sometimes plain RuntimeError
                failure = exc
        if failure is not None:
            raise DecodeError(f"cannot decode video: {_one_line(failure, messages)}") from None
        self.messages = messages  # the decoder's remarks on a file it could open (kept for debugging)
        if frame_count <= 0 or not np.isfinite(fps) or fps <= 0:
            raise DecodeError(f"no decodable video frames (frames={frame_count}, fps={fps})")
        duration = float(self._timestamps[-1, 1]) if frame_count else 0.0
        self.info = VideoInfo(self.path, fps, frame_count, duration, width, height)

    def plan(self, config: ExtractionConfig) -> SegmentPlan:
        return plan_segments(self.info.frame_count, self.info.fps, config, self._timestamps)

    def read(self, frame_indices: np.ndarray) -> np.ndarray:
        """uint8 (N, H, W, 3) frames at decode size for the given source indices."""
        flat = np.asarray(frame_indices).reshape(-1)
        with decoder_messages() as messages:
            try:
                frames, failure = self._reader.get_batch(flat.tolist()).asnumpy(), None
                # decord keeps decoding ahead of the last frame read, into memory, for as long as it is
                # left alone (while the backbones run): over a long video that grows to the whole video.
                # Seeking back to the first key frame stops it; the next batch seeks where it needs anyway.
                self._reader.seek(0)
            except Exception as exc:
                failure = exc
        if failure is not None:
            raise DecodeError(
                f"decode error in frames {int(flat.min())}-{int(flat.max())}: {_one_line(failure, messages)}"
            ) from None
        return frames.reshape(*np.shape(frame_indices), *frames.shape[1:])


def count_segments(path: Path, config: ExtractionConfig) -> int:
    """Segments a video will give, from its container's metadata (no frame decoded); 0 if it cannot
    be opened. Lets the progress bar know its total before the first video is decoded."""
    import decord

    try:
        if Path(path).stat().st_size == 0:
            return 0
    except OSError:
        return 0
    with decoder_messages():
        try:
            reader = decord.VideoReader(str(path), num_threads=1)
            frame_count, fps = len(reader), float(reader.get_avg_fps())
        except Exception:
            return 0
    if frame_count <= 0 or not np.isfinite(fps) or fps <= 0:
        return 0
    return plan_segments(frame_count, fps, config).num_segments


def resampled_frames(timestamps: np.ndarray, frame_rate: float) -> np.ndarray:
    """Source frame indices of the video resampled to `frame_rate`: output frame k, due at k / frame_rate
    seconds, is the source frame whose start time is nearest (the earlier on a tie); the video's length
    in output frames is floor(duration * frame_rate). Frames repeat when the source is slower, are
    skipped when it is faster."""
    starts = timestamps[:, 0] - timestamps[0, 0]
    duration = float(timestamps[-1, 1] - timestamps[0, 0])
    due = np.arange(int(np.floor(duration * frame_rate + 1e-6))) / frame_rate
    after = np.searchsorted(starts, due, side="left").clip(1, len(starts) - 1)
    nearer_before = (due - starts[after - 1]) <= (starts[after] - due)
    return np.where(nearer_before, after - 1, after).astype(np.int64) if len(starts) > 1 else np.zeros(len(due), np.int64)


def plan_segments(
    frame_count: int,
    fps: float,
    config: ExtractionConfig,
    timestamps: np.ndarray | None = None,
) -> SegmentPlan:
    """Segment boundaries for a video of `frame_count` frames at `fps`.

    rg: non-overlapping windows of segment_frames * frame_stride source frames (every
    frame_stride-th frame is used), remainder dropped.
    fs1000: windows of window_seconds every hop_seconds; each holds K = frames_per_window // clip_frames
    consecutive clips of clip_frames frames, starting at the window's first frame.
    `timestamps` (frame_count, 2) start/end seconds per frame; index / fps when absent.
    With `config.frame_rate` set (and not the video's own), both work on the video resampled to that
    rate (`resampled_frames`), and the plan's indices are mapped back to source frames.
    """
    if timestamps is None:
        starts = np.arange(frame_count) / fps
        timestamps = np.stack([starts, starts + 1.0 / fps], axis=1)
    if config.frame_rate and abs(fps - config.frame_rate) > 1e-3 and frame_count:
        source = resampled_frames(timestamps, config.frame_rate)
        plan = plan_segments(len(source), config.frame_rate, config, timestamps[source])
        return SegmentPlan(source[plan.frame_indices], plan.clips_per_segment, plan.clip_frames,
                           source[plan.start_frame], source[plan.end_frame - 1] + 1, plan.start_s, plan.end_s,
                           None if plan.final_pair is None else source[plan.final_pair])

    if config.protocol == "rg":
        span = config.segment_frames * config.frame_stride
        num = frame_count // span
        seg_start = np.arange(num) * span
        offsets = np.arange(config.segment_frames) * config.frame_stride
        indices = seg_start[:, None] + offsets[None, :]
        clips, clip_frames = 1, config.segment_frames
        seg_end = seg_start + span
    else:  # fs1000
        frames_per_window = int(round(config.window_seconds * fps))
        clips = frames_per_window // config.clip_frames
        hop = config.hop_seconds * fps
        if clips == 0:
            num = 0
        else:
            num = max(0, int(np.floor((frame_count - frames_per_window) / hop)) + 1)
        seg_start = np.floor(np.arange(num) * hop + 0.5).astype(np.int64)  # round half up, evenly
        seg_start = seg_start[seg_start + frames_per_window <= frame_count]
        num = len(seg_start)
        indices = seg_start[:, None] + np.arange(clips * config.clip_frames)[None, :]
        clip_frames = config.clip_frames
        seg_end = seg_start + frames_per_window

    indices = indices.astype(np.int64).reshape(num, clips * clip_frames)
    seg_start = seg_start.astype(np.int64)
    seg_end = seg_end.astype(np.int64)
    start_s = timestamps[seg_start, 0] if num else np.zeros(0)
    end_s = timestamps[seg_end - 1, 1] if num else np.zeros(0)
    final_pair = None
    if config.extra_frames:
        # The last flow of a segment crosses into the next frame; at the video's end there is none, and
        # the last flow repeats the one before it (the published features' rule).
        last = indices[:, -1]
        has_next = last + config.frame_stride < frame_count
        final_pair = np.stack([np.where(has_next, last, last - config.frame_stride),
                               np.where(has_next, last + config.frame_stride, last)], axis=1).astype(np.int64)
    return SegmentPlan(indices, clips, clip_frames, seg_start, seg_end, start_s, end_s, final_pair)


AUDIO_DECODER = "ffmpeg (imageio-ffmpeg's binary): first audio stream, mono float32, resampled by libswresample"


def ffmpeg_binary() -> str:
    """The ffmpeg executable that imageio-ffmpeg ships (a pinned dependency), so no system ffmpeg is needed."""
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def _ffmpeg_reason(printed: bytes, returncode: int | None) -> str:
    """Why ffmpeg failed, in one line: the first two lines it printed, without their "[... @ 0x...]" prefix."""
    lines = [_FFMPEG_PREFIX.sub("", line.strip()) for line in printed.decode("utf-8", "replace").splitlines()]
    lines = [line for line in lines if line]
    return "; ".join(lines[:2])[:300] or f"ffmpeg exited with code {returncode}"


class AudioStream:
    """A video's audio track, decoded by an ffmpeg subprocess and read window by window, in order.

    ffmpeg writes mono float32 samples at `sample_rate` to a pipe; the windows of a video come in
    order of their start, so only the samples from the current window's start on are kept: at most
    one window (plus what a read brings in) whatever the video's length. `max_held` records the most
    samples ever held, for the tests. A window may reach back no earlier than the previous one began.
    """

    def __init__(self, path: Path, sample_rate: int) -> None:
        self.path, self.sample_rate = Path(path), sample_rate
        self._buffer = np.zeros(0, np.float32)
        self._start = 0  # sample index of _buffer[0]
        self._ended = False
        self.max_held = 0
        self._errors = tempfile.TemporaryFile()  # not a pipe: ffmpeg never blocks on what it prints
        command = [ffmpeg_binary(), "-nostdin", "-hide_banner", "-loglevel", "error", "-i", f"file:{self.path}",
                   "-map", "0:a:0", "-vn", "-sn", "-dn", "-ac", "1", "-ar", str(sample_rate), "-f", "f32le", "pipe:1"]
        self._process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                          stderr=self._errors)

    def _fill(self, end: int) -> None:
        """Read from the pipe until the buffer reaches sample `end` or the track ends."""
        parts = [self._buffer]
        held = self._start + len(self._buffer)
        while held < end and not self._ended:
            data = self._process.stdout.read(4 * min(end - held, 1 << 16))
            data = data[: len(data) - len(data) % 4]  # a partial sample only at the end of the pipe
            if not data:
                self._finish()
                break
            parts.append(np.frombuffer(data, np.float32))
            held += len(data) // 4
        self._buffer = np.concatenate(parts) if len(parts) > 1 else self._buffer
        self.max_held = max(self.max_held, len(self._buffer))

    def _skip(self, first: int) -> None:
        """Drop every sample before `first`, reading past those still in the pipe a block at a time."""
        if first < self._start:
            raise ValueError(f"audio window at sample {first} starts before the previous one ({self._start})")
        while (held_end := self._start + len(self._buffer)) < first and not self._ended:
            self._start, self._buffer = held_end, np.zeros(0, np.float32)
            self._fill(min(first, held_end + (1 << 16)))
        drop = min(first - self._start, len(self._buffer))  # all of it when the track ended before `first`
        self._buffer, self._start = self._buffer[drop:], self._start + drop

    def window(self, first: int, length: int) -> np.ndarray:
        """Samples [first, first + length), zero-padded past the end of the track."""
        self._skip(first)
        self._fill(first + length)
        return cut_window(self._buffer[:length].copy(), length)

    def read_to_end(self) -> np.ndarray:
        """Every sample from the first one held to the end of the track, all at once (whole short tracks)."""
        self._fill(np.iinfo(np.int64).max)
        return self._buffer.copy()

    def _message(self) -> str:
        self._errors.seek(0)
        return _ffmpeg_reason(self._errors.read(), self._process.returncode)

    def _finish(self) -> None:
        """The pipe is empty: the track ended, or ffmpeg failed (then the error names its reason)."""
        self._ended = True
        if self._process.wait() != 0:
            raise DecodeError(f"cannot decode audio: {self._message()}")

    def first_samples(self) -> bool:
        """Start reading; False when the file has no audio stream (ffmpeg refuses the mapping)."""
        try:
            self._fill(1)
        except DecodeError:
            if "matches no streams" in self._message():
                self.close()
                return False
            self.close()
            raise
        return True

    def close(self) -> None:
        if self._process.poll() is None:
            self._process.kill()
        self._process.wait()
        self._process.stdout.close()
        self._errors.close()
        self._buffer = np.zeros(0, np.float32)

    def __del__(self) -> None:
        if getattr(self, "_process", None) is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait()


def open_audio(path: Path, sample_rate: int) -> AudioStream | None:
    """The audio track of `path` as an AudioStream (mono, `sample_rate`); None when it has no audio track.

    A missing track is the "audio missing" case, not an error. Other decoding failures raise DecodeError.
    """
    stream = AudioStream(path, sample_rate)
    return stream if stream.first_samples() else None


def load_audio(path: Path, sample_rate: int) -> np.ndarray | None:
    """The whole audio track, mono float32 at `sample_rate`; None when the file has no audio track.
    (For tests and benchmarks: extraction reads windows from an AudioStream instead.)"""
    stream = open_audio(path, sample_rate)
    if stream is None:
        return None
    try:
        return stream.read_to_end()
    finally:
        stream.close()


def window_span(start_s: float, end_s: float, sample_rate: int) -> tuple[int, int]:
    """(first sample, nominal length round(duration * rate)) of the window covering [start_s, end_s)."""
    return int(round(start_s * sample_rate)), int(round((end_s - start_s) * sample_rate))


def cut_window(samples: np.ndarray, length: int) -> np.ndarray:
    """A window's samples zero-padded to `length` (a track that ends early)."""
    samples = np.ascontiguousarray(samples.reshape(-1), dtype=np.float32)
    return np.pad(samples, (0, length - len(samples))) if len(samples) < length else samples


def audio_windows(waveform: np.ndarray, plan: SegmentPlan, sample_rate: int) -> list[np.ndarray]:
    """One waveform per segment, cut from exactly the segment's time span.

    Each window has the nominal length round(duration * rate); a track that ends early is
    zero-padded so every segment of a video has the same audio length.
    """
    windows = []
    for start_s, end_s in zip(plan.start_s, plan.end_s):
        first, length = window_span(start_s, end_s, sample_rate)
        windows.append(cut_window(waveform[first : first + length], length))
    return windows


def read_audio_windows(stream: AudioStream, plan: SegmentPlan, sample_rate: int, segments: range) -> list[np.ndarray]:
    """`audio_windows` for some segments, read from an open AudioStream (segments in increasing order)."""
    return [stream.window(*window_span(plan.start_s[i], plan.end_s[i], sample_rate)) for i in segments]


# ----------------------------------------------------------------------------- the pamfn audio front end
# PAMFN's published audio features were made from each video's whole track (a .wav at its own rate, all
# its channels), resampled, its mean removed once, and cut into as many equal chunks as the video has
# segments, whatever the segments' time spans (extractors/audio_ast.py describes the rest).

PAMFN_AUDIO_DECODER = ("ffmpeg (imageio-ffmpeg's binary): the whole first audio stream as a 16-bit PCM WAV at its "
                       "own rate with all its channels (what `ffmpeg -i VIDEO AUDIO.wav` writes), read as "
                       "float32 samples / 32768")
# The chunks go to a filterbank whose 25 ms frames are counted at the track's source rate
# (extractors/audio_ast.py): a chunk shorter than one such frame has no filterbank frame at all.
PAMFN_FRAME_SECONDS = 0.025


@dataclass(frozen=True, eq=False)
class AudioChunk:
    """One segment's audio for the pamfn front end: its chunk of the resampled track, and the rate the
    track had before resampling (the rate its filterbank is told)."""

    samples: np.ndarray  # (channels, L) float32 at the extraction's sample rate, the whole track's mean removed
    source_rate: int


class TrackChunks:
    """A video's whole audio track cut into `num_segments` equal chunks of len // num_segments samples
    (the remainder dropped): chunk i is segment i's audio, not the segment's time span."""

    def __init__(self, wave: np.ndarray, source_rate: int, num_segments: int) -> None:
        self.source_rate, self.num_segments = source_rate, num_segments
        self.chunk_samples = wave.shape[1] // num_segments
        self._wave: np.ndarray | None = wave[:, : self.chunk_samples * num_segments]

    def chunks(self, segments: range) -> list[AudioChunk]:
        if self._wave is None:
            raise ValueError("the audio track's chunks were closed")
        if len(segments) and (segments[0] < 0 or segments[-1] >= self.num_segments):
            raise ValueError(f"segments {segments.start}-{segments.stop - 1} outside the track's "
                             f"{self.num_segments} chunks")
        size = self.chunk_samples
        return [AudioChunk(self._wave[:, i * size : (i + 1) * size].copy(), self.source_rate) for i in segments]

    def close(self) -> None:
        self._wave = None


def read_track(path: Path) -> tuple[np.ndarray, int] | None:
    """The first audio stream of `path`, whole, as ffmpeg writes it to a 16-bit WAV: (channels, samples)
    float32 (sample / 32768, as torchaudio reads such a WAV) and its sample rate; None when the file has
    no audio stream. Decoding failures raise DecodeError."""
    command = [ffmpeg_binary(), "-nostdin", "-hide_banner", "-loglevel", "error", "-i", f"file:{path}",
               "-map", "0:a:0", "-vn", "-sn", "-dn", "-c:a", "pcm_s16le", "-f", "wav", "pipe:1"]
    done = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True)
    if done.returncode != 0:
        reason = _ffmpeg_reason(done.stderr, done.returncode)
        if "matches no streams" in reason:
            return None
        raise DecodeError(f"cannot decode audio: {reason}")
    return _pcm16_wav(done.stdout)


def _pcm16_wav(data: bytes) -> tuple[np.ndarray, int]:
    """(channels, samples) float32 and the sample rate of a 16-bit PCM WAV as ffmpeg writes it to a pipe,
    where the sizes are placeholders: the data chunk runs to the end."""
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise DecodeError("cannot decode audio: ffmpeg wrote no WAV header")
    position, channels, rate, bits = 12, 0, 0, 0
    while position + 8 <= len(data):
        kind, size = data[position : position + 4], struct.unpack_from("<I", data, position + 4)[0]
        body = position + 8
        if kind == b"fmt ":
            channels, rate, _, _, bits = struct.unpack_from("<HIIHH", data, body + 2)
        elif kind == b"data":
            if channels == 0 or rate == 0 or bits != 16:
                raise DecodeError(f"cannot decode audio: unexpected WAV format ({channels} channels, {rate} Hz, "
                                  f"{bits} bits)")
            count = (len(data) - body) // (2 * channels) * channels
            samples = np.frombuffer(data, "<i2", count=count, offset=body).reshape(-1, channels)
            return np.ascontiguousarray(samples.T, dtype=np.float32) / np.float32(32768), rate
        position = body + size + (size & 1)
    raise DecodeError("cannot decode audio: ffmpeg's WAV has no data chunk")


def open_track_chunks(path: Path, num_segments: int, sample_rate: int) -> TrackChunks | None:
    """The audio track of `path` as PAMFN's features cut it: the whole track at its own rate with all its
    channels, resampled to `sample_rate` by torchaudio's Resample (default settings), one mean (over the
    whole track and every channel) removed, in `num_segments` equal chunks. None when there is no audio
    track (the "audio missing" case); DecodeError when it cannot be decoded or is too short for a
    filterbank frame per chunk."""
    import torch
    import torchaudio

    track = read_track(path)
    if track is None:
        return None
    samples, source_rate = track
    wave = torchaudio.transforms.Resample(source_rate, sample_rate)(torch.from_numpy(samples))
    wave = wave - wave.mean()
    frame = int(source_rate * PAMFN_FRAME_SECONDS)
    if wave.shape[1] // num_segments < frame:
        raise DecodeError(f"audio track too short: {wave.shape[1]} samples at {sample_rate} Hz give "
                          f"{wave.shape[1] // num_segments} per segment for {num_segments} segments, fewer than "
                          f"one filterbank frame of 25 ms at the track's {source_rate} Hz ({frame})")
    return TrackChunks(wave.numpy(), source_rate, num_segments)
