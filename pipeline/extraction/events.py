"""What the decoder source tells the extraction loop, one typed event at a time, in decode order.

A video this process works on is a `VideoJob`: its record (failed until written done), its readers
while it decodes, and its features as the backbones fill them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np

from extractors.decode import AudioChunk, AudioStream, SegmentPlan, TrackChunks, VideoFrames
from manifests.cache import VideoRecord
from pipeline.videos import VideoSource


def now() -> str:
    """The time stamps of records: UTC, to the second."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass(eq=False)
class VideoJob:
    source: VideoSource
    record: VideoRecord
    plan: SegmentPlan | None = None
    video: VideoFrames | None = None
    audio: AudioStream | TrackChunks | None = None  # None if no track (or no audio modality)
    features: dict[str, np.ndarray] = field(default_factory=dict)  # modality -> (T, C) float32, filled by batches
    filled: dict[str, int] = field(default_factory=dict)  # modality -> segments embedded so far
    audio_missing: bool = False
    failed: bool = False

    @property
    def video_id(self) -> str:
        return self.source.video_id

    def complete(self, frame_modalities: list[str], audio_modalities: list[str]) -> bool:
        """Every segment of every modality it has is embedded (a missing audio track has none)."""
        wanted = frame_modalities + ([] if self.audio_missing else audio_modalities)
        return not self.failed and all(self.filled.get(m, 0) >= self.plan.num_segments for m in wanted)


@dataclass(frozen=True)
class VideoOpened:
    """Claimed, hashed and planned: `job.plan` says how many segments will follow."""

    job: VideoJob


@dataclass(frozen=True, eq=False)
class SegmentsDecoded:
    """Segments first .. first+size-1 of a video: frames and/or audio windows (None when not extracted)."""

    job: VideoJob
    first: int  # index of the first segment in its video
    frames: np.ndarray | None  # uint8 (n, clips*clip_frames, H, W, 3)
    audio: list[np.ndarray] | list[AudioChunk] | None  # AudioChunks for the pamfn audio front end

    @property
    def size(self) -> int:
        return len(self.frames) if self.frames is not None else len(self.audio)

    def split(self, size: int) -> tuple[SegmentsDecoded, SegmentsDecoded]:
        """The first `size` segments, and the rest."""
        head = SegmentsDecoded(self.job, self.first, None if self.frames is None else self.frames[:size],
                               None if self.audio is None else self.audio[:size])
        tail = SegmentsDecoded(self.job, self.first + size, None if self.frames is None else self.frames[size:],
                               None if self.audio is None else self.audio[size:])
        return head, tail


@dataclass(frozen=True)
class VideoFailed:
    """The video cannot be opened or decoded; `reason` is one line, fit for the manifest."""

    job: VideoJob
    reason: str


@dataclass(frozen=True)
class ClaimedElsewhere:
    """Another running process holds the video's claim: it is left to that process."""

    source: VideoSource


@dataclass(frozen=True)
class FinishedElsewhere:
    """Another process finished the video since this run judged it: nothing left to do."""

    source: VideoSource


Event = VideoOpened | SegmentsDecoded | VideoFailed | ClaimedElsewhere | FinishedElsewhere
