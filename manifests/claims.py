"""Ownership files: one process at a time works on a video (claims) or writes a run folder (lock).

An ownership file is JSON naming its holder: host, pid, the process's start time (so a reused pid is
not mistaken for the holder), a random token (so a holder can tell its own file from a successor's)
and when it was taken. It is created complete and atomically (written to a temporary file, then
hard-linked to its name, which fails if the name exists), so nobody ever reads a half-written one.

The staleness rule (when a file may be taken over):
- on the holder's own host (and pid namespace): the pid is not running, or it runs but started at
  another time (reused); a file that records no start time (written before it was recorded) cannot
  tell its live holder from a reused pid, so it goes by the age rule below;
- on any host: the holder refreshes the file's modification time every HEARTBEAT_S seconds while it
  works (a background thread); a file not refreshed for `stale_after` seconds (STALE_AFTER_S, 10
  minutes, by default) belongs to a process that is gone or hung: a killed container, a lost node;
- a file that cannot be read as JSON is stale once it is that old as well.
A file held by a live process of this host is never taken over, however old.

Taking over is a compare-and-swap: the taker first creates `<file>.<token>.takeover` exclusively
for the stale holder's token (so two takers of one stale file cannot both win), re-reads the file to
check the stale holder still holds it, then removes it by renaming it to a name of its own and reading
what it moved: a taker paused so long that its marker expired (TAKEOVER_STALE_S) may by then have
moved the next owner's file, which it puts back. Only then does it create its own, again exclusively.
No interleaving of these steps gives a file two owners (tests/test_claims.py plays them).

Opening a claims folder (`Claims`) clears what killed processes left in it: stale claims (taken over
as above, so a live claim is never removed) and the temporary files of claims being written when
their writer died (manifests.files.remove_abandoned_temporary_files).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable

from manifests.files import pid_namespace, remove_abandoned_temporary_files, temporary_path

HEARTBEAT_S = 60.0
STALE_AFTER_S = 600.0
TAKEOVER_STALE_S = 60.0  # a takeover marker older than this was left by a taker that died mid-step


def process_start_time(pid: int) -> str | None:
    """The kernel's start time of `pid` (clock ticks since boot, from /proc), None where unavailable."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22 of proc(5), counted after the command name


def ray_identity() -> dict[str, str]:
    """{"ray_node", "ray_actor"} when this process is a Ray actor, else {}: the Ray driver that saw the
    actor or its node die knows from them, at once, that the actor's claims are stale, even while its
    process still runs, orphaned by a killed raylet, or names a host whose claims go stale only later."""
    ray = sys.modules.get("ray")  # never imported here: only a process that runs Ray has it
    if ray is None or not ray.is_initialized():
        return {}
    context = ray.get_runtime_context()
    actor = context.get_actor_id()
    return {} if actor is None else {"ray_node": context.get_node_id(), "ray_actor": actor}


def this_process() -> dict[str, Any]:
    """Who the current process is, as an ownership file records it (a new token per call)."""
    return {
        "host": socket.gethostname(),
        "pid_namespace": pid_namespace(),
        "pid": os.getpid(),
        "process_start": process_start_time(os.getpid()),
        "token": uuid.uuid4().hex,
        "since": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **ray_identity(),
    }


