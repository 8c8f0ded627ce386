"""The extract stage: videos -> decoded segments -> frozen backbones -> feature cache + manifest.

Segments stream through one pipeline: a background thread opens, plans and decodes videos in
order while the main thread runs the backbones on batches of segments, filled across videos when a
video has few segments. A video's features are written only once all of them exist, and its record
(the manifest row) last, so an interrupted run leaves nothing that a rerun would trust by mistake.

Resuming and concurrency: a video is skipped when its record says done, its file's content hash is
unchanged (size + mtime stand for it; `verify` rehashes) and its arrays are intact (sizes and shapes;
`verify` also checks their checksums and values); anything else is redone. A process claims a video
(manifests/claims.py: a claim file naming host and pid, refreshed while it works) before working on
it; a claim whose process is gone is taken over, so a run killed with -9 is simply run again, and
two processes on the same output split the videos between them instead of colliding.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from extractors.base import Extractor
from extractors.config import ExtractionConfig
from extractors.decode import (
    AudioStream,
    DecodeError,
    SegmentPlan,
    VideoFrames,
    count_segments,
    open_audio,
    read_audio_windows,
)
from manifests.cache import (
    DONE,
    FAILED,
    MISSING,
    CacheError,
    FeatureCache,
    ModalityRecord,
    VideoRecord,
    file_sha256,
)
from manifests.files import remove_temporary_files

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".avi", ".mov", ".webm")
LEGACY_FINGERPRINT_BYTES = 1 << 20
# Decoded segments waiting for the backbones, at most (rounded up to one batch): enough to keep the
# backbones fed, and the same for a long video as for a short one, whose few segments never fill it.
LOOKAHEAD_SEGMENTS = 8


@dataclass(frozen=True)
class VideoSource:
    video_id: str
    path: Path


def _walk_video_files(root: Path) -> list[Path]:
    """Video files under `root`, following symlinked folders but never entering a folder twice
    (a link back up the tree, or two links to one folder, would otherwise loop or duplicate)."""
    seen: set[tuple[int, int]] = set()
    found = []
    for folder, subfolders, files in os.walk(root, followlinks=True):
        stat = os.stat(folder)
        if (stat.st_dev, stat.st_ino) in seen:
            subfolders[:] = []
            continue
        seen.add((stat.st_dev, stat.st_ino))
        subfolders.sort()
        for name in files:
            path = Path(folder) / name
            if path.suffix.lower() in VIDEO_EXTENSIONS and path.is_file():
                found.append(path)
    return sorted(found)


def discover_videos(root: Path) -> list[VideoSource]:
    """Every video under `root` (recursively, through symlinked folders), with ids unique across sub-folders.

    The id is the path relative to `root` without its extension ("ball/001"); when two files differ
    only by extension, those files keep it ("ball/001.mp4") so ids never collide.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"video folder {root} does not exist")
    paths = _walk_video_files(root)
    stems: dict[str, int] = {}
    for path in paths:
        stem_id = path.relative_to(root).with_suffix("").as_posix()
        stems[stem_id] = stems.get(stem_id, 0) + 1
    sources = []
    for path in paths:
        relative = path.relative_to(root)
        stem_id = relative.with_suffix("").as_posix()
        video_id = stem_id if stems[stem_id] == 1 else relative.as_posix()
        sources.append(VideoSource(video_id, path))
    return sources


def file_fingerprint(path: Path) -> tuple[int, str]:
    """(size in bytes, "sha256:<hex>" of the whole file, streamed once)."""
    return Path(path).stat().st_size, file_sha256(path)


def legacy_fingerprint(path: Path) -> str:
    """The fingerprint of records written before whole-file hashing: sha1 of the size and the first
    and last MiB (it misses a same-size edit in the middle; such records keep it until re-extracted)."""
    size = path.stat().st_size
    digest = hashlib.sha1(str(size).encode())
    with open(path, "rb") as handle:
        digest.update(handle.read(LEGACY_FINGERPRINT_BYTES))
        if size > LEGACY_FINGERPRINT_BYTES:
            handle.seek(max(LEGACY_FINGERPRINT_BYTES, size - LEGACY_FINGERPRINT_BYTES))
            digest.update(handle.read(LEGACY_FINGERPRINT_BYTES))
    return digest.hexdigest()[:16]


