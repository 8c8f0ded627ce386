"""`pipeline extract --ray`: the extract stage spread over Ray actors, one machine or many.

Each actor builds the backbones once (one actor per GPU, or `--ray-workers` CPU actors) and runs
the very same `extract_videos` on every batch of videos it is handed, so claims, atomic writes, the
record-last rule, resume and the cache layout are exactly those of the single-process path, and so
are the features (same code, same seeded backbones; on a CPU, the same thread count as well).

Decoding: inside an actor, `extract_videos` opens and decodes videos in a background thread while
the backbones run on the previous batch, so the actor's CPU cores feed its GPU without a round trip
through Ray's object store (decoded frames are ~100x larger than the encoded file; shipping them
between processes would cost more than decoding next to the model).

Work is handed out dynamically: the driver keeps a queue of small batches of videos (largest files
first, so the long ones do not all end up at the tail) and gives the next batch to whichever actor
is free, so a slow worker delays only its current batch. When an actor dies (a crash, out of memory,
a lost node), Ray restarts it (it rebuilds its backbones), the driver releases the claims the dead
process held and puts its batch back at the front of the queue; the videos it had finished keep
their records and are skipped, the unfinished ones are redone. A rerun of the command skips
everything done, as on one machine.
"""

from __future__ import annotations

import math
import os
import socket
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from extractors.base import BackboneUnavailableError, WeightsSource, build_extractors
from extractors.config import ExtractionConfig
from manifests.cache import FAILED, CacheConfig, CacheError, FeatureCache, open_cache
from pipeline.extraction.loop import ExtractSummary, cache_if_complete, extract_videos
from pipeline.ray_session import import_ray
from pipeline.videos import VideoSource

MAX_RESTARTS = 3  # per actor; a worker that keeps dying is given up and its share goes to the others
MAX_VIDEOS_PER_TASK = 8


class WorkerSetupError(RuntimeError):
    """A worker could not build its backbones or open the cache (e.g. missing weights)."""


@dataclass(frozen=True)
class WorkerPlan:
    workers: int
    device: str  # "cuda" | "cpu", as seen inside an actor
    num_gpus: float  # per actor
    num_cpus: float  # per actor (a scheduling share)
    threads: int  # torch intra-op threads per CPU actor

    def describe(self) -> str:
        if self.device == "cuda":
            return f"{self.workers} GPU worker(s), {self.num_gpus:g} GPU each"
        return f"{self.workers} CPU worker(s), {self.threads} thread(s) each"


