"""Pictures of ``fleet.history()`` for notebooks, one line per host and GPU over time::

    fleet.history().pipe(fleetctl.telemetry.plotting.utilization)
    fleet.history("1h").pipe(fleetctl.telemetry.plotting.memory)

Needs matplotlib (``pip install 'fleetctl[plot]'``). pandas' own ``.plot`` would do, but history
keeps ISO text timestamps and each host beats at its own instant, so the frame has to be typed and
split per GPU first (a plain pivot leaves gaps that break every line)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fleetctl.errors import FleetError

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.axes import Axes


def over_time(frame: pd.DataFrame, column: str, *, title: str | None = None, ylabel: str | None = None,
              ax: Axes | None = None) -> Axes:
    """``column`` of a history frame against time, one line per ``agent``/``gpu_index``; rows of
    failed heartbeats (no GPU values) are left out."""
    import pandas as pd

    try:
        import matplotlib.dates as mdates
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise FleetError("plotting needs matplotlib", hint="pip install 'fleetctl[plot]'") from exc
    if ax is None:
        _figure, ax = plt.subplots(figsize=(9, 3.5))
    rows = frame.dropna(subset=[column])
    for (agent, gpu), series in rows.groupby(["agent", "gpu_index"], sort=True):
        times = pd.to_datetime(series["timestamp"], utc=True, format="ISO8601")
        ax.plot(times, series[column], marker=".", label=f"{agent} gpu{gpu}")
    if rows.empty:
        ax.text(0.5, 0.5, "no GPU samples in this frame", ha="center", va="center", transform=ax.transAxes)
    else:
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")
    ax.set_title(title or column)
    ax.set_xlabel("time (UTC)")
    ax.set_ylabel(ylabel or column)
    locator = mdates.AutoDateLocator()  # type: ignore[no-untyped-call]
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))  # type: ignore[no-untyped-call]
    return ax


def utilization(frame: pd.DataFrame, ax: Axes | None = None) -> Axes:
    """GPU utilization (%) per host and GPU."""
    ax = over_time(frame, "utilization_gpu_pct", title="GPU utilization", ylabel="%", ax=ax)
    ax.set_ylim(-2, 102)
    return ax


def memory(frame: pd.DataFrame, ax: Axes | None = None) -> Axes:
    """GPU memory used (MiB) per host and GPU."""
    return over_time(frame, "memory_used_mib", title="GPU memory used", ylabel="MiB", ax=ax)
