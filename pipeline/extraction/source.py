"""The decoder source: a background thread that claims, opens, plans and decodes videos in order,
handing the extraction loop typed events (events.py) through a bounded queue.

The queue holds at most LOOKAHEAD_SEGMENTS decoded segments (rounded up to one batch), so decoding
runs ahead of the backbones by the same few segments for a long video as for a short one.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable, Iterator

import numpy as np

from extractors.config import ExtractionConfig
from extractors.decode import (
    DecodeError, SegmentPlan, TrackChunks, VideoFrames, open_audio, open_track_chunks, read_audio_windows,
)
from manifests.cache import FAILED, FeatureCache, VideoRecord
from manifests.files import remove_temporary_files
from manifests.claims import Claims
from pipeline.extraction.events import (
    ClaimedElsewhere,
    Event,
    FinishedElsewhere,
    SegmentsDecoded,
    VideoFailed,
    VideoJob,
    VideoOpened,
    now,
)
from pipeline.videos import VideoSource, file_fingerprint

# Decoded segments waiting for the backbones, at most (rounded up to one batch): enough to keep the
# backbones fed, and the same for a long video as for a short one, whose few segments never fill it.
LOOKAHEAD_SEGMENTS = 8
# Frames kept at the source's size (decode_short_side 0) are up to 30x larger (1080p against short side
# 256: 200 MB per 32-frame segment), so fewer wait.
LOOKAHEAD_SOURCE_SIZE = 2


def open_video(source: VideoSource, config: ExtractionConfig, with_audio: bool) -> VideoJob:
    """The video hashed (once), opened and planned into segments; a job marked failed, with the reason
    in its record, when any of that fails."""
    record = VideoRecord(video_id=source.video_id, path=str(source.path), status=FAILED)
    record.random_weights = config.random_weights
    record.started_at = now()
    job = VideoJob(source, record)
    try:
        record.mtime_ns = source.path.stat().st_mtime_ns  # before hashing: a later edit changes it
        record.size_bytes, record.fingerprint = file_fingerprint(source.path)
        video = VideoFrames(source.path, config.decode_short_side)
        info = video.info
        record.fps, record.frame_count = round(info.fps, 6), info.frame_count
        record.duration_s = round(info.duration_s, 6)
        plan = video.plan(config)
        if plan.num_segments == 0:
            need = (
                f"{config.segment_frames * config.frame_stride} frames"
                if config.protocol == "rg"
                else f"{config.window_seconds} s"
            )
            raise DecodeError(
                f"too short for one segment: {info.frame_count} frames "
                f"({info.duration_s:.2f} s), need {need}"
            )
        job.plan, job.video = plan, video
        record.num_segments = plan.num_segments
        record.segments = plan.to_dict()
        if with_audio:
            if getattr(config.settings.get("audio"), "audio_frontend", "project") == "pamfn":
                # PAMFN's recipe: the whole track, cut into equal chunks (extractors/audio_ast.py)
                job.audio = open_track_chunks(source.path, plan.num_segments, config.audio_sample_rate)
            else:
                job.audio = open_audio(source.path, config.audio_sample_rate)
            job.audio_missing = job.audio is None
    except DecodeError as exc:
        job.failed, record.error = True, str(exc)
    except OSError as exc:
        job.failed, record.error = True, f"cannot read file: {exc.strerror or exc}"
    except Exception as exc:  # anything else about this file fails this video only
        job.failed, record.error = True, f"{type(exc).__name__}: {exc}"
    return job


class DecoderSource:
    """Iterate over the events of `sources`, decoded in a background thread while the caller embeds.

    Each video is claimed first (and left to its holder if another live process has it); `finished_meanwhile`
    says whether another process finished it since the caller judged it. Frames are read (when
    `frames`) and audio windows (when `audio`) `batch_segments` segments at a time. Use as a context
    manager: leaving it stops the thread, whatever it was doing."""

    def __init__(
        self,
        sources: list[VideoSource],
        cache: FeatureCache,
        config: ExtractionConfig,
        claims: Claims,
        batch_segments: int,
        frames: bool,
        audio: bool,
        finished_meanwhile: Callable[[VideoSource], bool],
    ) -> None:
        self.sources, self.cache, self.config, self.claims = sources, cache, config, claims
        self.batch_segments, self.frames, self.audio = batch_segments, frames, audio
        self.finished_meanwhile = finished_meanwhile
        lookahead = LOOKAHEAD_SEGMENTS if config.decode_short_side else LOOKAHEAD_SOURCE_SIZE
        self.events: queue.Queue = queue.Queue(maxsize=max(1, lookahead // batch_segments))
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._produce, daemon=True, name="decoder-source")

    def __enter__(self) -> DecoderSource:
        self.thread.start()
        return self

    def __iter__(self) -> Iterator[Event]:
        while (event := self.events.get()) is not None:
            yield event

    def __exit__(self, *exc) -> None:
        self.stop.set()
        while self.thread.is_alive():  # unblock a thread waiting on a full queue
            try:
                self.events.get(timeout=0.1)
            except queue.Empty:
                pass

    def _produce(self) -> None:
        try:
            for source in self.sources:
                if self.stop.is_set():
                    return
                if not self.claims.acquire(source.video_id):
                    self.events.put(ClaimedElsewhere(source))
                    continue
                if self.finished_meanwhile(source):
                    self.claims.release(source.video_id)
                    self.events.put(FinishedElsewhere(source))
                    continue
                # ours now: what an interrupted write of this video left behind can go
                remove_temporary_files(self.cache.video_dir(source.video_id))
                job = open_video(source, self.config, self.audio)
                if job.failed:
                    self.events.put(VideoFailed(job, job.record.error or "failed"))
                    continue
                self.events.put(VideoOpened(job))
                try:
                    self._decode(job)
                except DecodeError as exc:
                    self.events.put(VideoFailed(job, str(exc)))
                except Exception as exc:  # keep the batch going past one bad video
                    self.events.put(VideoFailed(job, f"{type(exc).__name__}: {exc}"))
        finally:
            self.events.put(None)

    @staticmethod
    def frame_indices(plan: SegmentPlan, first: int, last: int) -> np.ndarray:
        """The source frames of segments first..last-1: each clip's own, then its final flow pair if any."""
        indices = plan.frame_indices[first:last]
        if plan.final_pair is None:
            return indices
        return np.concatenate([indices, plan.final_pair[first:last]], axis=1)

    def _decode(self, job: VideoJob) -> None:
        plan = job.plan
        try:
            for first in range(0, plan.num_segments, self.batch_segments):
                if self.stop.is_set():
                    return
                last = min(first + self.batch_segments, plan.num_segments)
                frames = job.video.read(self.frame_indices(plan, first, last)) if self.frames else None
                audio = None
                if isinstance(job.audio, TrackChunks):
                    audio = job.audio.chunks(range(first, last))
                elif job.audio is not None:
                    audio = read_audio_windows(job.audio, plan, self.config.audio_sample_rate, range(first, last))
                if frames is not None or audio is not None:
                    self.events.put(SegmentsDecoded(job, first, frames, audio))
        finally:  # decoded, failed or stopped: release the readers (and the audio's ffmpeg process)
            if job.audio is not None:
                job.audio.close()
            job.audio = job.video = None
