"""The extract stage: videos -> decoded segments -> frozen backbones -> feature cache + manifest.

Segments stream through one pipeline: a background thread opens, plans and decodes videos in
order while the main thread runs the backbones on batches of segments, filled across videos when a
video has few segments. A video's features are written only once all of them exist, and its record
(the manifest row) last, so an interrupted run leaves nothing that a rerun would trust by mistake.

Resuming and concurrency: a video is skipped when its record says done and its file's fingerprint
is unchanged. A process claims a video (an O_EXCL claim file naming host and pid) before working on
it; a claim whose process is gone is taken over, so a run killed with -9 is simply run again, and
two processes on the same output split the videos between them instead of colliding.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import socket
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
from extractors.decode import DecodeError, SegmentPlan, VideoFrames, audio_windows, count_segments, load_audio
from manifests.cache import DONE, FAILED, MISSING, CacheError, FeatureCache, ModalityRecord, VideoRecord

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".avi", ".mov", ".webm")
FINGERPRINT_BYTES = 1 << 20  # hash the first and last MiB: catches edits without reading whole files


@dataclass(frozen=True)
class VideoSource:
    video_id: str
    path: Path


def discover_videos(root: Path) -> list[VideoSource]:
    """Every video under `root` (recursively), with ids unique across sub-folders.

    The id is the path relative to `root` without its extension ("ball/001"); when two files differ
    only by extension, those files keep it ("ball/001.mp4") so ids never collide.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"video folder {root} does not exist")
    paths = sorted(
        p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS
    )
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
    """(size in bytes, sha1 of size + first and last MiB)."""
    size = path.stat().st_size
    digest = hashlib.sha1(str(size).encode())
    with open(path, "rb") as handle:
        digest.update(handle.read(FINGERPRINT_BYTES))
        if size > FINGERPRINT_BYTES:
            handle.seek(max(FINGERPRINT_BYTES, size - FINGERPRINT_BYTES))
            digest.update(handle.read(FINGERPRINT_BYTES))
    return size, digest.hexdigest()[:16]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------- claims


class Claims:
    """Claim files under `<cache>/claims/`: one process works on a video at a time."""

    def __init__(self, cache: FeatureCache) -> None:
        self.folder = cache.root / "claims"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.host = socket.gethostname()
        self.held: set[Path] = set()

    def _path(self, video_id: str) -> Path:
        return self.folder / (hashlib.sha1(video_id.encode()).hexdigest()[:20] + ".claim")

    def _owner_alive(self, path: Path) -> bool:
        try:
            owner = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return False  # unreadable: its writer died half-way
        if owner.get("host") != self.host:
            return True  # another machine's process: cannot check, so respect it
        try:
            os.kill(int(owner["pid"]), 0)
        except ProcessLookupError:
            return False
        except (PermissionError, KeyError, ValueError):
            return True
        return True

    def acquire(self, video_id: str) -> bool:
        path = self._path(video_id)
        payload = json.dumps({"video_id": video_id, "host": self.host, "pid": os.getpid(), "since": _now()})
        for _ in range(2):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if self._owner_alive(path):
                    return False
                path.unlink(missing_ok=True)  # stale claim of a dead process: take it over
                continue
            with os.fdopen(fd, "w") as handle:
                handle.write(payload)
            self.held.add(path)
            return True
        return False

    def release(self, video_id: str) -> None:
        path = self._path(video_id)
        if path in self.held:
            path.unlink(missing_ok=True)
            self.held.discard(path)

    def release_all(self) -> None:
        for path in list(self.held):
            path.unlink(missing_ok=True)
        self.held.clear()


# --------------------------------------------------------------------------- cache set-up


def prepare_cache(out: Path, config: ExtractionConfig, extractors: dict[str, Extractor]) -> FeatureCache:
    """The cache folder for this configuration, with its config.json (checked if it already exists)."""
    cache = FeatureCache(Path(out).expanduser() / config.config_hash())
    described = {m: e.describe() for m, e in extractors.items()}
    if (cache.root / "config.json").is_file():
        stored = cache.read_config()
        stored_versions = {m: (d["name"], d["version"]) for m, d in stored.get("extractors", {}).items()}
        current = {m: (d["name"], d["version"]) for m, d in described.items()}
        if stored_versions != current:
            raise CacheError(
                f"{cache.root} holds features from extractors {stored_versions}, but this code has "
                f"{current}; extract into a new --out folder"
            )
        return cache
    cache.write_config(
        {
            "config_hash": config.config_hash(),
            "source": "extract",
            "extraction": config.to_dict(),
            "modalities": list(config.modalities),
            "extractors": described,
            "random_weights": config.random_weights,
            "note": "RANDOM-WEIGHT BACKBONES: these features carry no pretrained knowledge"
            if config.random_weights
            else "pretrained backbones",
            "created_at": _now(),
        }
    )
    return cache


