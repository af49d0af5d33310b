import os
from pathlib import Path

import pytest
import torch
from environment import restore_environment

GOLDEN = Path(__file__).resolve().parents[1].parent / "shared" / "golden"


def pytest_collection_modifyitems(config, items):
    """Tiers declared once: a test that reads the golden data is `golden`; `gpu` tests skip without CUDA."""
    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "golden_dir" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.golden)
        if item.get_closest_marker("gpu") and not torch.cuda.is_available():
            item.add_marker(no_gpu)


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    if not GOLDEN.is_dir():
        pytest.skip(f"GOLDEN DATA MISSING: {GOLDEN} not found; equivalence with the original is NOT checked")
    return GOLDEN


THREADS = torch.get_num_threads()  # the process's own, before any test or fixture changes it


@pytest.fixture(autouse=True)
def _process_left_as_found():
    """Each test leaves the environment as it found it and torch's thread count as the process started with, also
    where a module fixture changed it: importing ultralytics (the guide's YOLO example) sets OMP_NUM_THREADS=1 and
    its CPU training sets the thread count, and a later test's subprocess or in-process run would then train on
    one thread against a reference on two, which differ in the last bits."""
    environment = dict(os.environ)
    yield
    restore_environment(environment)
    if torch.get_num_threads() != THREADS:
        torch.set_num_threads(THREADS)


_EXIT_STATUS: list[int] = []


def pytest_sessionfinish(session, exitstatus):
    _EXIT_STATUS.append(int(exitstatus))


def pytest_unconfigure(config):
    """End the process with the session's status once pytest is done: the whole suite (OpenVINO's CPU plugin,
    inductor, ultralytics loaded in one process) segfaulted in the interpreter's teardown after every test had
    passed (exit 139), a crash of native libraries' destructors, not of a test."""
    if _EXIT_STATUS:
        import signal
        import sys

        # os._exit skips the atexit handlers that would shut down worker pools: without this, six forked children
        # of a CI run's pytest outlived it, asleep, holding its output open
        for child in _child_processes():
            try:
                os.kill(child, signal.SIGKILL)
            except ProcessLookupError:
                pass
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_EXIT_STATUS[-1])


def _child_processes() -> list[int]:
    """The process ids whose parent is this process (from /proc; none where there is no /proc)."""
    children = []
    for entry in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = entry.read_text().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
        except (OSError, IndexError):
            continue  # gone meanwhile
        if int(fields[1]) == os.getpid():
            children.append(int(entry.parent.name))
    return children
