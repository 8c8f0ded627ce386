"""A Ray worker node lost in the middle of `extract --ray` (issue #26, point 1): a cluster of a 0-CPU
head and two 1-CPU worker nodes (ray.cluster_utils.Cluster, all on this machine); the raylet of the node
whose actor holds a video's claim is killed with SIGKILL, then, a moment later, the actor itself (first
orphaned, as a lost node's processes are), or the actor is left running, orphaned. Every video must end done exactly once, the summary must say
which video was retried after the lost worker, and no claim may be left behind."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from manifests.cache import DONE, FeatureCache
from manifests.claims import Claims
from pipeline.extraction.on_ray import extract_on_ray
from pipeline.samples import ClipSpec, write_clip
from pipeline.videos import discover_videos
from tests.conftest import tiny_config

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402


@pytest.fixture
def cluster():
    # a node silent for 1 s is declared dead (Ray's default waits about half a minute)
    fast_death = {"health_check_period_ms": 250, "health_check_timeout_ms": 250, "health_check_failure_threshold": 4}
    cluster = Cluster(initialize_head=True, head_node_args=dict(num_cpus=0, include_dashboard=False,
                                                                 object_store_memory=100 * 2**20,
                                                                 _system_config=fast_death))
    workers = [cluster.add_node(num_cpus=1, object_store_memory=80 * 2**20) for _ in range(2)]
    ray.init(address=cluster.address, logging_level="ERROR")
    cluster.wait_for_nodes()
    yield cluster, workers
    ray.shutdown()
    cluster.shutdown()


def parent_pid(pid: int) -> int:
    return int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])


def kill_the_node_holding_a_claim(cache_root, workers, video_id_prefix: str, kill_actor: bool, killed: list) -> None:
    """Wait for a claim on the long clip, then SIGKILL its node's raylet and, 1 s later, its actor
    (or leave the actor running, orphaned)."""
    claims = cache_root / "claims"
    deadline = time.time() + 90
    while time.time() < deadline:
        for path in claims.glob("*.claim") if claims.is_dir() else []:
            try:
                holder = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if not holder.get("video_id", "").startswith(video_id_prefix):
                continue
            raylet = parent_pid(holder["pid"])  # a worker is its raylet's child
            assert raylet in [w.all_processes["raylet"][0].process.pid for w in workers]
            os.kill(raylet, signal.SIGKILL)
            if kill_actor:
                time.sleep(1.0)
                try:
                    os.kill(holder["pid"], signal.SIGKILL)
                except ProcessLookupError:
                    pass  # the actor went with its raylet
            killed.append(holder)
            return
        time.sleep(0.05)


@pytest.mark.parametrize("kill_actor", [True, False], ids=["actor-killed", "actor-orphaned"])
def test_a_lost_worker_node_loses_no_video(cluster, tmp_path, kill_actor):
    cluster, workers = cluster
    videos = tmp_path / "videos"
    write_clip(ClipSpec("long", 0.5, seconds=8.0, with_audio=False, seed=1), videos / "long.mp4")
    for index in range(3):
        write_clip(ClipSpec(f"short{index}", 0.5, seconds=1.0, with_audio=False, seed=2 + index),
                   videos / f"short{index}.mp4")
    config = tiny_config(modalities=("rgb",), backbones={"rgb": "vst"})
    out = tmp_path / "out"
    killed: list = []
    killer = threading.Thread(target=kill_the_node_holding_a_claim,
                              args=(out / config.config_hash(), workers, "long", kill_actor, killed), daemon=True)
    killer.start()
    result = extract_on_ray(discover_videos(videos), out, config, workers=2, videos_per_task=1, progress=False)
    killer.join()
    assert killed, "the long clip's claim was never seen: nothing was killed"
    cache = FeatureCache(out / config.config_hash())
    records = {r.video_id: r for r in cache.records()}
    assert {v: r.status for v, r in records.items()} == {v: DONE for v in ["long", "short0", "short1", "short2"]}
    summary = result.summary
    assert not summary.claimed_elsewhere and not summary.failed and not result.unfinished
    # each video once in the summary: extracted by this run, the long one after its worker was lost
    assert sorted([r.video_id for r in summary.records] + summary.skipped) == ["long", "short0", "short1", "short2"]
    if kill_actor:
        assert result.workers_lost >= 1 and "long" in result.retried
    # orphaned, the actor may finish its task before Ray declares it lost: then nothing is retried
    assert result.retried == [] or "long" in result.retried
    assert not list((cache.root / "claims").glob("*.claim"))
    assert cache.load_features("long")["rgb"].shape == (records["long"].num_segments, cache.feature_dims["rgb"])
    if not kill_actor:
        return

    # a claim of the lost node naming another host (fresh: by the heartbeat rule alone, live for 10 more
    # minutes) is stale at once: its node is dead, so the video is retried, not left to it
    deadline = time.time() + 30
    while any(n["NodeID"] == killed[0]["ray_node"] and n["Alive"] for n in ray.nodes()) and time.time() < deadline:
        time.sleep(0.2)
    late = write_clip(ClipSpec("late", 0.5, seconds=1.0, with_audio=False, seed=9), tmp_path / "more" / "late.mp4")
    (cache.root / "claims" / Claims.file_name("late")).write_text(json.dumps(
        {"host": "another-host", "pid": 1, "token": "t", "video_id": "late", "ray_node": killed[0]["ray_node"],
         "ray_actor": killed[0]["ray_actor"]}))
    again = extract_on_ray(discover_videos(late.parent), out, config, workers=1, progress=False)
    assert [r.video_id for r in again.summary.records] == ["late"] and not again.summary.claimed_elsewhere
    assert again.retried == ["late"] and cache.read_record("late").status == DONE
    assert not list((cache.root / "claims").glob("*.claim"))


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if parent_pid(int(stat.parent.name)) == pid:
                found.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            pass
    return found


def test_every_worker_node_lost_ends_with_the_videos_unfinished(cluster, tmp_path, monkeypatch):
    """Nowhere left to restart the actors on: the driver stops waiting and lists what is left, rather
    than waiting for ever or calling a dead worker's video "left to another running process"."""
    from pipeline.extraction import on_ray

    cluster, workers = cluster
    monkeypatch.setattr(on_ray, "RESTART_PATIENCE_S", 5.0)
    videos = tmp_path / "videos"
    write_clip(ClipSpec("long", 0.5, seconds=8.0, with_audio=False, seed=1), videos / "long.mp4")
    write_clip(ClipSpec("short", 0.5, seconds=1.0, with_audio=False, seed=2), videos / "short.mp4")
    config = tiny_config(modalities=("rgb",), backbones={"rgb": "vst"})
    out = tmp_path / "out"
    claims = out / config.config_hash() / "claims"

    def kill_every_node():
        deadline = time.time() + 90
        while time.time() < deadline and not list(claims.glob("*.claim") if claims.is_dir() else []):
            time.sleep(0.05)
        for node in workers:
            raylet = node.all_processes["raylet"][0].process.pid
            orphans = children(raylet)
            os.kill(raylet, signal.SIGKILL)
            for pid in orphans:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    killer = threading.Thread(target=kill_every_node, daemon=True)
    killer.start()
    result = extract_on_ray(discover_videos(videos), out, config, workers=2, videos_per_task=1, progress=False)
    killer.join()
    cache = FeatureCache(out / config.config_hash())
    done = [r.video_id for r in cache.records() if r.status == DONE]
    assert result.workers_lost >= 1 and not result.summary.claimed_elsewhere
    assert sorted(done + result.unfinished) == ["long", "short"] and result.unfinished
    assert not list(claims.glob("*.claim"))
