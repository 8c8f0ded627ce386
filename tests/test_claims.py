"""Ownership files (manifests/claims.py): the staleness rule and the takeover races, played step by
step in one process by running the second process's steps inside the first one's (deterministic)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from manifests import claims as claims_module
from manifests import files as files_module
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


def written_by_a_dead_process(path) -> "Path":
    """The temporary file a process killed mid-write leaves beside `path` (that process has exited)."""
    code = ("import sys; from pathlib import Path; from manifests.files import temporary_path; "
            "tmp = temporary_path(Path(sys.argv[1])); tmp.write_text('half'); print(tmp)")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    return Path(out.stdout.strip())


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


def test_legacy_claim_without_process_start_is_judged_by_age(tmp_path):
    """A claim written before process_start was recorded cannot tell its live holder from a process that
    reused its pid: it goes by the heartbeat's age, as another host's claim does."""
    claims = Claims(tmp_path, stale_after=600)
    write_claim(claims, "legacy", host=claims.me["host"], pid=os.getppid())  # a live pid, no process_start
    assert not claims.acquire("legacy")  # refreshed recently: its holder may be working
    age(claims.path("legacy"), 601)
    assert claims.acquire("legacy")


def test_a_taker_paused_inside_its_takeover_cannot_remove_the_next_owner(tmp_path, monkeypatch):
    """Interleaving 3: A judges the claim stale inside its takeover, then pauses longer than
    TAKEOVER_STALE_S; B finds A's marker expired and takes the claim over completely. The old code let
    A, resuming, delete B's fresh claim and create its own: two owners."""
    a = Claims(tmp_path, stale_after=600)
    b = other_process(a)
    write_claim(a, "v", host="gone-container", pid=1)
    age(a.path("v"), 1000)
    judged = is_stale
    markers = lambda: list(tmp_path.glob("*.takeover"))  # noqa: E731
    played = []

    def a_pauses_after_judging(path, holder, stale_after=600):
        verdict = judged(path, holder, stale_after)
        if not played and markers():  # A is inside its takeover, its marker in place
            played.append(True)
            monkeypatch.setattr(claims_module, "is_stale", judged)
            for marker in markers():
                age(marker, claims_module.TAKEOVER_STALE_S + 1)  # the pause, without waiting for it
            assert b.acquire("v")
        return verdict

    monkeypatch.setattr(claims_module, "is_stale", a_pauses_after_judging)
    assert not a.acquire("v")
    assert played == [True]
    assert b.still_held("v") and not a.still_held("v")
    assert not markers() and not list(tmp_path.glob(".*"))  # nothing left over


def test_leftover_temporaries_and_orphan_claims_go_on_the_next_run(tmp_path, monkeypatch):
    """A claim killed while being written leaves its temporary file; a holder killed outright leaves its
    claim. Both go when the claims folder is next opened; a live writer's temporary file stays."""
    first = Claims(tmp_path, stale_after=600)
    killed = written_by_a_dead_process(first.path("v"))
    live = files_module.temporary_path(first.path("w"))
    live.write_text("mid-write")
    write_claim(first, "orphan", host=first.me["host"], pid=dead_pid())
    write_claim(first, "held", host=first.me["host"], pid=os.getpid(),
                process_start=claims_module.process_start_time(os.getpid()))
    dead_taker = first.path("x").with_name(first.path("x").name + ".old.takeover")
    dead_taker.write_text("")
    age(dead_taker, claims_module.TAKEOVER_STALE_S + 1)
    moved = dead_taker.with_name(dead_taker.name + ".0a1b2c3d4e5f.moved")  # it died after moving a claim aside
    moved.write_text("{}")
    age(moved, 1000)  # a moved claim keeps the old mtime of the claim
    Claims(tmp_path, stale_after=600)
    assert not killed.exists() and live.exists() and not dead_taker.exists()
    assert not first.path("orphan").exists() and first.path("held").exists()
    assert moved.exists()  # moved just now (a taker may be checking it): kept
    now = time.time()
    monkeypatch.setattr(claims_module.time, "time", lambda: now + claims_module.TAKEOVER_STALE_S + 1)
    Claims(tmp_path, stale_after=600)
    assert not moved.exists() and live.exists() and first.path("held").exists()
