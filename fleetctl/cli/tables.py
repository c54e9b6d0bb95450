"""The fleet table printed by ``heartbeat`` and ``demo``."""

from __future__ import annotations

from rich.table import Table

from fleetctl.fleet import HeartbeatRound


def _num(value: float | None, fmt: str = "{:.0f}") -> str:
    return "" if value is None else fmt.format(value)


def fleet_table(round_: HeartbeatRound) -> Table:
    table = Table("AGENT", "STATUS", "GPU", "NAME", "MEM USED/TOTAL MiB", "UTIL%", "TEMP°C", "POWER W",
                  "LOAD", "MS", box=None, pad_edge=False)
    for snap in round_:
        status = snap.status if snap.ok else f"[red]{snap.status}[/red]"
        load = _num(snap.host.load_1m, "{:.2f}")
        if not snap.gpus:
            table.add_row(snap.agent, status, "", snap.error or "", "", "", "", "", load, _num(snap.latency_ms))
        for gpu in snap.gpus:
            memory = f"{_num(gpu.memory_used_mib)}/{_num(gpu.memory_total_mib)}"
            table.add_row(snap.agent, status, _num(gpu.index, "{}"), gpu.name or "", memory,
                          _num(gpu.utilization_gpu_pct), _num(gpu.temperature_c), _num(gpu.power_draw_w),
                          load, _num(snap.latency_ms))
    return table
