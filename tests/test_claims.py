"""Ownership files (manifests/claims.py): the staleness rule and the takeover races, played step by
step in one process by running the second process's steps inside the first one's (deterministic)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from manifests import claims as claims_module
from manifests.claims import Claims, RunLock, is_stale, read_holder


def other_process(claims: Claims, host: str | None = None) -> Claims:
    """A second Claims on the same folder standing for another process (its own token)."""
    other = Claims(claims.folder, claims.stale_after)
    other.me = {**claims_module.this_process(), **({"host": host} if host else {})}
    return other


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def age(path, seconds: float) -> None:
    past = time.time() - seconds
    os.utime(path, (past, past))


def write_claim(claims: Claims, video_id: str, **holder) -> None:
    claims.path(video_id).write_text(json.dumps({"video_id": video_id, "token": "old", **holder}))


def test_staleness_rule(tmp_path):
    claims = Claims(tmp_path, stale_after=600)
    host = claims.me["host"]
    write_claim(claims, "dead", host=host, pid=dead_pid())
    assert claims.acquire("dead")  # this host, pid gone
    write_claim(claims, "reused", host=host, pid=os.getpid(), process_start="1")
    assert claims.acquire("reused")  # the pid runs, but started at another time: reused
    write_claim(claims, "live", host=host, pid=os.getppid(), process_start=claims_module.process_start_time(os.getppid()))
    age(claims.path("live"), 10_000)
    assert not claims.acquire("live")  # a live process of this host is never taken over, however old
    write_claim(claims, "namespace", host=host, pid=dead_pid(), pid_namespace=1)
    assert not claims.acquire("namespace")  # same host name, another container's pids: the age rule
    write_claim(claims, "elsewhere", host="another-container", pid=1)
    assert not claims.acquire("elsewhere")  # another host, heartbeat fresh: respected
    age(claims.path("elsewhere"), 601)
    assert claims.acquire("elsewhere")  # silent longer than stale_after: the holder is gone
    claims.path("garbage").write_text("{not json")
    assert not claims.acquire("garbage")  # unreadable but recent: its writer may be mid-step
    age(claims.path("garbage"), 601)
    assert claims.acquire("garbage")
    assert {read_holder(claims.path(v))["token"] for v in claims.held} == {claims.me["token"]}


def test_heartbeat_keeps_a_claim_fresh(tmp_path):
    claims = Claims(tmp_path, stale_after=600)
    assert claims.acquire("v")
    age(claims.path("v"), 1000)
    with claims.heartbeat(interval=0.05):
        time.sleep(0.3)
    assert time.time() - claims.path("v").stat().st_mtime < 10
    other = other_process(claims, host="another-container")
    assert not other.acquire("v")


def test_two_takers_of_one_stale_claim_one_owner(tmp_path, monkeypatch):
    """Interleaving 1: A and B both judge the same claim stale; B's whole takeover runs between A's
    judgement and A's removal. The old code removed B's fresh claim and both worked on the video."""
    a = Claims(tmp_path, stale_after=600)
    b = other_process(a)
    write_claim(a, "v", host="gone-container", pid=1)
    age(a.path("v"), 1000)
    judged = is_stale
    played = []

    def a_judges_then_b_runs(path, holder, stale_after=600):
        verdict = judged(path, holder, stale_after)
        if not played and holder and holder.get("token") == "old":
            played.append(True)
            monkeypatch.setattr(claims_module, "is_stale", judged)
            assert b.acquire("v")  # B takes the stale claim over completely, right now
            monkeypatch.setattr(claims_module, "is_stale", a_judges_then_b_runs)
        return verdict

    monkeypatch.setattr(claims_module, "is_stale", a_judges_then_b_runs)
    assert played == [] and not a.acquire("v")
    assert played == [True]
    assert b.still_held("v") and not a.still_held("v")


def test_claim_read_before_it_is_written_is_not_stale(tmp_path, monkeypatch):
    """Interleaving 2: B looks at the claim while A is between creating it and writing it. The old
    code created an empty file first, which B read as 'its writer died' and took over. Claims are
    now complete when they appear: B, running at A's worst moment, either finds no claim (and owns
    the video, A's link then fails) or A's complete claim."""
    a = Claims(tmp_path, stale_after=600)
    b = other_process(a)
    real_link = os.link

    def link_after_b(source, target):
        monkeypatch.setattr(claims_module.os, "link", real_link)
        assert b.acquire("v")  # A has written its temporary file, not yet linked it
        return real_link(source, target)

    monkeypatch.setattr(claims_module.os, "link", link_after_b)
    assert not a.acquire("v")
    assert b.still_held("v") and not a.still_held("v")
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())
    # and B, looking while A's claim exists, sees it whole and live
    b.release("v")
    assert a.acquire("v")
    assert not b.acquire("v")
    assert read_holder(a.path("v"))["token"] == a.me["token"]


def test_takeover_marker_of_a_dead_taker_expires(tmp_path):
    a = Claims(tmp_path, stale_after=600)
    write_claim(a, "v", host="gone-container", pid=1)
    age(a.path("v"), 1000)
    marker = a.path("v").with_name(a.path("v").name + ".old.takeover")
    marker.write_text("")
    assert not a.acquire("v")  # another taker is mid-takeover
    age(marker, claims_module.TAKEOVER_STALE_S + 1)
    assert a.acquire("v")  # it died between two steps: its marker expires


def test_release_held_by_removes_only_the_claims_of_a_process_known_gone(tmp_path):
    a = Claims(tmp_path)
    write_claim(a, "x", host="node2", pid=42)
    write_claim(a, "y", host="node2", pid=43)
    live = {"host": a.me["host"], "pid": os.getppid(), "process_start": claims_module.process_start_time(os.getppid())}
    write_claim(a, "z", **live)  # a live process of this host: an orphaned Ray actor, say
    gone = lambda holder: holder.get("pid") in (42, os.getppid())  # noqa: E731
    assert a.release_held_by(["x", "y", "z", "absent"], gone) == ["x", "z"]
    assert not a.path("x").exists() and a.path("y").exists() and not a.path("z").exists()
    assert not a.acquire("y") and a.acquire("z")


def test_run_lock(tmp_path):
    first, second = RunLock(tmp_path, "pipeline train"), RunLock(tmp_path, "pipeline train --resume")
    assert first.acquire() is None
    holder = second.acquire()
    assert holder["pid"] == os.getpid() and holder["command"] == "pipeline train"
    first.release()
    assert not first.path.exists()
    assert second.acquire() is None
    second.release()
    first.path.write_text(json.dumps({"host": first.me["host"], "pid": dead_pid(), "token": "t"}))
    assert first.acquire() is None  # the holder died (kill -9): provably stale, taken over
    first.release()
