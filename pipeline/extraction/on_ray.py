"""`pipeline extract --ray`: the extract stage spread over Ray actors, one machine or many.

Each actor builds the backbones once (one actor per GPU, or `--ray-workers` CPU actors) and runs
the very same `extract_videos` on every batch of videos it is handed, so claims, atomic writes, the
record-last rule, resume and the cache layout are exactly those of the single-process path, and so
are the features (same code, same seeded backbones; on a CPU, the same thread count as well).

Decoding: inside an actor, `extract_videos` opens and decodes videos in a background thread while
the backbones run on the previous batch, so the actor's CPU cores feed its GPU without a round trip
through Ray's object store (decoded frames are raw pixels, many times the compressed file; shipping
them between processes would cost more than decoding next to the model).

Work is handed out dynamically: the driver keeps a queue of small batches of videos (largest files
first, so the long ones do not all end up at the tail) and gives the next batch to whichever actor
is free, so a slow worker delays only its current batch. When an actor dies (a crash, out of memory,
a lost node), Ray restarts it (it rebuilds its backbones), the driver releases the claims the dead
process held and puts its batch back at the front of the queue; the videos it had finished keep
their records and are skipped, the unfinished ones are redone. A rerun of the command skips
everything done, as on one machine.

A lost worker is dead to the driver even when it does not look dead: its process may run on, orphaned
by a killed raylet, or name another host, whose claims go stale only after 10 minutes. Its claims
name its Ray actor and node (manifests/claims.py), so the driver removes them at once (the orphan then
writes no record: a writer checks its claim first), and a video another worker left to "another
running process" whose claim is held by a lost worker or a dead node is handed out again rather than
reported so. A video is handed out again after a lost worker at most MAX_RETRIES times; then it is
reported failed with the reason (not recorded in the cache: a rerun tries it again).
"""

from __future__ import annotations

import math
import os
import socket
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from extractors.base import BackboneUnavailableError, WeightsSource, identify_weights
from extractors.config import ExtractionConfig
from manifests.cache import DONE, FAILED, CacheError, FeatureCache, VideoRecord
from manifests.claims import ray_identity
from pipeline.extraction.entry import cache_folder, cache_if_complete, extract_into, open_extraction
from pipeline.extraction.events import now
from pipeline.extraction.loop import ExtractSummary
from pipeline.progress import progress_bar
from pipeline.ray_session import import_ray
from pipeline.videos import VideoSource

