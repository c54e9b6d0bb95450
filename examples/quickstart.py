"""Notebook-style tour: run cell by cell in Jupyter, or `python examples/quickstart.py`.

Uses your inventory (~/.config/fleetctl/ssh-agents.toml), or a throwaway sandbox fleet if you
have none.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import fleetctl
from fleetctl.paths import config_path
from fleetctl.sandbox import Sandbox, default_hosts

# %% Pick an inventory: yours, or a sandbox of three simulated GPU hosts.
scratch = Path(tempfile.mkdtemp(prefix="fleetctl-example-"))
sandbox = None
if config_path().exists():
    inventory = fleetctl.load_config()
else:
    sandbox = Sandbox(scratch / "sandbox", default_hosts(3)).up()
    inventory = fleetctl.load_config(sandbox.inventory_path)
print(inventory.names())

# %% One heartbeat round; every host gets a snapshot, failed ones say why.
try:
    with fleetctl.Fleet(inventory, state_dir=scratch / "state") as fleet:
        result = fleet.heartbeat()
        print(result)
        for snapshot in result.failed:
            print(snapshot.agent, snapshot.status, snapshot.error)
        frame = result.to_dataframe()  # one row per GPU, the same columns as the CSV export
        print(frame[["agent", "gpu_index", "gpu_name", "memory_used_mib", "memory_total_mib", "utilization_gpu_pct"]])

        # %% History: every round above was recorded in SQLite; health says online/offline.
        fleet.heartbeat()
        print(fleet.history(since="10m").groupby("agent")["temperature_c"].mean())
        print(fleet.health())

        # %% A job: queued durably, placed on a host with a free GPU, run detached, result pulled back.
        job = fleet.submit(["python3", "-c", "import os; print(os.environ.get('CUDA_VISIBLE_DEVICES'))"], gpus=1)
        record = job.wait(timeout=120)  # drives the queue itself when no `fleetctl serve` is running
        print(record.state, record.agent, record.gpus, job.logs())
        print(fleet.jobs()[["id", "state", "agent", "gpus", "reason"]])
finally:
    if sandbox is not None:
        sandbox.down()
