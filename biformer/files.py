"""Output files and folders: written atomically (a reader never sees a partial file, a failure leaves none
behind), output folders checked before long work, and JSON files a user gave read with errors that name them."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

from .errors import OutputError, UserError


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it replaces `path`, on error it is removed.

    Raises OutputError (a UserError and an OSError) naming `path` when it cannot be written.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise OutputError(f"cannot write {path!r}: its folder {folder!r} does not exist; create it first")
    try:
        handle, temp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.splitext(path)[1])
    except OSError as error:
        raise OutputError(f"cannot write {path!r}: {error.strerror or error}") from error
    os.close(handle)
    try:
        yield Path(temp)
        os.chmod(temp, 0o666 & ~current_umask())  # mkstemp's file is private: give it the permissions of a new file
        os.replace(temp, path)
    except BaseException as error:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        if isinstance(error, OSError) and not isinstance(error, OutputError):  # full disk, read-only target
            raise OutputError(f"cannot write {path!r}: {error.strerror or error}") from error
        raise


def current_umask() -> int:
    """The process's umask (reading it means setting it: it is set back at once)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


def output_folder(path: str | os.PathLike, option: str) -> Path:
    """The folder `path` (a leading ~ expanded), created if missing and checked to be writable now, before any
    long work; OutputError naming `option` if it is a file, lies inside one or cannot be written."""
    folder = Path(os.path.expanduser(os.fspath(path)))
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{option} {os.fspath(path)!r} is a file, not a folder; choose a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as error:
        raise OutputError(f"{option} {os.fspath(path)!r} cannot be created: a part of its path is a file") from error
    except OSError as error:
        raise OutputError(f"{option} {os.fspath(path)!r} cannot be created: {error.strerror or error}") from error
    check_writable(folder / ".write-test", option)
    return folder


def remove_stale_temporaries(folder: str | os.PathLike) -> None:
    """Delete the temporary files (.tmp-*) that a process killed during `atomic_output` left in `folder`.
    Only for a folder one process writes at a time (a training run's --output): another writer's file in
    progress would go too."""
    for stale in Path(folder).glob(".tmp-*"):
        with contextlib.suppress(OSError):
            stale.unlink()


def save_png(picture: Any, path: str | os.PathLike) -> None:
    """Write a PIL image as a PNG file, atomically."""
    with atomic_output(path) as temp:
        picture.save(temp, format="PNG")


def check_writable(path: str | os.PathLike, option: str) -> None:
    """OutputError naming `option` unless a file could be written at `path` now (checked before long work)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise OutputError(f"{option} {path!r}: the folder {folder!r} does not exist; create it first")
    try:
        handle, temp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    except OSError as error:
        raise OutputError(f"{option} {path!r} cannot be written: {error.strerror or error}") from error
    os.close(handle)
    os.unlink(temp)


def read_json(path: str | os.PathLike, what: str, hint: str = "") -> Any:
    """The JSON value in file `path`; UserError naming it as `what` (e.g. "annotation file") if it is missing
    (`hint`: what was expected instead), unreadable, not UTF-8 or not JSON (with the line and column)."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as file:
            return json.load(file)
    except FileNotFoundError as error:
        raise UserError(f"{what} {path!r} does not exist" + (f" (expected {hint})" if hint else "")) from error
    except json.JSONDecodeError as error:
        raise UserError(f"{what} {path!r} is not valid JSON: {error.msg} at line {error.lineno} "
                        f"column {error.colno}") from error
    except UnicodeDecodeError as error:
        raise UserError(f"{what} {path!r} is not UTF-8 text: {error}") from error
    except OSError as error:
        raise UserError(f"cannot read {what} {path!r}: {error.strerror or error}") from error
