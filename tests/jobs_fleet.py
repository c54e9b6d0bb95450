"""The job tests' fleet: a sandbox's inventory under a [controller] table that makes kills and offline
detection quick, and a Fleet on it with a state dir of the test's own."""

from __future__ import annotations

from pathlib import Path

from fleetctl.fleet import Fleet
from fleetctl.sandbox import Sandbox

CONTROLLER = "[controller]\nkill_grace_s = 1\noffline_after_misses = 2\n\n"


def job_config(sandbox: Sandbox, tmp_path: Path, extra: str = "") -> Path:
    """The sandbox's inventory under :data:`CONTROLLER` (plus ``extra`` controller lines)."""
    config = tmp_path / "agents.toml"
    config.write_text(CONTROLLER.replace("[controller]\n", "[controller]\n" + extra) + sandbox.inventory_path.read_text())
    return config


def job_fleet(sandbox: Sandbox, tmp_path: Path, extra: str = "") -> Fleet:
    return Fleet.from_config(job_config(sandbox, tmp_path, extra), state_dir=tmp_path / "state")
