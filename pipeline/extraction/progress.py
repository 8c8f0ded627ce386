"""The progress bar of extraction, in segments.

Its total is planned from container metadata before the first decode, corrected when a video is
opened, and a video that fails or is skipped takes its uncounted segments out of it. The bar writes
to its own copy of the terminal, untouched while decoder messages are caught, and is redrawn every
second so its clock moves while one long backbone call runs (outside a terminal: pipeline.progress).
"""

from __future__ import annotations

import os
import sys
import threading

from extractors.config import ExtractionConfig
from extractors.decode import count_segments
from pipeline.progress import progress_bar
from pipeline.videos import VideoSource


class Progress:
    def __init__(self, enabled: bool) -> None:
        self.terminal = _terminal() if enabled else None
        self.bar = progress_bar(total=0, unit="seg", dynamic_ncols=True, disable=not enabled, desc="extract",
                                file=self.terminal)
        self.expected: dict[str, int] = {}  # video id -> its segments in the bar's total
        self.ticked: dict[str, int] = {}  # video id -> its segments counted as done
        self.postfix: dict[str, object] = {}
        self.stop = threading.Event()
        self.redraw = threading.Thread(target=self._redraw, daemon=True, name="progress-redraw")

    def plan(self, todo: list[VideoSource], config: ExtractionConfig) -> None:
        """The bar's total: every video's segments from its container's metadata, before any decoding."""
        if self.bar.disable:
            return
        self.bar.set_description("plan")
        for source in todo:
            self.expect(source.video_id, count_segments(source.path, config))
        self.bar.set_description("extract")

    def start(self) -> None:
        if not self.bar.disable:
            self.redraw.start()

    def _redraw(self) -> None:
        """Every second: a full-size Video Swin segment takes seconds on a CPU."""
        while not self.stop.wait(1.0):
            self.bar.refresh()

    def expect(self, video_id: str, segments: int) -> None:
        self.bar.total += segments - self.expected.get(video_id, 0)
        self.expected[video_id] = segments
        self.bar.refresh()

    def tick(self, counts: list[tuple[str, int]]) -> None:
        """Segments embedded: (video id, how many) per part of a batch."""
        for video_id, count in counts:
            self.ticked[video_id] = self.ticked.get(video_id, 0) + count
        self.bar.update(sum(count for _, count in counts))

    def settle(self, video_id: str, done: bool) -> None:
        """A video is over: its segments not yet counted are counted (done) or leave the total (failed, skipped)."""
        left = self.expected.get(video_id, 0) - self.ticked.get(video_id, 0)
        if left > 0 and done:
            self.bar.update(left)
        elif left > 0:
            self.bar.total -= left
            self.bar.refresh()
        self.ticked[video_id] = self.expected.get(video_id, 0)

    def show(self, **fields) -> None:
        """Fields after the bar (the backbone running now), redrawn at once."""
        self.postfix.update(fields)
        self.bar.set_postfix(self.postfix, refresh=True)

    def count_videos(self, finished: int, total: int, failed: int) -> None:
        self.postfix.update(videos=f"{finished}/{total}", failed=failed)
        self.bar.set_postfix(self.postfix, refresh=False)

    def close(self) -> None:
        self.stop.set()
        if self.redraw.is_alive():
            self.redraw.join()
        self.bar.close()
        if self.terminal not in (None, sys.stderr):
            self.terminal.close()


def _terminal():
    """A stream on a copy of file descriptor 2, so the bar stays visible while decoder messages are caught
    (extractors.decode.decoder_messages); sys.stderr itself when it is not the process's descriptor 2."""
    try:
        if sys.stderr.fileno() == 2:
            return os.fdopen(os.dup(2), "w", buffering=1)
    except (AttributeError, OSError, ValueError):
        pass
    return sys.stderr