def same_file(record: VideoRecord, path: Path, rehash: bool = False) -> bool:
    """True when `path` is the file `record` was made from.

    Size and mtime equal to the recorded ones stand for the recorded hash (only a tool that restores
    mtimes could change a file keeping both); otherwise, or with `rehash` (`--verify`), the whole file
    is hashed again. Records from before
    whole-file hashing are compared with their sampled fingerprint."""
    stat = path.stat()
    if record.size_bytes != stat.st_size or not record.fingerprint:
        return False
    if not record.fingerprint.startswith("sha256:"):
        return legacy_fingerprint(path) == record.fingerprint
    if not rehash and record.mtime_ns == stat.st_mtime_ns:
        return True
    return file_sha256(path) == record.fingerprint


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


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


# --------------------------------------------------------------------------- cache set-up


def cache_if_complete(
    out: Path, config: ExtractionConfig, sources: list[VideoSource], retry_failed: bool = False, verify: bool = False
) -> FeatureCache | None:
    """The existing cache of `config` when every source in it is final, else None.

    Lets `extract` with nothing to do skip building the backbones. The stored extractors must be the
    ones this code would build (names and versions, known without building them)."""
    from extractors.base import feature_versions

    cache = FeatureCache(Path(out).expanduser() / config.config_hash())
    if not (cache.root / "config.json").is_file():
        return None
    if cache.config.version_mismatch(feature_versions(config)):
        return None  # open_cache explains the difference once the extractors are built
    if any(needs_work(cache, s, retry_failed, verify) for s in sources):
        return None
    return cache


# --------------------------------------------------------------------------- the streaming run


@dataclass
class _VideoJob:
    source: VideoSource
    record: VideoRecord
    plan: SegmentPlan | None = None
    video: VideoFrames | None = None
    audio: AudioStream | None = None  # None if no track (or no audio modality)
    features: dict[str, np.ndarray] = field(default_factory=dict)
    filled: dict[str, int] = field(default_factory=dict)
    audio_missing: bool = False
    failed: bool = False


@dataclass
class _Chunk:
    job: _VideoJob
    first: int  # index of the chunk's first segment in its video
    frames: np.ndarray | None  # uint8 (n, clips*clip_frames, H, W, 3)
    audio: list[np.ndarray] | None

    @property
    def size(self) -> int:
        return len(self.frames) if self.frames is not None else len(self.audio)


