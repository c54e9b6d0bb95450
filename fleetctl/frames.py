"""Snapshots as rows: the one CSV / DataFrame schema shared by heartbeat --csv, export and notebooks."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from fleetctl.telemetry import TelemetrySnapshot

if TYPE_CHECKING:
    import pandas as pd

COLUMNS = ["timestamp", "agent", "hostname", "status", "error", "latency_ms", "vendor", "gpu_index", "gpu_uuid",
           "gpu_name", "memory_total_mib", "memory_used_mib", "memory_free_mib", "utilization_gpu_pct",
           "temperature_c", "power_draw_w", "power_limit_w", "load_1m", "mem_available_mib"]


def snapshot_rows(snapshots: Iterable[TelemetrySnapshot]) -> list[dict[str, Any]]:
    """One row per GPU per heartbeat; a host with no GPU data is one row with empty GPU columns."""
    rows = []
    for snap in snapshots:
        common = {"timestamp": snap.timestamp.isoformat(timespec="milliseconds"), "agent": snap.agent,
                  "hostname": snap.hostname, "status": snap.status, "error": snap.error,
                  "latency_ms": None if snap.latency_ms is None else round(snap.latency_ms, 2),
                  "load_1m": snap.host.load_1m, "mem_available_mib": snap.host.mem_available_mib}
        if not snap.gpus:
            rows.append({**dict.fromkeys(COLUMNS), **common})
        for gpu in snap.gpus:
            rows.append({**common, "vendor": gpu.vendor, "gpu_index": gpu.index, "gpu_uuid": gpu.uuid,
                         "gpu_name": gpu.name, "memory_total_mib": gpu.memory_total_mib,
                         "memory_used_mib": gpu.memory_used_mib, "memory_free_mib": gpu.memory_free_mib,
                         "utilization_gpu_pct": gpu.utilization_gpu_pct, "temperature_c": gpu.temperature_c,
                         "power_draw_w": gpu.power_draw_w, "power_limit_w": gpu.power_limit_w})
    return rows


def to_dataframe(snapshots: Iterable[TelemetrySnapshot]) -> pd.DataFrame:
    import pandas as pd  # imported late: the CLI's cold start should not pay for pandas

    frame = pd.DataFrame(snapshot_rows(snapshots), columns=COLUMNS)
    frame["gpu_index"] = frame["gpu_index"].astype("Int64")
    return frame
