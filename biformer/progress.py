"""Progress of long work: bars on a terminal while it runs, gone afterwards, silent where the stream is no
terminal; there (a log file, a pipe) a plain line now and then instead (`Heartbeat`)."""
from __future__ import annotations

import sys
import time
from typing import Any, Callable, Iterable

from tqdm import tqdm

HEARTBEAT_SECONDS = 30.0  # how often a long loop writes a line where no bar shows


def progress(iterable: Iterable | None = None, *, enabled: bool = True, **options: Any) -> tqdm:
    """A tqdm bar that leaves no line behind and is off when stderr is redirected (a log file gets no
    carriage returns or cursor-movement codes from nested bars)."""
    return tqdm(iterable, leave=False, disable=None if enabled else True, **options)


class Heartbeat:
    """A line on stdout at most every HEARTBEAT_SECONDS while a loop runs, where stdout is no terminal (a bar
    shows there instead): a piped or logged run says how far it is."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled and not sys.stdout.isatty()
        self.last = time.monotonic()

    def __call__(self, line: Callable[[], str]) -> None:
        if self.enabled and time.monotonic() - self.last >= HEARTBEAT_SECONDS:
            print(line(), flush=True)
            self.last = time.monotonic()
