"""The extract stage: videos -> decoded segments -> frozen backbones -> feature cache + manifest.

The loop, in the order a video goes through it:
- decide which videos need work (below: `needs_work`; entry.py skips building the backbones when none does);
- the decoder source (source.py) claims, opens and decodes them in a background thread, a
  few segments ahead, and hands over typed events (events.py);
- the batcher (batcher.py) fills backbone batches with segments across videos and scatters
  the backbones' rows back into each video's arrays;
- the writer (writer.py) saves a finished video's arrays, and its record (the manifest row)
  last, so an interrupted run leaves nothing that a rerun would trust by mistake;
- the progress bar (progress.py) counts segments.

Resuming and concurrency: a video is skipped when its record says done, its file's content hash is
unchanged (size + mtime stand for it; `verify` rehashes) and its arrays are intact (sizes and shapes;
`verify` also checks their checksums and values); anything else is redone. A process claims a video
(manifests/claims.py: a claim file naming host and pid, refreshed while it works) before working on
it; a claim whose process is gone is taken over, so a run killed with -9 is simply run again, and
two processes on the same output split the videos between them instead of colliding.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field

import pandas as pd

from extractors.base import Extractor
from extractors.config import ExtractionConfig
from manifests.cache import DONE, FAILED, CacheError, FeatureCache, VideoRecord
from pipeline.extraction.batcher import Batch, Batcher, embed_batch
from pipeline.extraction.events import (
    ClaimedElsewhere,
    FinishedElsewhere,
    SegmentsDecoded,
    VideoFailed,
    VideoJob,
    VideoOpened,
)
from pipeline.extraction.progress import Progress
from pipeline.extraction.source import DecoderSource
from pipeline.extraction.writer import Writer
from pipeline.videos import VideoSource, same_file


def needs_work(cache: FeatureCache, source: VideoSource, retry_failed: bool = False, verify: bool = False) -> bool:
    """False when the video's record is final: done with intact arrays, or failed on this very file
    (unless retrying). A done video whose arrays are damaged or gone is redone."""
    record = cache.read_record(source.video_id)
    if record is None:
        return True
    try:
        if not same_file(record, source.path, rehash=verify):
            return True  # the file changed since it was extracted
    except OSError:
        return True
    if record.status == FAILED:
        return retry_failed
    return cache.check_video(record, full=verify) is not None


# --------------------------------------------------------------------------- the streaming run


@dataclass
class ExtractSummary:
    records: list[VideoRecord] = field(default_factory=list)  # this run's videos, done or failed
    skipped: list[str] = field(default_factory=list)  # already done, unchanged
    claimed_elsewhere: list[str] = field(default_factory=list)

    @property
    def failed(self) -> list[VideoRecord]:
        return [r for r in self.records if r.status == FAILED]

    def table(self) -> pd.DataFrame:
        rows = []
        for record in self.records:
            row = {"video_id": record.video_id, "status": record.status, "T": record.num_segments}
            for modality, mod in record.modalities.items():
                row[modality] = mod.status
            row["error"] = record.error or ""
            rows.append(row)
        return pd.DataFrame(rows)


class _Extraction:
    """One run over a list of videos with already-built extractors."""

    def __init__(
        self,
        cache: FeatureCache,
        extractors: dict[str, Extractor],
        config: ExtractionConfig,
        batch_segments: int,
        retry_failed: bool,
        progress: bool,
        verify: bool = False,
    ) -> None:
        self.cache, self.extractors, self.config = cache, extractors, config
        self.batch_segments = max(1, batch_segments)
        self.retry_failed, self.verify = retry_failed, verify
        self.frame_modalities = [m for m, e in extractors.items() if e.input_kind == "frames"]
        self.audio_modalities = [m for m, e in extractors.items() if e.input_kind == "audio"]
        self.claims = cache.claims()
        self.writer = Writer(cache, extractors, config, self.claims)
        self.progress = Progress(enabled=progress)
        self.judged: dict[str, str | None] = {}  # video id -> finished_at of the record run() judged
        self.summary = ExtractSummary()
        self.videos_total = 0

    def run(self, sources: list[VideoSource]) -> ExtractSummary:
        try:
            todo = self._decide(sources)
            self.videos_total = len(todo)
            if todo and not self.extractors:
                raise CacheError(f"{len(todo)} video(s) changed while extract was starting; run it again")
            self.progress.plan(todo, self.config)
            self._stream(todo)
        finally:
            self.progress.close()
        return self.summary

    # ---- decisions

    def _decide(self, sources: list[VideoSource]) -> list[VideoSource]:
        """The videos to do; a video still failed on the same file is reported, not redone."""
        todo = []
        for source in sources:
            record = self.cache.read_record(source.video_id)
            self.judged[source.video_id] = None if record is None else record.finished_at
            if needs_work(self.cache, source, self.retry_failed, self.verify):
                todo.append(source)
                continue
            record = self.cache.read_record(source.video_id)
            if record.status == FAILED:
                self.summary.records.append(record)
            else:
                self.summary.skipped.append(source.video_id)
        return todo

    def _finished_meanwhile(self, source: VideoSource) -> bool:
        """After claiming: did another process write this video's record since run() judged it?"""
        record = self.cache.read_record(source.video_id)
        if record is None or record.finished_at == self.judged.get(source.video_id):
            return False  # the record run() judged (or none): still to do
        return not needs_work(self.cache, source, self.retry_failed)

    # ---- the stream of events

    def _stream(self, todo: list[VideoSource]) -> None:
        source = DecoderSource(todo, self.cache, self.config, self.claims, self.batch_segments,
                               frames=bool(self.frame_modalities), audio=bool(self.audio_modalities),
                               finished_meanwhile=self._finished_meanwhile)
        batcher = Batcher(self.batch_segments)
        self.progress.start()
        try:
            with self.claims.heartbeat(), source:  # the heartbeat keeps our claims fresh (manifests.claims)
                for event in source:
                    match event:
                        case VideoOpened(job):
                            self.progress.expect(job.video_id, job.plan.num_segments)
                            self._finish_if_complete(job)  # a video with no frame work left is done now
                        case SegmentsDecoded():
                            for batch in batcher.add(event):
                                self._embed(batch)
                        case VideoFailed(job, reason):
                            self._fail(job, reason)
                        case ClaimedElsewhere(skipped):
                            self.summary.claimed_elsewhere.append(skipped.video_id)
                            self.progress.settle(skipped.video_id, done=False)
                        case FinishedElsewhere(skipped):
                            self.summary.skipped.append(skipped.video_id)
                            self.progress.settle(skipped.video_id, done=False)
                self._embed(batcher.flush())
        finally:
            self.claims.release_all()

    def _embed(self, batch: Batch) -> None:
        batch = [segments for segments in batch if not segments.job.failed]
        if not batch:
            return
        try:
            embed_batch(batch, self.extractors, self.config, on_modality=lambda m: self.progress.show(now=m))
        except Exception as exc:  # a backbone failure (e.g. out of memory) fails these videos only
            for segments in batch:
                self._fail(segments.job, f"backbone error: {type(exc).__name__}: {str(exc)[:200]}")
            return
        finally:
            _return_free_heap()
        self.progress.tick([(segments.job.video_id, segments.size) for segments in batch])
        for job in {id(s.job): s.job for s in batch}.values():
            self._finish_if_complete(job)

    # ---- the end of a video

    def _finish_if_complete(self, job: VideoJob) -> None:
        if not job.complete(self.frame_modalities, self.audio_modalities):
            return
        record = self.writer.finish(job)
        if record is None:  # another process took the video over meanwhile
            self.summary.claimed_elsewhere.append(job.video_id)
        else:
            self._close(record)

    def _fail(self, job: VideoJob, reason: str) -> None:
        record = self.writer.fail(job, reason)
        if record is not None:  # None: recorded already
            self._close(record)

    def _close(self, record: VideoRecord) -> None:
        self.summary.records.append(record)
        self.progress.settle(record.video_id, done=record.status == DONE)
        self.progress.count_videos(len(self.summary.records), self.videos_total, len(self.summary.failed))


def _malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc; absent elsewhere (macOS, musl keep their own ways)
    except (AttributeError, OSError):
        return None


_MALLOC_TRIM = _malloc_trim()


def _return_free_heap() -> None:
    """Give the C heap's free pages back to the system after each batch of segments.

    A batch's tensors and frames leave free holes in glibc's heaps, which it keeps: kept, they make a
    long video's peak memory grow with its length (benchmarks/results/README.md, "Extraction memory
    against video length")."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)



def extract_videos(
    sources: list[VideoSource],
    cache: FeatureCache,
    extractors: dict[str, Extractor],
    config: ExtractionConfig,
    *,
    batch_segments: int = 8,
    retry_failed: bool = False,
    progress: bool = True,
    verify: bool = False,
) -> ExtractSummary:
    """Extract every source into `cache` (skipping finished ones); rewrite the manifest at the end.

    verify: check every finished video's arrays fully (checksum, finite values) and its file's whole
    content, instead of the cheap check (array sizes and shapes; size + mtime of the file)."""
    run = _Extraction(cache, extractors, config, batch_segments, retry_failed, progress, verify)
    try:
        return run.run(sources)
    finally:
        cache.write_manifest()
