"""The fleet table printed by ``heartbeat`` and ``demo``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.table import Table

from fleetctl.fleet import HeartbeatRound

if TYPE_CHECKING:
    import pandas as pd

BAR_WIDTH = 20


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


def _bar(used: float | None, total: float | None) -> str:
    if used is None or not total:
        return " " * (BAR_WIDTH + 5)
    share = max(0.0, min(1.0, used / total))
    filled = round(share * BAR_WIDTH)
    colour = "red" if share > 0.9 else "yellow" if share > 0.6 else "green"
    return f"[{colour}]{'█' * filled}[/{colour}]{'░' * (BAR_WIDTH - filled)} {share * 100:3.0f}%"


def top_table(round_: HeartbeatRound, health: pd.DataFrame) -> Table:
    """``fleetctl top``: one line per GPU (one per host without GPU data)."""
    states = dict(zip(health["agent"], health["health"], strict=False))
    drained = {a for a, d in zip(health["agent"], health["draining"], strict=False) if d}
    table = Table("HOST", "GPU", "NAME", "MEMORY", "UTIL%", "TEMP°C", "POWER W", "STATUS", "HEALTH",
                  box=None, pad_edge=False, title=f"{len(round_.ok)}/{len(round_)} hosts ok, "
                  f"round {round_.duration_s * 1000:.0f} ms", title_justify="left")
    for snap in round_:
        status = snap.status if snap.ok else f"[red]{snap.status}[/red]"
        state = states.get(snap.agent, "unknown") + (" (draining)" if snap.agent in drained else "")
        if not snap.gpus:
            table.add_row(snap.agent, "", snap.error or "", "", "", "", "", status, state)
        for gpu in snap.gpus:
            power = f"{_num(gpu.power_draw_w)}/{_num(gpu.power_limit_w)}" if gpu.power_draw_w is not None else ""
            table.add_row(snap.agent, _num(gpu.index, "{}"), gpu.name or "", _bar(gpu.memory_used_mib, gpu.memory_total_mib),
                          _num(gpu.utilization_gpu_pct), _num(gpu.temperature_c), power, status, state)
    return table
