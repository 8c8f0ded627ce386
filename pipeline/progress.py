"""Progress bars that suit where they are written.

In a terminal a tqdm bar redraws itself in place. Written to a file or a pipe (a CI log, `demo.sh > log`)
every redraw would stay behind as text, hundreds of them for one stage, so there the bar writes a whole
line at most every LOG_INTERVAL seconds, and its last state when it closes.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from tqdm import tqdm

LOG_INTERVAL = 10.0  # seconds between two lines of one bar outside a terminal


def is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, OSError, ValueError):  # no isatty, or a closed stream
        return False


def progress_bar(*, file: TextIO | None = None, interval: float = LOG_INTERVAL, **options: Any) -> tqdm:
    """tqdm(**options) on `file` (default stderr): a redrawn bar in a terminal, lines in a log."""
    stream = sys.stderr if file is None else file
    if is_terminal(stream):
        return tqdm(file=stream, **options)
    return LogLines(file=stream, interval=interval, **options)


class LogLines(tqdm):
    """A tqdm bar that writes whole lines, at most one every `interval` seconds, and one at close
    unless leave=False. Every tqdm call works as usual; only what reaches the stream changes."""

    def __init__(self, *args: Any, interval: float = LOG_INTERVAL, **options: Any) -> None:
        # set before tqdm's __init__, which draws the bar once
        self._interval, self._last_line, self._closing = interval, time.monotonic(), False
        super().__init__(*args, **options)

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        if msg is not None:  # tqdm clearing its line: a log keeps what it has
            return False
        now = time.monotonic()
        if not self._closing and now - self._last_line < self._interval:
            return False
        self._last_line = now
        self.fp.write(self.__str__() + "\n")
        self.fp.flush()
        return True

    def close(self) -> None:
        if not self.disable and self.leave is not False and hasattr(self, "last_print_t"):
            with self._lock:
                self._ema_dt = lambda: None  # the overall rate in the last line, as tqdm's own close does
                self._closing = True
                self.display()
            self.leave = False  # tqdm's close would add an empty line after the last one
        super().close()