MAX_RESTARTS = 3  # per actor; a worker that keeps dying is given up and its share goes to the others
MAX_VIDEOS_PER_TASK = 8
MAX_RETRIES = 3  # per video: handed out again after this many lost workers, it is reported failed
RESTART_PATIENCE_S = 300.0  # a lost actor not back after this long (restarting, or nowhere to run) is given up


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

    CPU default: one actor per 4 cores (each actor holds its own copy of the full backbones), each with
    its share of the cores as threads. More workers than GPUs share them (fractional GPUs)."""
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
            self.cache, self.extractors = open_extraction(Path(out), self.config, torch.device(device), weights)
        except (BackboneUnavailableError, CacheError, ValueError) as exc:
            self.error = str(exc)  # reported by ready(): a clean usage error, not a dead actor

    def ready(self) -> dict[str, Any]:
        """Who this process is (its claims name it: host, pid, Ray node and actor) and whether it could start."""
        return {"host": socket.gethostname(), "pid": os.getpid(), **ray_identity(), "error": self.error}

    def extract(self, sources: list[VideoSource]) -> ExtractSummary:
        summary, _ = extract_into(self.cache, self.config, sources, extractors=self.extractors,
                                  batch_segments=self.batch_segments, retry_failed=self.retry_failed,
                                  verify=self.verify, progress=False)
        return summary


@dataclass
class RayExtractResult:
    summary: ExtractSummary
    cache: FeatureCache
    plan: WorkerPlan
    workers_lost: int = 0  # actor deaths seen (each followed by a restart while restarts remain)
    videos_requeued: int = 0  # videos handed out again after their worker died
    retried: list[str] = field(default_factory=list)  # videos handed out again after a lost worker, each once
    unfinished: list[str] = field(default_factory=list)  # not processed: every worker was lost
    last_error: str | None = None  # why the last worker death happened, as Ray tells it


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
    plan = plan_workers(ray.cluster_resources(), device, workers)
    try:  # the folder follows the weights files' contents; every worker must find the same ones
        config = identify_weights(config, weights)[0]
    except BackboneUnavailableError as exc:
        raise WorkerSetupError(str(exc)) from None
    done = cache_if_complete(out, config, sources, retry_failed, verify)
    if done is not None:  # nothing to do: no worker, no backbone
        return _already_done(done, sources, plan)
    size = videos_per_task or max(1, min(MAX_VIDEOS_PER_TASK, len(sources) // (plan.workers * 4)))
    actor_cls = ray.remote(worker_class).options(
        num_cpus=plan.num_cpus, num_gpus=plan.num_gpus, max_restarts=max_restarts, max_task_retries=0,
    )
    actors = [
        actor_cls.remote(config.to_dict(), str(Path(out).expanduser()), plan.device, weights, plan.threads,
                         batch_segments, retry_failed, verify)
        for _ in range(plan.workers)
    ]
    run = _Dispatch(ray, actors, _batches(sources, size), RayExtractResult(
        ExtractSummary(), FeatureCache(cache_folder(out, config)), plan))
    bar = progress_bar(total=len(sources), unit="video", desc="extract", dynamic_ncols=True, disable=not progress)
    try:
        run.until_done(bar)
    finally:
        bar.close()
        run.stop()
    return run.result


def _already_done(cache: FeatureCache, sources: list[VideoSource], plan: WorkerPlan) -> RayExtractResult:
    records = [cache.read_record(s.video_id) for s in sources]
    summary = ExtractSummary(records=[r for r in records if r.status == FAILED],
                             skipped=[r.video_id for r in records if r.status != FAILED])
    return RayExtractResult(summary, cache, plan)


class _Dispatch:
    """The driver's side: hands the next batch of videos to whichever actor is free, and puts the batch
    of an actor that died back at the front of the queue (Ray restarts the actor while restarts remain)."""

    def __init__(self, ray: Any, actors: list[Any], batches: list[list[VideoSource]], result: RayExtractResult) -> None:
        from ray.exceptions import ActorUnavailableError, RayActorError

        self.ray, self.actors, self.result, self.actor_error = ray, actors, result, RayActorError
        self.restarting_error = ActorUnavailableError
        self.unavailable_since: dict[int, float] = {}  # actor index -> when its ready() first found it restarting
        self.queue = deque(batches)
        self.started = now()  # records finished since were made by this run's workers
        self.identity: dict[int, dict[str, Any]] = {}  # actor index -> its ready() answer (host, pid, Ray ids)
        self.lost: list[dict[str, Any]] = []  # the identities of the workers that died
        self.retries: dict[str, int] = {}  # video id -> times handed out again after a lost worker
        # ref -> (actor index, batch); batch None: a ready() call (start-up or after a restart)
        self.in_flight: dict[Any, tuple[int, list[VideoSource] | None]] = {
            a.ready.remote(): (i, None) for i, a in enumerate(actors)}
        self.idle: list[int] = []

    def until_done(self, bar: Any) -> None:
        while self.queue or any(batch is not None for _, batch in self.in_flight.values()):
            self.hand_out()
            if not self.in_flight:
                break  # every worker is gone for good
            # after a loss, with only restarts to wait for: a lost node may leave nowhere to restart on
            restarts_only = self.result.workers_lost and all(b is None for _, b in self.in_flight.values())
            done, _ = self.ray.wait(list(self.in_flight), num_returns=1,
                                    timeout=RESTART_PATIENCE_S if restarts_only else None)
            if not done:
                break  # no worker came back: what is left is reported unfinished
            (ref,) = done
            index, batch = self.in_flight.pop(ref)
            try:
                value = self.ray.get(ref)
            except self.actor_error as exc:
                self.worker_lost(index, batch, exc)
                bar.set_postfix(lost=self.result.workers_lost, refresh=False)
                continue
            if batch is None:
                self.worker_ready(index, value)
                continue
            self.merge(value, batch)
            self.idle.append(index)
            bar.update(len(batch))
            bar.set_postfix(failed=len(self.result.summary.failed), lost=self.result.workers_lost, refresh=False)
        self.result.unfinished = [s.video_id for batch in self.queue for s in batch]
        self.result.summary.records.sort(key=lambda r: r.video_id)

    def hand_out(self) -> None:
        while self.idle and self.queue:
            index = self.idle.pop()
            batch = self.queue.popleft()
            self.in_flight[self.actors[index].extract.remote(batch)] = (index, batch)

    def worker_ready(self, index: int, answer: dict[str, Any]) -> None:
        if answer["error"]:
            raise WorkerSetupError(answer["error"])
        self.unavailable_since.pop(index, None)
        # an actor Ray called unavailable may answer again as the same process: it is not gone after all
        self.lost = [dead for dead in self.lost if not self.same_process(dead, answer)]
        self.identity[index] = answer
        self.idle.append(index)

    def worker_lost(self, index: int, batch: list[VideoSource] | None, exc: Exception) -> None:
        self.result.last_error = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if batch is None:
            # a ready() that failed: the actor is gone for good, unless Ray is still restarting it
            first = self.unavailable_since.setdefault(index, time.monotonic())
            if isinstance(exc, self.restarting_error) and time.monotonic() - first < RESTART_PATIENCE_S:
                time.sleep(0.5)
                self.in_flight[self.actors[index].ready.remote()] = (index, None)
            return
        self.result.workers_lost += 1
        if index in self.identity:
            self.lost.append(self.identity[index])
        self.result.cache.claims().release_held_by([s.video_id for s in batch], self.gone)
        self.retry(batch)
        # ready() waits for the restart; it fails for good once restarts are used up
        self.in_flight[self.actors[index].ready.remote()] = (index, None)

    def merge(self, part: ExtractSummary, batch: list[VideoSource]) -> None:
        """A worker's summary into the run's; a video it left to "another running process" whose claim
        is held by a lost worker (or one on a dead node) is released and handed out again."""
        total = self.result.summary
        total.records.extend(part.records)
        total.skipped.extend(part.skipped)
        if not part.claimed_elsewhere:
            return
        released = set(self.result.cache.claims().release_held_by(part.claimed_elsewhere, self.gone))
        sources = {s.video_id: s for s in batch}
        self.retry([sources[v] for v in part.claimed_elsewhere if v in released])
        total.claimed_elsewhere.extend(v for v in part.claimed_elsewhere if v not in released)

    def retry(self, videos: list[VideoSource]) -> None:
        """Hand out again the videos a lost worker held, except those it finished (counted as extracted
        when finished during this run) and those retried MAX_RETRIES times already (reported failed)."""
        again = []
        for source in videos:
            record = self.result.cache.read_record(source.video_id)
            if record is not None and record.status == DONE:
                finished_now = (record.finished_at or "") >= self.started
                if finished_now and all(r.video_id != source.video_id for r in self.result.summary.records):
                    self.result.summary.records.append(record)
                elif not finished_now:
                    self.result.summary.skipped.append(source.video_id)
                continue
            self.retries[source.video_id] = self.retries.get(source.video_id, 0) + 1
            if self.retries[source.video_id] > MAX_RETRIES:
                self.result.summary.records.append(VideoRecord(
                    video_id=source.video_id, path=str(source.path), status=FAILED,
                    error=f"its Ray worker was lost {self.retries[source.video_id]} times while extracting it "
                          f"(last: {self.result.last_error}); not recorded in the cache, a rerun tries it again"))
                continue
            if source.video_id not in self.result.retried:
                self.result.retried.append(source.video_id)
            again.append(source)
        self.result.videos_requeued += len(again)
        if again:
            self.queue.appendleft(again)

    @staticmethod
    def same_process(a: dict[str, Any], b: dict[str, Any]) -> bool:
        """A claim's holder or a ready() answer naming the same worker process (a restart has a new pid)."""
        return a.get("host") == b.get("host") and a.get("pid") == b.get("pid") and \
            a.get("ray_actor", b.get("ray_actor")) == b.get("ray_actor")

    def gone(self, holder: dict[str, Any]) -> bool:
        """True when a claim's holder is a worker this driver saw die, or any process of a dead Ray node."""
        if any(self.same_process(holder, dead) for dead in self.lost):
            return True
        node = holder.get("ray_node")
        return node is not None and any(n["NodeID"] == node and not n["Alive"] for n in self.ray.nodes())

    def stop(self) -> None:
        """Kill the actors; stopped early (Ctrl-C, an error), free what they held, or a claim naming
        another machine would keep a rerun from those videos. The manifest once, over every record."""
        for actor in self.actors:
            self.ray.kill(actor, no_restart=True)
        self.lost += list(self.identity.values())  # killed just now: each is gone
        for index, batch in self.in_flight.values():
            if batch is not None:
                self.result.cache.claims().release_held_by([s.video_id for s in batch], self.gone)
        if self.result.cache.root.is_dir():
            self.result.cache.write_manifest()