@dataclass
class _Failed:
    job: _VideoJob
    reason: str


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
        self.seen: dict[str, str | None] = {}  # video id -> finished_at of the record run() judged
        self.summary = ExtractSummary()
        # Progress in segments, the total planned from container metadata before the first decode; the
        # bar writes to its own copy of the terminal, untouched while decoder messages are caught.
        self.terminal = _terminal() if progress else None
        self.bar = tqdm(total=0, unit="seg", dynamic_ncols=True, disable=not progress, desc="extract",
                        file=self.terminal)
        self.expected: dict[str, int] = {}  # video id -> its segments in the bar's total
        self.ticked: dict[str, int] = {}  # video id -> its segments counted as done
        self.postfix: dict[str, object] = {}
        self.videos_total = 0
        self.started = time.perf_counter()

    # ---- decisions

    def _needs_work(self, source: VideoSource) -> bool:
        record = self.cache.read_record(source.video_id)
        self.seen[source.video_id] = None if record is None else record.finished_at
        return needs_work(self.cache, source, self.retry_failed, self.verify)

    def _finished_meanwhile(self, source: VideoSource) -> bool:
        """After claiming: did another process write this video's record since run() judged it?"""
        record = self.cache.read_record(source.video_id)
        if record is None or record.finished_at == self.seen.get(source.video_id):
            return False  # the record run() judged (or none): still to do
        return not needs_work(self.cache, source, self.retry_failed)

    # ---- producer (background thread)

    def _produce(self, jobs_in: list[VideoSource], out: queue.Queue, stop: threading.Event) -> None:
        try:
            for source in jobs_in:
                if stop.is_set():
                    return
                if not self.claims.acquire(source.video_id):
                    out.put(("claimed", source))
                    continue
                if self._finished_meanwhile(source):  # by another process, since run() looked
                    self.claims.release(source.video_id)
                    out.put(("skipped", source))
                    continue
                # ours now: what an interrupted write of this video left behind can go
                remove_temporary_files(self.cache.video_dir(source.video_id))
                job = self._open(source)
                if job.failed:
                    out.put(_Failed(job, job.record.error or "failed"))
                    continue
                out.put(("planned", job))
                try:
                    self._decode(job, out, stop)
                except DecodeError as exc:
                    out.put(_Failed(job, str(exc)))
                except Exception as exc:  # keep the batch going past one bad video
                    out.put(_Failed(job, f"{type(exc).__name__}: {exc}"))
        finally:
            out.put(None)

    def _open(self, source: VideoSource) -> _VideoJob:
        record = VideoRecord(video_id=source.video_id, path=str(source.path), status=FAILED)
        record.random_weights = self.config.random_weights
        record.started_at = _now()
        job = _VideoJob(source, record)
        try:
            record.mtime_ns = source.path.stat().st_mtime_ns  # before hashing: a later edit changes it
            record.size_bytes, record.fingerprint = file_fingerprint(source.path)
            video = VideoFrames(source.path, self.config.decode_short_side)
            info = video.info
            record.fps, record.frame_count = round(info.fps, 6), info.frame_count
            record.duration_s = round(info.duration_s, 6)
            plan = video.plan(self.config)
            if plan.num_segments == 0:
                need = (
                    f"{self.config.segment_frames * self.config.frame_stride} frames"
                    if self.config.protocol == "rg"
                    else f"{self.config.window_seconds} s"
                )
                raise DecodeError(
                    f"too short for one segment: {info.frame_count} frames "
                    f"({info.duration_s:.2f} s), need {need}"
                )
            job.plan, job.video = plan, video
            record.num_segments = plan.num_segments
            record.segments = plan.to_dict()
            if self.audio_modalities:
                job.audio = open_audio(source.path, self.config.audio_sample_rate)
                job.audio_missing = job.audio is None
        except DecodeError as exc:
            job.failed, record.error = True, str(exc)
        except OSError as exc:
            job.failed, record.error = True, f"cannot read file: {exc.strerror or exc}"
        except Exception as exc:  # anything else about this file fails this video only
            job.failed, record.error = True, f"{type(exc).__name__}: {exc}"
        return job

    def _decode(self, job: _VideoJob, out: queue.Queue, stop: threading.Event) -> None:
        plan = job.plan
        try:
            for first in range(0, plan.num_segments, self.batch_segments):
                if stop.is_set():
                    return
                last = min(first + self.batch_segments, plan.num_segments)
                frames = job.video.read(plan.frame_indices[first:last]) if self.frame_modalities else None
                audio = None
                if job.audio is not None:
                    audio = read_audio_windows(job.audio, plan, self.config.audio_sample_rate, range(first, last))
                if frames is not None or audio is not None:
                    out.put(_Chunk(job, first, frames, audio))
        finally:  # decoded, failed or stopped: release the readers (and the audio's ffmpeg process)
            if job.audio is not None:
                job.audio.close()
            job.audio = job.video = None

    # ---- consumer (main thread)

    def run(self, sources: list[VideoSource]) -> ExtractSummary:
        todo = []
        for source in sources:
            if self._needs_work(source):
                todo.append(source)
                continue
            record = self.cache.read_record(source.video_id)
            if record.status == FAILED:
                self.summary.records.append(record)  # still failed on the same file: reported, not redone
            else:
                self.summary.skipped.append(source.video_id)
        self.videos_total = len(todo)
        if todo and not self.extractors:
            raise CacheError(f"{len(todo)} video(s) changed while extract was starting; run it again")
        self._plan(todo)
        items: queue.Queue = queue.Queue(maxsize=max(1, LOOKAHEAD_SEGMENTS // self.batch_segments))
        stop = threading.Event()
        producer = threading.Thread(target=self._produce, args=(todo, items, stop), daemon=True)
        producer.start()
        redraw = threading.Thread(target=self._redraw, args=(stop,), daemon=True)
        if not self.bar.disable:
            redraw.start()
        pending: list[_Chunk] = []
        heartbeat = self.claims.heartbeat().__enter__()  # keeps our claims fresh (see manifests.claims)
        try:
            while (item := items.get()) is not None:
                if isinstance(item, _Failed):
                    self._fail(item.job, item.reason)
                elif isinstance(item, tuple):
                    kind, payload = item
                    if kind == "planned":
                        self._expect(payload.source.video_id, payload.plan.num_segments)
                        self._maybe_finish(payload)  # a video with no frame work left is done now
                    elif kind == "claimed":
                        self.summary.claimed_elsewhere.append(payload.video_id)
                        self._settle(payload.video_id, done=False)
                    else:
                        self.summary.skipped.append(payload.video_id)
                        self._settle(payload.video_id, done=False)
                else:
                    pending = self._add(pending, item)
            self._flush(pending)
        finally:
            stop.set()
            while producer.is_alive():  # unblock a producer waiting on a full queue
                try:
                    items.get(timeout=0.1)
                except queue.Empty:
                    pass
            heartbeat.__exit__()
            self.claims.release_all()
            if redraw.is_alive():
                redraw.join()
            self.bar.close()
            if self.terminal not in (None, sys.stderr):
                self.terminal.close()
        return self.summary

    # ---- progress

    def _plan(self, todo: list[VideoSource]) -> None:
        """The bar's total: every video's segments from its container's metadata, before any decoding."""
        if self.bar.disable:
            return
        self.bar.set_description("plan")
        for source in todo:
            self._expect(source.video_id, count_segments(source.path, self.config))
        self.bar.set_description("extract")

    def _redraw(self, stop: threading.Event) -> None:
        """Redraw the bar every second, so its clock moves while one long backbone call runs (a full-size
        Video Swin segment takes seconds on a CPU)."""
        while not stop.wait(1.0):
            self.bar.refresh()

    def _expect(self, video_id: str, segments: int) -> None:
        self.bar.total += segments - self.expected.get(video_id, 0)
        self.expected[video_id] = segments
        self.bar.refresh()

    def _tick(self, chunks: list[_Chunk]) -> None:
        for chunk in chunks:
            self.ticked[chunk.job.source.video_id] = self.ticked.get(chunk.job.source.video_id, 0) + chunk.size
        self.bar.update(sum(c.size for c in chunks))

    def _settle(self, video_id: str, done: bool) -> None:
        """A video is over: its segments not yet counted are counted (done) or leave the total (failed, skipped)."""
        left = self.expected.get(video_id, 0) - self.ticked.get(video_id, 0)
        if left > 0 and done:
            self.bar.update(left)
        elif left > 0:
            self.bar.total -= left
            self.bar.refresh()
        self.ticked[video_id] = self.expected.get(video_id, 0)

    def _show(self, **fields) -> None:
        self.postfix.update(fields)
        self.bar.set_postfix(self.postfix, refresh=True)

    def _add(self, pending: list[_Chunk], chunk: _Chunk) -> list[_Chunk]:
        if pending and not self._compatible(pending[0], chunk):
            self._flush(pending)
            pending = []
        while chunk is not None:
            room = self.batch_segments - sum(c.size for c in pending)
            if chunk.size <= room:
                pending.append(chunk)
                chunk = None
            else:
                head, chunk = _split(chunk, room)
                pending.append(head)
            if sum(c.size for c in pending) >= self.batch_segments:
                self._flush(pending)
                pending = []
        return pending

    @staticmethod
    def _compatible(a: _Chunk, b: _Chunk) -> bool:
        """Chunks batch together when their frames stack and their audio windows share a length."""
        if (a.frames is None) != (b.frames is None):
            return False
        if a.frames is not None and a.frames.shape[1:] != b.frames.shape[1:]:
            return False
        return True

    def _flush(self, pending: list[_Chunk]) -> None:
        chunks = [c for c in pending if not c.job.failed]
        if not chunks:
            return
        try:
            if self.frame_modalities and chunks[0].frames is not None:
                frames = np.concatenate([c.frames for c in chunks])
                count, clips = frames.shape[0], self.config.frames_per_clip
                clip_batch = torch.from_numpy(frames.reshape(-1, clips, *frames.shape[2:]))
                for modality in self.frame_modalities:
                    self._show(now=modality)
                    embedded = self.extractors[modality].embed(clip_batch)
                    # fs1000: several clips per window, averaged into the window's row
                    per_segment = embedded.reshape(count, -1, embedded.shape[-1]).mean(dim=1)
                    self._scatter(chunks, modality, per_segment.numpy())
            with_audio = [c for c in chunks if c.audio is not None]
            for modality in self.audio_modalities:
                if with_audio:
                    self._show(now=modality)
                    windows = [w for c in with_audio for w in c.audio]
                    embedded = self.extractors[modality].embed(windows)
                    self._scatter(with_audio, modality, embedded.numpy())
        except Exception as exc:  # a backbone failure (e.g. out of memory) fails these videos only
            for chunk in chunks:
                self._fail(chunk.job, f"backbone error: {type(exc).__name__}: {str(exc)[:200]}")
            return
        finally:
            _return_free_heap()
        self._tick(chunks)
        for job in {id(c.job): c.job for c in chunks}.values():
            self._maybe_finish(job)

    def _scatter(self, chunks: list[_Chunk], modality: str, rows: np.ndarray) -> None:
        offset = 0
        for chunk in chunks:
            job, size = chunk.job, chunk.size
            if modality not in job.features:
                job.features[modality] = np.zeros((job.plan.num_segments, rows.shape[1]), np.float32)
            job.features[modality][chunk.first : chunk.first + size] = rows[offset : offset + size]
            job.filled[modality] = job.filled.get(modality, 0) + size
            offset += size

    def _maybe_finish(self, job: _VideoJob) -> None:
        if job.failed:
            return
        total = job.plan.num_segments
        for modality in self.extractors:
            if modality in self.audio_modalities and job.audio_missing:
                continue
            if job.filled.get(modality, 0) < total:
                return
        self._finish(job)

    def _finish(self, job: _VideoJob) -> None:
        record, dtype = job.record, np.dtype(self.config.feature_dtype)
        with np.errstate(over="ignore"):  # an overflow is reported below, as inf
            arrays = {m: job.features[m].astype(dtype) for m in job.features}
        for modality, array in arrays.items():  # checked after the cast: float16 overflows to inf
            bad = ~np.isfinite(array).all(axis=1)
            if bad.any():
                where = np.flatnonzero(bad)
                self._fail(job, f"NaN/inf values in {len(where)} of {len(array)} segments (first: segment "
                                f"{where[0]}); not saved", failed_modality=modality)
                return
        if not self.claims.still_held(record.video_id):
            # silent longer than the stale limit (a suspended process): another process took the video over
            self.summary.claimed_elsewhere.append(record.video_id)
            self.claims.release(record.video_id)
            return
        for modality, extractor in self.extractors.items():
            if modality in self.audio_modalities and job.audio_missing:
                self.cache.feature_path(record.video_id, modality).unlink(missing_ok=True)
                record.modalities[modality] = ModalityRecord(
                    MISSING, extractor=extractor.name, version=extractor.feature_version(self.config), reason="no audio track"
                )
                continue
            array = arrays[modality]
            path = self.cache.feature_path(record.video_id, modality)
            self.cache.save_features(record.video_id, modality, array)
            record.modalities[modality] = ModalityRecord(
                DONE, shape=list(array.shape), extractor=extractor.name, version=extractor.feature_version(self.config),
                bytes=path.stat().st_size, sha256=file_sha256(path),
            )
        record.status, record.error, record.finished_at = DONE, None, _now()
        self.cache.write_record(record)  # last: only now is the video trusted
        self._close(job)

    def _fail(self, job: _VideoJob, reason: str, failed_modality: str | None = None) -> None:
        if job.record.finished_at:
            return  # already recorded (a video can fail in the decoder and in a backbone batch)
        job.failed = True
        record = job.record
        record.status, record.finished_at = FAILED, _now()
        record.error = reason if failed_modality is None else f"{failed_modality} features: {reason}"
        for modality, extractor in self.extractors.items():
            if failed_modality is not None and modality != failed_modality:
                why = f"not saved: {failed_modality} failed"
            else:
                why = reason
            record.modalities[modality] = ModalityRecord(
                FAILED, extractor=extractor.name, version=extractor.feature_version(self.config), reason=why
            )
        job.features.clear()
        self.cache.write_record(record)
        self._close(job)

    def _close(self, job: _VideoJob) -> None:
        self.summary.records.append(job.record)
        self.claims.release(job.source.video_id)
        self._settle(job.source.video_id, done=job.record.status == DONE)
        self.postfix.update(videos=f"{len(self.summary.records)}/{self.videos_total}", failed=len(self.summary.failed))
        self.bar.set_postfix(self.postfix, refresh=False)


def _malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc; absent elsewhere (macOS, musl keep their own ways)
    except (AttributeError, OSError):
        return None


_MALLOC_TRIM = _malloc_trim()


def _return_free_heap() -> None:
    """Give the C heap's free pages back to the system after each batch of segments.

    A batch's tensors and frames leave free holes in glibc's heaps, which it keeps: they made a long
    video's peak memory a few hundred MB higher than a short one's (benchmarks/results/README.md)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _terminal():
    """A stream on a copy of file descriptor 2, so the bar stays visible while decoder messages are caught
    (extractors.decode.decoder_messages); sys.stderr itself when it is not the process's descriptor 2."""
    try:
        if sys.stderr.fileno() == 2:
            return os.fdopen(os.dup(2), "w", buffering=1)
    except (AttributeError, OSError, ValueError):
        pass
    return sys.stderr


def _split(chunk: _Chunk, size: int) -> tuple[_Chunk, _Chunk]:
    head = _Chunk(
        chunk.job,
        chunk.first,
        None if chunk.frames is None else chunk.frames[:size],
        None if chunk.audio is None else chunk.audio[:size],
    )
    tail = _Chunk(
        chunk.job,
        chunk.first + size,
        None if chunk.frames is None else chunk.frames[size:],
        None if chunk.audio is None else chunk.audio[size:],
    )
    return head, tail


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
