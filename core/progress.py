"""Progress of long work, on by default: tqdm's bar on a terminal, log lines elsewhere.

A bar redraws one line with carriage returns, which a CI log, `nohup` or a Dagster run
shows as one garbled line or not at all; off a terminal, `progress` writes a plain line
every `every` percent instead (done, total, rate, ETA), and at least one per `max_seconds`
(slow steps: 5% of a long training run can take an hour), but at most one per
`min_seconds`, so work that ends within `min_seconds` prints nothing.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import IO, Any, Generic, TypeVar

from tqdm import tqdm

T = TypeVar("T")


class LineProgress(Generic[T]):
    """tqdm's `update` / `set_postfix` / iteration, as occasional log lines."""

    def __init__(
        self,
        iterable: Iterable[T] | None,
        total: int,
        desc: str,
        unit: str,
        initial: int = 0,
        every: float = 5.0,
        min_seconds: float = 10.0,
        max_seconds: float = 60.0,
        stream: IO[str] | None = None,
        clock: Any = time.monotonic,
    ) -> None:
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.n = self.start = initial
        self.every, self.min_seconds, self.max_seconds = every, min_seconds, max_seconds
        self.stream = stream or sys.stderr
        self.clock = clock
        self.started = self.last_line = clock()
        self.next_percent = every
        self.postfix = ""

    def __iter__(self) -> Iterator[T]:
        assert self.iterable is not None
        for item in self.iterable:
            yield item
            self.update(1)

    def __enter__(self) -> LineProgress[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def set_postfix(self, **values: object) -> None:
        self.postfix = ", ".join(f"{k} {v}" for k, v in values.items())

    def update(self, n: int = 1) -> None:
        self.n += n
        percent = 100.0 * self.n / self.total if self.total else 100.0
        now = self.clock()
        if percent >= self.next_percent:
            self.next_percent = (percent // self.every + 1) * self.every
        elif now - self.last_line < self.max_seconds:
            return
        if now - self.last_line < self.min_seconds:
            return
        self.last_line = now
        elapsed = now - self.started
        rate = (self.n - self.start) / elapsed if elapsed > 0 else 0.0
        left = (self.total - self.n) / rate if rate > 0 else 0.0
        # Slow work reads better as seconds per item.
        speed = (
            f"{rate:,.1f} {self.unit}s/s"
            if rate >= 1 or rate == 0
            else f"{1 / rate:,.1f} s/{self.unit}"
        )
        line = (
            f"{self.desc}: {percent:.0f}% ({self.n:,}/{self.total:,} {self.unit}s), "
            f"{speed}, ETA {left:.0f} s"
        )
        print(line + (f", {self.postfix}" if self.postfix else ""), file=self.stream, flush=True)

    def close(self) -> None:
        """Nothing to flush: each line was written whole."""


def progress(
    iterable: Iterable[T] | None = None,
    *,
    total: int,
    desc: str,
    unit: str,
    enabled: bool = True,
    initial: int = 0,
) -> tqdm | LineProgress[T]:
    """A bar on a terminal, lines off one (see the module docstring), nothing if not
    `enabled`."""
    if enabled and not sys.stderr.isatty():
        return LineProgress(iterable, total, desc, unit, initial)
    return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, disable=not enabled)
