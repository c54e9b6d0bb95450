"""Code with the job, against a sandbox host: what a re-submit of an unchanged tree sends and costs.

    .venv/bin/python bench/jobs_code.py [--files 10000] [--mb 200] [--repeat 5] [--tree link]

A tree of FILES random files (MB in all) is submitted once (cold: every blob crosses), then again
unchanged, then with one file changed. Bytes are counted on the connection (every SFTP write of an
upload archive). The dispatch cost is the controller's time from the claim to the job marked
running (mktemp, the code, job.json and run.sh, the launch), compared with a job with no code on the
same host (interleaved, medians of REPEAT each). "To start" is from the claim to the command's first
instruction on the host: it includes the job's own tree being built there by its wrapper.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fleetctl.fleet import Fleet
from fleetctl.jobs.api import drive_once
from fleetctl.jobs.queue import JobQueue
from fleetctl.sandbox import HostSpec, Sandbox
from fleetctl.ssh import connect
from fleetctl.ssh.seam import Connection, Route


class Counting:
    """The real connection; counts the bytes of every upload archive written."""

    def __init__(self, inner: Connection, counter: dict[str, int]) -> None:
        self.inner, self.counter = inner, counter
        self.route, self.host_keys = inner.route, inner.host_keys

    @property
    def is_open(self) -> bool:
        return self.inner.is_open

    def write_bytes(self, remote_path: str, data: bytes) -> None:
        if "/code.up." in remote_path:
            self.counter["upload_bytes"] += len(data)
        self.inner.write_bytes(remote_path, data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def make_tree(root: Path, files: int, total_mb: int) -> None:
    size = total_mb * 1024 * 1024 // files
    for number in range(files):
        path = root / f"pkg{number % 100:02d}" / f"module_{number}.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(size))


def run_one(fleet: Fleet, counter: dict[str, int], **options: Any) -> tuple[float, int, float, float]:
    """Submit, drive until done: (dispatch seconds, upload bytes, submit seconds, dispatch-to-start seconds)."""
    counter["upload_bytes"] = 0
    started = time.monotonic()
    job = fleet.submit(["date", "+%s.%N"], **options)
    submitted = time.monotonic() - started
    while not job.record.done:
        drive_once(fleet.hosts)
    record = job.record
    assert record.state == "succeeded", record.reason
    events = dict((event, ts) for ts, event, _ in JobQueue(fleet.hosts.store).events(job.id))
    began = float(job.logs().strip())  # the sandbox host shares this machine's clock
    return events["running"] - events["dispatching"], counter["upload_bytes"], submitted, began - events["dispatching"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--mb", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--tree", choices=("auto", "link", "copy"), default="link")
    args = parser.parse_args()
    counter = {"upload_bytes": 0}
    with tempfile.TemporaryDirectory(prefix="fleetctl-bench-code-") as scratch:
        base = Path(scratch)
        sandbox = Sandbox(base / "sb", [HostSpec("one", gpus=1)])
        sandbox.up()
        try:
            code = base / "project"
            make_tree(code, args.files, args.mb)
            config = base / "agents.toml"
            config.write_text(f'[controller]\ncode_tree = "{args.tree}"\ncode_max_bytes = {4 * args.mb * 1024 * 1024}\n\n'
                              + sandbox.inventory_path.read_text())
            fleet: Fleet

            def counting(route: Route) -> Connection:
                return Counting(connect(route, fleet.hosts.connect_options), counter)  # type: ignore[return-value]

            fleet = Fleet.from_config(config, state_dir=base / "state", connector=counting)
            with fleet:
                fleet.heartbeat()
                fleet.heartbeat()
                cold = run_one(fleet, counter, code=str(code))
                plain, warm_runs = [], []
                for _ in range(args.repeat):  # interleaved: both see the same load
                    plain.append(run_one(fleet, counter))
                    warm_runs.append(run_one(fleet, counter, code=str(code)))
                (code / "pkg00" / "module_0.py").write_bytes(b"changed\n")
                one = run_one(fleet, counter, code=str(code))
        finally:
            sandbox.down()

    def ms(runs: list[tuple[float, int, float, float]], field: int) -> float:
        return statistics.median(r[field] for r in runs) * 1000

    print(f"tree: {args.files} files, {args.mb} MB; host tree made by {args.tree}; medians of {args.repeat}")
    print(f"{'':30}{'dispatch ms':>12}{'to start ms':>12}{'bytes sent':>14}{'submit s':>10}")
    for label, runs in (("first submit (cold cache)", [cold]), ("re-submit, unchanged", warm_runs), ("one file changed", [one]),
                        ("job with no code", plain)):
        print(f"{label:30}{ms(runs, 0):12.1f}{ms(runs, 3):12.1f}{max(r[1] for r in runs):14d}{ms(runs, 2) / 1000:10.2f}")
    print(f"{'unchanged re-submit / no code':30}{ms(warm_runs, 0) / ms(plain, 0):11.2f}x{ms(warm_runs, 3) / ms(plain, 3):11.2f}x")


if __name__ == "__main__":
    sys.exit(main())
