"""Where the captures beside the clone live, and what a test does when they are absent.

``../shared/gpu-outputs`` (real captures and other projects' fixtures) sits beside the project on
our machines and in CI, not in a fresh clone. Tests over it run when it exists and are skipped with
one clear reason when it does not; with ``FLEETCTL_REQUIRE_SHARED=1`` (set by .ci/run) a missing
folder fails the run instead, so CI can never skip them silently.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared" / "gpu-outputs"
REAL_CAPTURES = SHARED / "real"
PEERS = SHARED / "peers"
REQUIRE_ENV = "FLEETCTL_REQUIRE_SHARED"
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "gpu"


def require_shared(folder: Path) -> Path:
    """``folder`` if it exists; else skip (or fail under FLEETCTL_REQUIRE_SHARED=1)."""
    if folder.is_dir():
        return folder
    reason = f"{folder} is not there (it sits beside the project on our machines and in CI, not in a fresh clone)"
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{REQUIRE_ENV}=1 but {reason}")
    pytest.skip(reason)
