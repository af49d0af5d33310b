"""Progress bars for long work: on stderr while it runs, gone afterwards, silent where stderr is no terminal."""
from __future__ import annotations

from typing import Any, Iterable

from tqdm import tqdm


def progress(iterable: Iterable | None = None, *, enabled: bool = True, **options: Any) -> tqdm:
    """A tqdm bar that leaves no line behind and is off when stderr is redirected (a log file gets no
    carriage returns or cursor-movement codes from nested bars)."""
    return tqdm(iterable, leave=False, disable=None if enabled else True, **options)