def describe_holder(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "an unknown process (unreadable ownership file)"
    return f"pid {holder.get('pid')} on host {holder.get('host')} (since {holder.get('since')})"


def read_holder(path: Path) -> dict[str, Any] | None:
    """The holder recorded in `path`; None when the file is gone or unreadable."""
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def is_stale(path: Path, holder: dict[str, Any] | None, stale_after: float = STALE_AFTER_S) -> bool:
    """True when the holder of `path` is provably gone (see the module docstring for the rule)."""
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return True
    same_namespace = holder is not None and holder.get("pid_namespace") in (None, pid_namespace())
    if holder is not None and holder.get("host") == socket.gethostname() and same_namespace:
        try:
            pid = int(holder["pid"])
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except (KeyError, TypeError, ValueError):
            return age > stale_after
        except PermissionError:
            pass  # runs, under another user
        recorded, current = holder.get("process_start"), process_start_time(pid)
        if recorded is None:
            return age > stale_after  # written before start times were recorded: a reused pid looks alive
        if current is not None and recorded != current:
            return True  # the pid was reused by another process
        return False  # a live process of this host: never taken over
    return age > stale_after


def _create(path: Path, holder: dict[str, Any]) -> bool:
    """Create `path` holding `holder`, complete, only if it does not exist."""
    tmp = temporary_path(path)
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(holder, handle)
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


def _take_over(path: Path, stale: dict[str, Any] | None, stale_after: float, known_gone: bool = False) -> bool:
    """Remove the stale file `path` if it still holds `stale`; True when removed (by us).
    known_gone: the caller knows the holder is gone (Claims.release_held_by): no staleness check."""
    token = stale.get("token", "none") if stale else "unreadable"
    marker = path.with_name(f"{path.name}.{token}.takeover")
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
    except FileExistsError:
        try:
            if time.time() - marker.stat().st_mtime > TAKEOVER_STALE_S:
                marker.unlink(missing_ok=True)  # its taker died between two steps; the next try may proceed
        except FileNotFoundError:
            pass
        return False
    os.close(fd)
    try:
        now = read_holder(path)
        same = (now == stale) if stale is not None else (now is None and path.exists())
        if not same or not (known_gone or is_stale(path, now, stale_after)):
            return False  # someone else took it over (or released it) since we looked
        return _remove_if_still(path, stale, marker)
    finally:
        marker.unlink(missing_ok=True)


def _remove_if_still(path: Path, stale: dict[str, Any] | None, marker: Path) -> bool:
    """Remove `path` if it still holds `stale` (None: unreadable); True when removed. A rename moves the
    file aside atomically, so what is checked is exactly what was removed: had we paused past
    TAKEOVER_STALE_S since judging it, it may be the next owner's, and goes back in place."""
    moved = marker.with_name(f"{marker.name}.{uuid.uuid4().hex[:12]}.moved")
    try:
        os.rename(path, moved)
    except FileNotFoundError:
        return False  # released or taken over meanwhile
    if read_holder(moved) == stale:
        moved.unlink(missing_ok=True)
        return True
    try:
        os.link(moved, path)  # a successor's file: put back (unless another file took the name since)
    except FileExistsError:
        pass  # its owner sees the loss by token (`holds`) before it writes anything
    except FileNotFoundError:
        pass  # a sweep removed it as a dead taker's leftover (see Claims.remove_leftovers)
    moved.unlink(missing_ok=True)
    return False


def acquire_file(path: Path, holder: dict[str, Any], stale_after: float = STALE_AFTER_S) -> dict[str, Any] | None:
    """Make `path` ours; None on success, else the current holder (None-safe dict, {} if unreadable)."""
    for _ in range(3):
        if _create(path, holder):
            return None
        current = read_holder(path)
        if current is None and not path.exists():
            continue  # released meanwhile: try again
        if not is_stale(path, current, stale_after):
            return current or {}
        _take_over(path, current, stale_after)
    current = read_holder(path)
    return current or {}


def live_holder(path: Path, stale_after: float = STALE_AFTER_S) -> dict[str, Any] | None:
    """The holder of `path` while it may not be taken over ({} if unreadable but recent); None when the
    file is gone or stale (its holder is provably gone)."""
    holder = read_holder(path)
    if holder is None and not path.exists():
        return None
    return None if is_stale(path, holder, stale_after) else (holder or {})


def holds(path: Path, holder: dict[str, Any]) -> bool:
    """True when `path` still names `holder` (by token)."""
    current = read_holder(path)
    return current is not None and current.get("token") == holder["token"]


class Heartbeat:
    """A daemon thread refreshing the modification time of the files `paths()` returns."""

    def __init__(self, paths, interval: float = HEARTBEAT_S) -> None:
        self.paths, self.interval = paths, interval
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name="ownership-heartbeat")

    def __enter__(self) -> "Heartbeat":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop_event.set()
        self.thread.join(timeout=5)

    def _run(self) -> None:
        while not self.stop_event.wait(self.interval):
            for path in list(self.paths()):
                try:
                    os.utime(path)
                except OSError:
                    pass  # released meanwhile


