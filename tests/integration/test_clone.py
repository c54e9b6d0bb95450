"""A clone stands alone: `git clone` of this repository into an empty directory, with nothing
beside it, passes its unit tests; the tests over ../shared are reported skipped, not failed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.no_store  # never opens a store: the PostgreSQL pass deselects it

ROOT = Path(__file__).resolve().parents[2]


def test_a_fresh_clone_passes_its_unit_tests_with_nothing_beside_it(tmp_path: Path) -> None:
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    clone = tmp_path / "empty" / "fleetctl"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True, capture_output=True, timeout=120)
    assert not (clone.parent.parent / "shared").exists()
    env = {k: v for k, v in os.environ.items() if k != "FLEETCTL_REQUIRE_SHARED"}
    # python -m puts the clone first on sys.path, ahead of the venv's editable install of this checkout.
    where = subprocess.run([sys.executable, "-c", "import fleetctl; print(fleetctl.__file__)"], cwd=clone, env=env,
                           capture_output=True, text=True, check=True)
    assert where.stdout.strip().startswith(str(clone))
    done = subprocess.run([sys.executable, "-m", "pytest", "tests/unit", "-q", "-p", "no:cacheprovider", "-rs"],
                          cwd=clone, env=env, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    tail = done.stdout[-3000:]
    assert done.returncode == 0, tail
    assert " failed" not in tail and "skipped" in tail, tail
    assert "is not there (it sits beside the project" in done.stdout, tail
