"""Snapshots as rows: the one CSV / DataFrame schema shared by heartbeat --csv, export and notebooks."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fleetctl.errors import ConfigError
from fleetctl.telemetry.snapshot import TelemetrySnapshot

if TYPE_CHECKING:
    import pandas as pd

COLUMNS = ["timestamp", "agent", "hostname", "status", "error", "latency_ms", "vendor", "gpu_index", "gpu_uuid",
           "gpu_name", "memory_total_mib", "memory_used_mib", "memory_free_mib", "utilization_gpu_pct",
           "temperature_c", "power_draw_w", "power_limit_w", "load_1m", "mem_available_mib"]

_FLOAT_COLUMNS = ["latency_ms", "memory_total_mib", "memory_used_mib", "memory_free_mib", "utilization_gpu_pct",
                  "temperature_c", "power_draw_w", "power_limit_w", "load_1m", "mem_available_mib"]


def snapshot_tuples(snapshots: Iterable[TelemetrySnapshot]) -> list[tuple[Any, ...]]:
    """One row per GPU per heartbeat, as tuples in :data:`COLUMNS` order (the store's insert, on the
    heartbeat's hot path: no dict per row); a host with no GPU data is one row with empty GPU columns."""
    rows: list[tuple[Any, ...]] = []
    for snap in snapshots:
        head = (snap.timestamp.isoformat(timespec="milliseconds"), snap.agent, snap.hostname, snap.status, snap.error,
                None if snap.latency_ms is None else round(snap.latency_ms, 2))
        tail = (snap.host.load_1m, snap.host.mem_available_mib)
        if not snap.gpus:
            rows.append((*head, *_NO_GPU, *tail))
        for gpu in snap.gpus:
            rows.append((*head, gpu.vendor, gpu.index, gpu.uuid, gpu.name, gpu.memory_total_mib, gpu.memory_used_mib,
                         gpu.memory_free_mib, gpu.utilization_gpu_pct, gpu.temperature_c, gpu.power_draw_w,
                         gpu.power_limit_w, *tail))
    return rows


_NO_GPU = (None,) * (len(COLUMNS) - 8)


def snapshot_rows(snapshots: Iterable[TelemetrySnapshot]) -> list[dict[str, Any]]:
    """One row per GPU per heartbeat, as dicts keyed by column."""
    return [dict(zip(COLUMNS, row, strict=True)) for row in snapshot_tuples(snapshots)]


def to_dataframe(snapshots: Iterable[TelemetrySnapshot]) -> pd.DataFrame:
    import pandas as pd  # imported late: the CLI's cold start should not pay for pandas

    return typed_frame(pd.DataFrame(snapshot_rows(snapshots), columns=COLUMNS))


def typed_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """The same dtypes whether rows came from a round or from history (an all-empty column
    would otherwise come back as ``object`` and an index column as ``float``)."""
    frame = frame.astype({c: "float64" for c in _FLOAT_COLUMNS})
    frame["gpu_index"] = frame["gpu_index"].astype("Int64")
    return frame


# A spreadsheet reads a cell starting with one of these as a formula (OWASP "CSV injection").
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def neutralise_cell(value: object) -> object:
    """A text cell that a spreadsheet would run as a formula gets a leading ``'``; anything else
    (numbers included, a negative one stays a number) is returned as it is."""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


def csv_safe(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with every text cell neutralised; numeric columns untouched. Every CSV fleetctl
    writes goes through here."""
    from pandas.api.types import is_numeric_dtype

    text_columns = [c for c in frame.columns if not is_numeric_dtype(frame[c].dtype)]
    if not text_columns:
        return frame
    safe = frame.copy()
    for column in text_columns:
        safe[column] = safe[column].map(neutralise_cell)
    return safe


def csv_target(path: str | os.PathLike[str]) -> Path:
    """``path`` if its directory exists. A missing directory is an error, never created: a typo in
    a cron line must not write somewhere unexpected and go unnoticed."""
    target = Path(path)
    parent = target.parent
    if not parent.is_dir():
        raise ConfigError(f"cannot write {target}: directory {parent} does not exist",
                          hint="create it first or fix the path")
    return target


def append_csv(path: str | os.PathLike[str], frame: pd.DataFrame) -> int:
    """Append rows to a CSV; the header only when the file is new or empty. An exclusive lock on
    the file keeps two cron runs from interleaving their rows. Returns the rows written."""
    target = csv_target(path)
    try:
        with open(target, "a", newline="", encoding="utf-8") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                handle.seek(0, os.SEEK_END)
                csv_safe(frame).to_csv(handle, header=handle.tell() == 0, index=False)
                handle.flush()
                os.fsync(handle.fileno())
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
    except OSError as exc:
        raise ConfigError(f"cannot write {target}: {exc.strerror or exc}",
                          hint="choose a writable path; the round is in history (`fleetctl telemetry export`)") from None
    return len(frame)


def write_csv(path: str | os.PathLike[str], frame: pd.DataFrame) -> None:
    """Replace ``path`` with the rows: written beside it, then renamed, so readers never see half."""
    from fleetctl.inventory.config import write_atomically

    target = csv_target(path)
    try:
        write_atomically(target, csv_safe(frame).to_csv(index=False), mode=0o644)
    except OSError as exc:
        raise ConfigError(f"cannot write {target}: {exc.strerror or exc}", hint="choose a writable path") from None


def csv_text(frame: pd.DataFrame) -> str:
    """The rows as CSV text (header included), neutralised as every file fleetctl writes."""
    return str(csv_safe(frame).to_csv(index=False))
