"""Progress with an ETA: tqdm on a terminal, a plain line now and then otherwise.

Logs (CI, Ray workers, files) get a line every `every_s` seconds instead of a bar
full of carriage returns.
"""
from __future__ import annotations

import sys
import time

from tqdm import tqdm


def duration_text(seconds: float) -> str:
    """`42s`, `3m05s`, `2h07m`."""
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    minutes, sec = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{sec:02d}s" if minutes else f"{sec}s"


def progress_callback(desc: str, enabled: bool = True):
    """A `callback(done, total)` for builders that report chunks (the toy world's renderer):
    the bar appears on the first report, and not at all when the first report is already
    complete (the result came from a cache)."""
    state: dict[str, Progress] = {}

    def report(done: int, total: int) -> None:
        if "bar" not in state:
            if done >= total or not enabled:
                return
            state["bar"] = Progress(total, desc)
        state["bar"].update(done - state["bar"].done)
    return report


class Progress:
    """`with Progress(total, "pretraining toy CLIP") as bar: bar.update(n, loss=...)`."""

    def __init__(self, total: int, desc: str, every_s: float = 15.0, stream=None,
                 enabled: bool = True):
        self.total, self.desc, self.every_s = max(int(total), 1), desc, every_s
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.done = 0
        self._start = self._last = time.monotonic()
        self._bar = None
        if enabled and getattr(self.stream, "isatty", lambda: False)():
            self._bar = tqdm(total=self.total, desc=desc, file=self.stream, dynamic_ncols=True)

    def update(self, n: int = 1, **info) -> None:
        self.done += n
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(n)
            if info:
                self._bar.set_postfix({k: f"{v:.4g}" for k, v in info.items()}, refresh=False)
            return
        now = time.monotonic()
        if now - self._last >= self.every_s or self.done >= self.total:
            self._last = now
            self._line(now, info)

    def _line(self, now: float, info: dict) -> None:
        elapsed = now - self._start
        eta = elapsed / self.done * (self.total - self.done) if self.done else 0.0
        extra = "".join(f" {k} {v:.4g}" for k, v in info.items())
        print(f"{self.desc}: {100 * self.done / self.total:3.0f}% ({self.done}/{self.total}) "
              f"elapsed {duration_text(elapsed)} ETA {duration_text(eta)}{extra}", file=self.stream, flush=True)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.close()