def plan_workers(resources: dict[str, float], device: str = "auto", workers: int | None = None) -> WorkerPlan:
    """One actor per GPU (auto/cuda with GPUs in the cluster), else CPU actors.

    CPU default: one actor per 4 cores (full backbones are ~1 GB per actor), each with its share of
    the cores as threads. More workers than GPUs share them (fractional GPUs)."""
    gpus, cpus = float(resources.get("GPU", 0)), float(resources.get("CPU", 1))
    if device == "cuda" and gpus < 1:
        raise WorkerSetupError("--device cuda was asked for, but the Ray cluster has no GPU")
    if workers is not None and workers < 1:
        raise WorkerSetupError(f"--ray-workers must be >= 1, got {workers}")
    if gpus >= 1 and device != "cpu":
        count = workers or int(gpus)
        return WorkerPlan(count, "cuda", min(1.0, gpus / count), 1.0, 1)
    count = workers or max(1, int(cpus) // 4)
    share = cpus / count
    return WorkerPlan(count, "cpu", 0.0, share, max(1, math.floor(share)))


class ExtractionWorker:
    """The Ray actor: backbones built once in __init__, then `extract` on each batch it is given."""

    def __init__(self, config: dict[str, Any], out: str, device: str, weights: WeightsSource,
                 threads: int, batch_segments: int, retry_failed: bool, verify: bool = False) -> None:
        if device == "cpu":
            torch.set_num_threads(threads)
        self.config = ExtractionConfig.from_dict(config)
        self.batch_segments, self.retry_failed, self.verify = batch_segments, retry_failed, verify
        self.error: str | None = None
        try:
            self.extractors = build_extractors(self.config, torch.device(device), weights)
            self.cache = open_cache(Path(out), CacheConfig.extracted(self.config, self.extractors))
        except (BackboneUnavailableError, CacheError, ValueError) as exc:
            self.error = str(exc)  # reported by ready(): a clean usage error, not a dead actor

    def ready(self) -> dict[str, Any]:
        """Who this process is (its claims name it) and whether it could start."""
        return {"host": socket.gethostname(), "pid": os.getpid(), "error": self.error}

    def extract(self, sources: list[VideoSource]) -> ExtractSummary:
        return extract_videos(sources, self.cache, self.extractors, self.config,
                              batch_segments=self.batch_segments, retry_failed=self.retry_failed, progress=False,
                              verify=self.verify)


@dataclass
class RayExtractResult:
    summary: ExtractSummary
    cache: FeatureCache
    plan: WorkerPlan
    workers_lost: int = 0  # actor deaths seen (each followed by a restart while restarts remain)
    videos_requeued: int = 0  # videos handed out again after their worker died
    unfinished: list[str] = field(default_factory=list)  # not processed: every worker was lost
    last_error: str | None = None  # why the last worker death happened, as Ray tells it


def _release_claims(cache: FeatureCache, video_ids: list[str], owner: dict[str, Any]) -> None:
    """Remove the claims a dead actor held, so its videos are redone now rather than once its
    claims go stale (manifests/claims.py)."""
    cache.claims().release_for(video_ids, owner.get("host"), owner.get("pid"))


def _batches(sources: list[VideoSource], size: int) -> list[list[VideoSource]]:
    def file_size(source: VideoSource) -> int:
        try:
            return source.path.stat().st_size
        except OSError:
            return 0

    ordered = sorted(sources, key=file_size, reverse=True)  # longest first: a shorter tail
    return [ordered[i : i + size] for i in range(0, len(ordered), size)]


def extract_on_ray(
    sources: list[VideoSource],
    out: Path,
    config: ExtractionConfig,
    *,
    device: str = "auto",
    workers: int | None = None,
    weights: WeightsSource = WeightsSource(),
    batch_segments: int = 8,
    retry_failed: bool = False,
    verify: bool = False,
    videos_per_task: int | None = None,
    progress: bool = True,
    worker_class: type = ExtractionWorker,
    max_restarts: int = MAX_RESTARTS,
) -> RayExtractResult:
    """Extract `sources` into OUT/<config-hash>/ with Ray actors; Ray must be initialised (ray_session).

    worker_class: the actor class (a subclass of ExtractionWorker; the tests use one that crashes)."""
    ray = import_ray()
    from ray.exceptions import RayActorError

    plan = plan_workers(ray.cluster_resources(), device, workers)
    done = cache_if_complete(out, config, sources, retry_failed, verify)
    if done is not None:  # nothing to do: no worker, no backbone
        records = [done.read_record(s.video_id) for s in sources]
        summary = ExtractSummary(records=[r for r in records if r.status == FAILED],
                                 skipped=[r.video_id for r in records if r.status != FAILED])
        return RayExtractResult(summary, done, plan)
    cache = FeatureCache(Path(out).expanduser() / config.config_hash())
    size = videos_per_task or max(1, min(MAX_VIDEOS_PER_TASK, len(sources) // (plan.workers * 4)))
    queue = deque(_batches(sources, size))
    actor_cls = ray.remote(worker_class).options(
        num_cpus=plan.num_cpus, num_gpus=plan.num_gpus, max_restarts=max_restarts, max_task_retries=0,
    )
    actors = [
        actor_cls.remote(config.to_dict(), str(Path(out).expanduser()), plan.device, weights, plan.threads,
                         batch_segments, retry_failed, verify)
        for _ in range(plan.workers)
    ]
    result = RayExtractResult(ExtractSummary(), cache, plan)
    identity: dict[int, dict[str, Any]] = {}
    # ref -> (actor index, batch); batch None: a ready() call (start-up or after a restart)
    in_flight: dict[Any, tuple[int, list[VideoSource] | None]] = {a.ready.remote(): (i, None) for i, a in enumerate(actors)}
    idle: list[int] = []
    bar = tqdm(total=len(sources), unit="video", desc="extract", dynamic_ncols=True, disable=not progress)
    try:
        while queue or any(batch is not None for _, batch in in_flight.values()):
            while idle and queue:
                index = idle.pop()
                batch = queue.popleft()
                in_flight[actors[index].extract.remote(batch)] = (index, batch)
            if not in_flight:
                break  # every worker is gone for good
            (ref,), _ = ray.wait(list(in_flight), num_returns=1)
            index, batch = in_flight.pop(ref)
            try:
                value = ray.get(ref)
            except RayActorError as exc:
                result.last_error = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                if batch is not None:
                    result.workers_lost += 1
                    result.videos_requeued += len(batch)
                    _release_claims(cache, [s.video_id for s in batch], identity.get(index, {}))
                    queue.appendleft(batch)
                    # ready() waits for the restart; it fails for good once restarts are used up
                    in_flight[actors[index].ready.remote()] = (index, None)
                bar.set_postfix(lost=result.workers_lost, refresh=False)
                continue
            if batch is None:
                if value["error"]:
                    raise WorkerSetupError(value["error"])
                identity[index] = value
                idle.append(index)
                continue
            _merge(result.summary, value)
            idle.append(index)
            bar.update(len(batch))
            bar.set_postfix(failed=len(result.summary.failed), lost=result.workers_lost, refresh=False)
        result.unfinished = [s.video_id for batch in queue for s in batch]
        result.summary.records.sort(key=lambda r: r.video_id)
    finally:
        bar.close()
        for actor in actors:
            ray.kill(actor, no_restart=True)
        # Stopped early (Ctrl-C, an error): free what the killed workers held, or a claim naming
        # another machine would keep a rerun from those videos.
        for index, batch in in_flight.values():
            if batch is not None:
                _release_claims(cache, [s.video_id for s in batch], identity.get(index, {}))
        if cache.root.is_dir():
            cache.write_manifest()  # once, over every worker's records
    return result


def _merge(total: ExtractSummary, part: ExtractSummary) -> None:
    total.records.extend(part.records)
    total.skipped.extend(part.skipped)
    total.claimed_elsewhere.extend(part.claimed_elsewhere)
