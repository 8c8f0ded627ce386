"""Progress outside a terminal (a CI log, `demo.sh > log`): whole lines every few seconds and one at
the end, not a redraw per update.

Breaks tried: progress_bar returning tqdm whatever the stream fails the line count (the plan's 401
redraws and every tick land in the log as carriage-return updates); LogLines.display ignoring its
interval fails it too (hundreds of lines)."""

from __future__ import annotations

import io

import pytest
from tqdm import tqdm

import pipeline.extraction.progress
import pipeline.progress
from pipeline.extraction.progress import Progress
from pipeline.progress import LOG_INTERVAL, LogLines, progress_bar


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = Clock()
    monkeypatch.setattr(pipeline.progress.time, "monotonic", fake)
    return fake


class Log(io.StringIO):
    """A file that is not a terminal, read after Progress.close has closed its stream."""

    def close(self) -> None:
        pass


def test_extraction_progress_in_a_log_is_a_line_every_interval_and_one_at_the_end(monkeypatch, clock):
    log = Log()
    monkeypatch.setattr(pipeline.extraction.progress, "_terminal", lambda: log)
    progress = Progress(enabled=True)
    videos = [f"clip{i:03d}" for i in range(401)]
    for video in videos:  # the plan: one redraw per video in a terminal
        progress.expect(video, 1)
    for index, video in enumerate(videos):  # a second per segment, the backbone shown before each
        clock.now += 1
        progress.show(now="rgb")
        progress.tick([(video, 1)])
        progress.settle(video, done=True)
        progress.count_videos(index + 1, len(videos), 0)
    progress.close()
    text = log.getvalue()
    assert "\r" not in text and text.endswith("\n")
    lines = text.splitlines()
    assert len(lines) == int(401 // LOG_INTERVAL) + 1  # every 10 s of the 401, and the last state
    assert "401/401" in lines[-1] and "videos=401/401" in lines[-1]


def test_a_short_stage_in_a_log_is_one_line_and_a_terminal_keeps_tqdm(clock):
    log = io.StringIO()
    with progress_bar(total=3, desc="runs", file=log) as bar:
        for _ in range(3):
            bar.update(1)
            bar.refresh()
    assert isinstance(bar, LogLines) and log.getvalue().count("\n") == 1 and "3/3" in log.getvalue()
    quiet = io.StringIO()
    with progress_bar(total=3, file=quiet, leave=False) as bar:
        bar.update(3)
    assert quiet.getvalue() == ""  # leave=False: nothing stays behind

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    bar = progress_bar(total=3, file=Terminal())
    assert type(bar) is tqdm
    bar.close()
