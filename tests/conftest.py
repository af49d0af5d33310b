from pathlib import Path

import pytest

GOLDEN = Path(__file__).resolve().parents[1].parent / "shared" / "golden"


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    if not GOLDEN.is_dir():
        pytest.skip(f"GOLDEN DATA MISSING: {GOLDEN} not found; equivalence with the original is NOT checked")
    return GOLDEN
