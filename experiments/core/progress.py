"""Progress of long steps, on stderr: tqdm bars on a terminal, plain lines in a redirected log.

Streams (every command of ``python -m experiments`` follows this):

- **stdout** carries only a command's product: the table of ``list``, the Markdown of ``summary``,
  and for commands that write tables (``run``, ``latency``, ``roofline``, ``reproduce``) the paths
  written, one per line, so ``python -m experiments run quant > paths.txt`` captures exactly them;
- **stderr** carries everything a person watches: step headers, per-point lines, progress, timings,
  warnings and ``error:`` lines.

:func:`progress_bar` draws a tqdm bar when stderr is a terminal. When it is not (``> log 2>&1``,
CI, ``nohup``), tqdm's carriage returns and cursor moves would turn the log into control-character
soup, so it prints one plain line instead every ``TKR_PROGRESS_INTERVAL`` seconds (default 30):
``[perplexity] 12/32 batch, 41 s, ~68 s left``. A bar made with ``leave=True`` also prints a line
when it starts and when it ends. ``enabled=False`` or ``TQDM_DISABLE=1`` silences both kinds.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Iterable, TextIO

DEFAULT_INTERVAL_S = 30.0


def _interval() -> float:
    try:
        return max(0.0, float(os.environ.get("TKR_PROGRESS_INTERVAL", DEFAULT_INTERVAL_S)))
    except ValueError:
        return DEFAULT_INTERVAL_S


def _disabled_by_env() -> bool:
    return os.environ.get("TQDM_DISABLE", "").strip().lower() not in ("", "0", "false", "no")


def is_terminal(stream: TextIO | None = None) -> bool:
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def status(message: str) -> None:
    """One human status line on stderr, flushed (so it lands in order with everything else)."""
    print(message, file=sys.stderr, flush=True)


def _fmt_s(s: float) -> str:
    if s < 120:
        return f"{s:.0f} s"
    m, s = divmod(int(round(s)), 60)
    return f"{m} min {s:02d} s" if m < 60 else f"{m // 60} h {m % 60:02d} min"


class LineProgress:
    """tqdm's small API (iterate, ``update``, ``close``, context manager) printing plain lines."""

    def __init__(self, iterable: Iterable | None = None, *, total: int | None = None, desc: str = "",
                 unit: str = "it", leave: bool = True, stream: TextIO | None = None,
                 interval: float | None = None, enabled: bool = True):
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total, self.desc, self.unit, self.leave = total, desc, unit, leave
        self.stream = sys.stderr if stream is None else stream
        self.interval = _interval() if interval is None else interval
        self.enabled = enabled
        self.n = 0
        self.start = self.last = time.perf_counter()
        self.closed = False
        if self.enabled and self.leave:
            self._print(f"0/{self.total} {self.unit}" if self.total is not None else "started")

    def _print(self, text: str) -> None:
        print(f"[{self.desc}] {text}" if self.desc else text, file=self.stream, flush=True)

    def _line(self) -> str:
        el = time.perf_counter() - self.start
        done = f"{self.n}/{self.total}" if self.total is not None else f"{self.n}"
        left = ""
        if self.total and 0 < self.n < self.total:
            left = f", ~{_fmt_s(el / self.n * (self.total - self.n))} left"
        return f"{done} {self.unit}, {_fmt_s(el)}{left}"

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if self.enabled and now - self.last >= self.interval and not (self.total is not None and self.n >= self.total):
            self.last = now
            self._print(self._line())

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.enabled and self.leave:
            self._print(f"done: {self._line()}")

    def __iter__(self):
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def progress_bar(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "", unit: str = "it",
                 leave: bool = True, enabled: bool = True, stream: TextIO | None = None):
    """A tqdm bar on a terminal, a :class:`LineProgress` otherwise (see the module docstring)."""
    stream = sys.stderr if stream is None else stream
    enabled = enabled and not _disabled_by_env()
    if enabled and is_terminal(stream):
        from tqdm.auto import tqdm  # noqa: PLC0415 - only for interactive runs
        return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave, file=stream, dynamic_ncols=True)
    return LineProgress(iterable, total=total, desc=desc, unit=unit, leave=leave, stream=stream, enabled=enabled)
