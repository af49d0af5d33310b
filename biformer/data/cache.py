"""The cache of generated data sets and files: $BIFORMER_CACHE, else ~/.cache/biformer; folders written whole or
not at all."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from ..errors import OutputError


def cache_root() -> Path:
    """Where generated data sets and files are kept: $BIFORMER_CACHE, else ~/.cache/biformer."""
    return Path(os.environ.get("BIFORMER_CACHE") or Path.home() / ".cache" / "biformer")


def cached_folder(name: str, write: Callable[[Path], None]) -> Path:
    """The cache folder `name`, filled by `write(folder)` on first use. It is written to a temporary folder and
    renamed into place when complete, so an interrupted generation leaves nothing that looks finished."""
    final = cache_root() / name
    if final.is_dir():
        return final
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        temp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=final.parent))
    except OSError as error:
        raise OutputError(f"cannot create the cache folder {str(final.parent)!r}: "
                          f"{error.strerror or error}; set BIFORMER_CACHE to a writable folder") from error
    try:
        write(temp)
        os.replace(temp, final)
    except OSError as error:
        if final.is_dir():  # another process finished first: its folder is as good as ours
            return final
        raise OutputError(f"cannot write the cache folder {str(final)!r}: {error.strerror or error}; "
                          "set BIFORMER_CACHE to a writable folder") from error
    finally:
        shutil.rmtree(temp, ignore_errors=True)  # nothing left after a successful rename
    return final