# --------------------------------------------------------------------------- the streaming run


@dataclass
class _VideoJob:
    source: VideoSource
    record: VideoRecord
    plan: SegmentPlan | None = None
    video: VideoFrames | None = None
    windows: list[np.ndarray] | None = None  # one audio waveform per segment, None if no track
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
    ) -> None:
        self.cache, self.extractors, self.config = cache, extractors, config
        self.batch_segments = max(1, batch_segments)
        self.retry_failed = retry_failed
        self.frame_modalities = [m for m, e in extractors.items() if e.input_kind == "frames"]
        self.audio_modalities = [m for m, e in extractors.items() if e.input_kind == "audio"]
        self.claims = Claims(cache)
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
        """False when the video's record is final: done, or failed on this very file (unless retrying)."""
        record = self.cache.read_record(source.video_id)
        if record is None:
            return True
        try:
            size, fingerprint = file_fingerprint(source.path)
        except OSError:
            return True
        if record.size_bytes != size or record.fingerprint != fingerprint:
            return True  # the file changed since it was extracted
        return record.status == FAILED and self.retry_failed

    # ---- producer (background thread)

    def _produce(self, jobs_in: list[VideoSource], out: queue.Queue, stop: threading.Event) -> None:
        try:
            for source in jobs_in:
                if stop.is_set():
                    return
                if not self.claims.acquire(source.video_id):
                    out.put(("claimed", source))
                    continue
                if not self._needs_work(source):  # another process finished it meanwhile
                    self.claims.release(source.video_id)
                    out.put(("skipped", source))
                    continue
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
                waveform = load_audio(source.path, self.config.audio_sample_rate)
                if waveform is None:
                    job.audio_missing = True
                else:
                    job.windows = audio_windows(waveform, plan, self.config.audio_sample_rate)
        except DecodeError as exc:
            job.failed, record.error = True, str(exc)
        except OSError as exc:
            job.failed, record.error = True, f"cannot read file: {exc.strerror or exc}"
        except Exception as exc:  # anything else about this file fails this video only
            job.failed, record.error = True, f"{type(exc).__name__}: {exc}"
        return job

    def _decode(self, job: _VideoJob, out: queue.Queue, stop: threading.Event) -> None:
        plan = job.plan
        for first in range(0, plan.num_segments, self.batch_segments):
            if stop.is_set():
                return
            last = min(first + self.batch_segments, plan.num_segments)
            frames = job.video.read(plan.frame_indices[first:last]) if self.frame_modalities else None
            audio = job.windows[first:last] if job.windows is not None else None
            out.put(_Chunk(job, first, frames, audio))

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
        self._plan(todo)
        items: queue.Queue = queue.Queue(maxsize=4)
        stop = threading.Event()
        producer = threading.Thread(target=self._produce, args=(todo, items, stop), daemon=True)
        producer.start()
        heartbeat = threading.Thread(target=self._heartbeat, args=(stop,), daemon=True)
        if not self.bar.disable:
            heartbeat.start()
        pending: list[_Chunk] = []
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
            self.claims.release_all()
            if heartbeat.is_alive():
                heartbeat.join()
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

    def _heartbeat(self, stop: threading.Event) -> None:
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
        for modality, extractor in self.extractors.items():
            if modality in self.audio_modalities and job.audio_missing:
                self.cache.feature_path(record.video_id, modality).unlink(missing_ok=True)
                record.modalities[modality] = ModalityRecord(
                    MISSING, extractor=extractor.name, version=extractor.version, reason="no audio track"
                )
                continue
            array = job.features[modality].astype(dtype)
            self.cache.save_features(record.video_id, modality, array)
            record.modalities[modality] = ModalityRecord(
                DONE, shape=list(array.shape), extractor=extractor.name, version=extractor.version
            )
        record.status, record.error, record.finished_at = DONE, None, _now()
        self.cache.write_record(record)  # last: only now is the video trusted
        self._close(job)

    def _fail(self, job: _VideoJob, reason: str) -> None:
        if job.record.finished_at:
            return  # already recorded (a video can fail in the decoder and in a backbone batch)
        job.failed = True
        record = job.record
        record.status, record.error, record.finished_at = FAILED, reason, _now()
        for modality, extractor in self.extractors.items():
            record.modalities[modality] = ModalityRecord(
                FAILED, extractor=extractor.name, version=extractor.version, reason=reason
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
) -> ExtractSummary:
    """Extract every source into `cache` (skipping finished ones); rewrite the manifest at the end."""
    run = _Extraction(cache, extractors, config, batch_segments, retry_failed, progress)
    try:
        return run.run(sources)
    finally:
        cache.write_manifest()
