"""Putting os.environ back as it was, touching only the variables that changed."""
from __future__ import annotations

import os


def restore_environment(saved: dict[str, str]) -> None:
    """Unset what was added, set what changed. Never clear and refill the whole environment: each change is a
    setenv/unsetenv in the C library, which is not safe while native threads (OpenMP, OpenVINO, ONNX Runtime
    pools) may read the environment, so the fewer the better."""
    for name in [name for name in os.environ if name not in saved]:
        del os.environ[name]
    for name, value in saved.items():
        if os.environ.get(name) != value:
            os.environ[name] = value
