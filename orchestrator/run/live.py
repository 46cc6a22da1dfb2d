"""The live view of a running sweep: one line with the stage, trials done / running /
failed, the best point so far on ID validation, and the ETA.

On a terminal the line is redrawn in place (other output is printed above it); in a
log it is a plain line now and then, and at the end of each stage.
"""
from __future__ import annotations

import shutil
import sys
import time
from typing import Callable, TextIO

from trainers.progress import duration_text


class LiveView:
    def __init__(self, stream: TextIO | None = None, every_s: float = 15.0,
                 clock: Callable[[], float] = time.monotonic):
        self.stream = stream or sys.stdout
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every_s, self.clock = every_s, clock
        self.stage: str | None = None
        self.total = self.done = self.running = self.failed = 0
        self.best: tuple[float, str] | None = None        # (ID val accuracy, point)
        self._started = self._last = 0.0
        self._shown = False
        self._printed: tuple | None = None      # what the last plain line said

    # -- what happens ------------------------------------------------------------------
    def start(self, stage: str, total: int) -> None:
        self.stage, self.total = stage, total
        self.done = self.running = self.failed = 0
        self._started = self.clock()
        self._last = 0.0
        self._draw(force=True)

    def trial_started(self) -> None:
        self.running += 1
        self._draw()

    def trial_ended(self, ok: bool) -> None:
        self.running = max(0, self.running - 1)
        if ok:
            self.done += 1
        else:
            self.failed += 1
        self._draw(force=self.done + self.failed >= self.total)

    def point(self, val_acc: float, label: str) -> None:
        """A point evaluated: the best on ID validation so far is shown."""
        if self.best is None or val_acc > self.best[0]:
            self.best = (val_acc, label)

    def finish(self) -> None:
        if self.stage is None:
            return
        if self.tty or self._printed != self._state():    # a log gets no repeated last line
            self._draw(force=True)
        if self.tty and self._shown:
            self.stream.write("\n")
            self.stream.flush()
        self.stage, self._shown = None, False

    def echo(self, line: str) -> None:
        """Print a line of other output without tearing the live line."""
        if self.tty and self._shown:
            self.stream.write("\r\x1b[2K")
        print(line, file=self.stream, flush=True)
        if self.tty and self._shown:
            self._draw(force=True)

    # -- drawing -------------------------------------------------------------------------
    def line(self) -> str:
        elapsed = self.clock() - self._started
        finished = self.done + self.failed
        eta = (elapsed / finished * (self.total - finished)) if finished else None
        best = (f"best on ID val: {self.best[1]} ({100 * self.best[0]:.1f})"
                if self.best else "best on ID val: none yet")
        return (f"[{self.stage}] {self.done}/{self.total} done · {self.running} running · "
                f"{self.failed} failed · {best} · elapsed {duration_text(elapsed)}"
                + (f" · ETA {duration_text(eta)}" if eta is not None and finished < self.total else ""))

    def _state(self) -> tuple:
        return (self.stage, self.done, self.running, self.failed, self.best)

    def _draw(self, force: bool = False) -> None:
        if self.stage is None:
            return
        now = self.clock()
        if self.tty:
            width = shutil.get_terminal_size((120, 20)).columns
            self.stream.write("\r\x1b[2K" + self.line()[:width - 1])
            self.stream.flush()
            self._shown = True
        elif force or now - self._last >= self.every_s:
            print(self.line(), file=self.stream, flush=True)
            self._last, self._printed = now, self._state()
