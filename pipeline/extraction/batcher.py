"""The batcher: decoded segments -> batches of `size` segments for the backbones, filled across
videos (a video with few segments shares a batch with the next), and the backbones' rows scattered
back into each video's feature arrays.

Batches follow decode order; one closes when full, or early when the next segments cannot stack
with it (another frame size, or frames against audio only). On a CPU the features do not depend on
how segments are batched (tests/test_extract_reliability.py), so filling across videos is safe.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from extractors.base import Extractor
from extractors.config import ExtractionConfig
from pipeline.extraction.events import SegmentsDecoded

Batch = list[SegmentsDecoded]


class Batcher:
    def __init__(self, size: int) -> None:
        self.size = size
        self.pending: Batch = []

    def add(self, segments: SegmentsDecoded) -> list[Batch]:
        """The batches that `segments` completes (none, or several when it is larger than a batch)."""
        ready = []
        if self.pending and not stackable(self.pending[0], segments):
            ready.append(self.pending)
            self.pending = []
        while segments is not None:
            room = self.size - sum(s.size for s in self.pending)
            if segments.size <= room:
                self.pending.append(segments)
                segments = None
            else:
                head, segments = segments.split(room)
                self.pending.append(head)
            if sum(s.size for s in self.pending) >= self.size:
                ready.append(self.pending)
                self.pending = []
        return ready

    def flush(self) -> Batch:
        """What is left, at the end of the videos (possibly nothing)."""
        batch, self.pending = self.pending, []
        return batch


def stackable(a: SegmentsDecoded, b: SegmentsDecoded) -> bool:
    """Segments batch together when their frames stack (audio windows of any length batch together)."""
    if (a.frames is None) != (b.frames is None):
        return False
    return a.frames is None or a.frames.shape[1:] == b.frames.shape[1:]


def embed_batch(
    batch: Batch,
    extractors: dict[str, Extractor],
    config: ExtractionConfig,
    on_modality: Callable[[str], None] = lambda modality: None,
) -> None:
    """Run every backbone on the batch and store its rows in the videos' `features` (their `filled`
    counts say how far each is). Frame backbones see all segments of the batch; audio backbones those
    with audio. `on_modality` is told which backbone runs next (the progress bar shows it)."""
    frame_modalities = [m for m, e in extractors.items() if e.input_kind == "frames"]
    audio_modalities = [m for m, e in extractors.items() if e.input_kind == "audio"]
    if frame_modalities and batch[0].frames is not None:
        frames = np.concatenate([s.frames for s in batch])
        count, clips = frames.shape[0], config.frames_per_clip + config.extra_frames
        clip_batch = torch.from_numpy(frames.reshape(-1, clips, *frames.shape[2:]))
        for modality in frame_modalities:
            on_modality(modality)
            # The frames read after the clip's own (its final flow pair) go to the backbone that asks for them.
            wanted = config.frames_per_clip + extractors[modality].extra_frames
            embedded = extractors[modality].embed(clip_batch[:, :wanted])
            # fs1000: several clips per window, averaged into the window's row
            per_segment = embedded.reshape(count, -1, embedded.shape[-1]).mean(dim=1)
            scatter(batch, modality, per_segment.numpy())
    with_audio = [s for s in batch if s.audio is not None]
    for modality in audio_modalities:
        if with_audio:
            on_modality(modality)
            windows = [w for s in with_audio for w in s.audio]
            embedded = extractors[modality].embed(windows)
            scatter(with_audio, modality, embedded.numpy())


def scatter(batch: Batch, modality: str, rows: np.ndarray) -> None:
    """Rows of the batch, in order, into the arrays of the videos they belong to."""
    offset = 0
    for segments in batch:
        job, size = segments.job, segments.size
        if modality not in job.features:
            job.features[modality] = np.zeros((job.plan.num_segments, rows.shape[1]), np.float32)
        job.features[modality][segments.first : segments.first + size] = rows[offset : offset + size]
        job.filled[modality] = job.filled.get(modality, 0) + size
        offset += size