class Claims:
    """Claim files `<folder>/<sha1(video_id)[:20]>.claim`: one process works on a video at a time."""

    def __init__(self, folder: Path, stale_after: float = STALE_AFTER_S) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.stale_after = stale_after
        self.me = this_process()
        self.held: dict[str, Path] = {}
        self.remove_leftovers()

    def remove_leftovers(self) -> None:
        """Clear what killed processes left here: temporary files of claims being written, and stale
        claims (of videos nobody may try again: renamed, deleted). Live claims stay."""
        remove_abandoned_temporary_files(self.folder, self.stale_after)
        for path in self.folder.glob("*.takeover*"):  # markers, and claims moved aside, of takers that died
            try:
                info = path.stat()
                # a claim moved aside keeps its old mtime: its ctime says when it was moved
                since = info.st_ctime if path.name.endswith(".moved") else info.st_mtime
                if time.time() - since > TAKEOVER_STALE_S:
                    path.unlink()
            except OSError:
                pass
        for path in self.folder.glob("*.claim"):
            holder = read_holder(path)
            if is_stale(path, holder, self.stale_after):
                _take_over(path, holder, self.stale_after)

    @staticmethod
    def file_name(video_id: str) -> str:
        return hashlib.sha1(video_id.encode()).hexdigest()[:20] + ".claim"

    def path(self, video_id: str) -> Path:
        return self.folder / self.file_name(video_id)

    def holder(self, video_id: str) -> dict[str, Any] | None:
        return read_holder(self.path(video_id))

    def acquire(self, video_id: str) -> bool:
        """True when this process now owns `video_id`; False when a live process does."""
        path = self.path(video_id)
        if acquire_file(path, {**self.me, "video_id": video_id}, self.stale_after) is not None:
            return False
        self.held[video_id] = path
        return True

    def live_holder(self, video_id: str) -> dict[str, Any] | None:
        """The live process holding `video_id`'s claim (see `live_holder`), None when nobody does."""
        return live_holder(self.path(video_id), self.stale_after)

    def still_held(self, video_id: str) -> bool:
        """True while our claim is in place (it is lost only if we were silent longer than stale_after)."""
        return video_id in self.held and holds(self.held[video_id], self.me)

    def release(self, video_id: str) -> None:
        path = self.held.pop(video_id, None)
        if path is not None and holds(path, self.me):
            path.unlink(missing_ok=True)

    def release_all(self) -> None:
        for video_id in list(self.held):
            self.release(video_id)

    def release_held_by(self, video_ids: Iterable[str], gone: Callable[[dict[str, Any]], bool]) -> list[str]:
        """Remove the claims on these videos whose holder `gone` says is dead to us (a Ray actor that died
        or whose node was lost), however alive it looks: its pid may still run, orphaned by a killed
        raylet, or be on a host whose claims go stale only after stale_after. Each removal is the
        compare-and-swap of a takeover. Returns the ids released."""
        released = []
        for video_id in video_ids:
            path = self.path(video_id)
            current = read_holder(path)
            if current is not None and gone(current) and _take_over(path, current, self.stale_after, known_gone=True):
                released.append(video_id)
        return released

    def heartbeat(self, interval: float = HEARTBEAT_S) -> Heartbeat:
        return Heartbeat(lambda: list(self.held.values()), interval)


class RunLock:
    """`RUN/.lock`: the single writer of a run folder. Taken over only when provably stale."""

    NAME = ".lock"

    def __init__(self, folder: Path, command: str, stale_after: float = STALE_AFTER_S) -> None:
        self.path = Path(folder) / self.NAME
        self.me = {**this_process(), "command": command}
        self.stale_after = stale_after
        self._heartbeat: Heartbeat | None = None

    def acquire(self) -> dict[str, Any] | None:
        """None when acquired (and the heartbeat started); else the holder."""
        holder = acquire_file(self.path, self.me, self.stale_after)
        if holder is None:
            self._heartbeat = Heartbeat(lambda: [self.path]).__enter__()
        return holder

    def release(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.__exit__()
            self._heartbeat = None
        if holds(self.path, self.me):
            self.path.unlink(missing_ok=True)
