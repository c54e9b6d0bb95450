"""The tables of ``heartbeat``, ``demo`` and ``top``, laid out to fit the terminal.

Every cell is a :class:`rich.text.Text` built from :func:`fleetctl._text.one_line`: GPU names, errors
and agent names come from hosts and users, so they are data, never markup (a name ``[/]`` must not raise
``MarkupError``) and never control codes. A table never wraps: when it is wider than the terminal,
columns take their narrow form, then the least useful ones are dropped, then the flexible ones (names,
errors) are cut with an ellipsis. Each row stays one line, on a terminal or in a pipe.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

from rich.console import Console, ConsoleOptions, Group, RenderResult
from rich.table import Table
from rich.text import Text

from fleetctl._text import one_line
from fleetctl.hosts.core import HeartbeatRound
from fleetctl.telemetry.snapshot import GpuSample, TelemetrySnapshot

BAR_WIDTH = 20
GAP = 2  # what box=None with padding (0, 1) and pad_edge=False puts between two columns
KEEP = 100  # a column of at least this priority is never dropped
MIN_FLEX = 4  # the narrowest a flexible column gets when even the essentials do not fit
COMFORT = 24  # a flexible column this wide reads well (a whole GPU name, the gist of an error)

Justify = Literal["left", "right"]


def cell(value: object, style: str = "") -> Text:
    """One table cell: host or user data made visible, folded to one line, never parsed as markup."""
    return Text("" if value is None else one_line(value), style=style, no_wrap=True, overflow="ellipsis")


def _num(value: float | None, fmt: str = "{:.0f}") -> str:
    return "" if value is None else fmt.format(value)


@dataclass
class Column:
    """A column and its cells, with what the layout may do to it when space runs out."""

    header: str
    cells: list[Text] = field(default_factory=list)
    priority: int = KEEP  # lower is dropped first; KEEP and above never
    justify: Justify = "left"
    flex: int = 0  # > 0: cut with an ellipsis down to min_width; a lower number gets spare width first
    min_width: int = 0
    narrow_header: str | None = None  # a shorter form, taken before any column is dropped
    narrow_cells: list[Text] | None = None
    hide_empty: bool = False  # a column with no value in any row (ERROR when all is well) is left out
    narrowed: bool = False

    def add(self, wide: Text, narrow: Text | None = None) -> None:
        self.cells.append(wide)
        if narrow is not None:
            if self.narrow_cells is None:
                self.narrow_cells = []
            self.narrow_cells.append(narrow)

    @property
    def can_narrow(self) -> bool:
        return not self.narrowed and (self.narrow_header is not None or self.narrow_cells is not None)

    @property
    def shown_header(self) -> str:
        return (self.narrow_header or self.header) if self.narrowed else self.header

    @property
    def shown_cells(self) -> list[Text]:
        return (self.narrow_cells or self.cells) if self.narrowed else self.cells

    def natural(self) -> int:
        return max([len(self.shown_header), *(c.cell_len for c in self.shown_cells)])

    def least(self) -> int:
        return min(self.natural(), self.min_width) if self.flex else self.natural()

    def comfortable(self) -> int:
        return min(self.natural(), max(self.min_width, COMFORT)) if self.flex else self.natural()


def _need(columns: Sequence[Column], comfortable: bool = False) -> int:
    widths = (c.comfortable() if comfortable else c.least() for c in columns)
    return sum(widths) + GAP * max(0, len(columns) - 1)


def fit(columns: Sequence[Column], width: int) -> list[tuple[Column, int]]:
    """The columns to show at ``width`` and each one's width: narrow forms first (least important
    column first), then dropping columns, then flexible columns share what is left."""
    shown = [c for c in columns if not (c.hide_empty and not any(cell.plain for cell in c.cells))]
    for column in shown:
        column.narrowed = False
    by_priority = sorted(shown, key=lambda c: c.priority)
    # Short headers and compact values cost little, so they are taken to keep names readable;
    # columns are dropped only when even the least width of the flexible ones does not fit.
    for column in by_priority:
        if _need(shown, comfortable=True) <= width:
            break
        if column.can_narrow:
            column.narrowed = True
    for column in by_priority:
        if _need(shown) <= width:
            break
        if column.priority < KEEP:
            shown.remove(column)
    widths = {id(c): c.least() for c in shown}
    spare = width - _need(shown)
    flexible = sorted((c for c in shown if c.flex), key=lambda c: c.flex)
    if spare < 0:
        # Even the essentials are too wide (a very narrow terminal): cut the flexible columns further.
        for column in flexible:
            cut = min(-spare, widths[id(column)] - MIN_FLEX)
            if cut > 0:
                widths[id(column)] -= cut
                spare += cut
    # Spare width goes first to bring every flexible column to a readable width, then to show them whole.
    for target in (Column.comfortable, Column.natural):
        for column in flexible:
            grow = max(0, min(spare, target(column) - widths[id(column)]))
            widths[id(column)] += grow
            spare -= grow
    return [(c, widths[id(c)]) for c in shown]


class FitTable:
    """A renderable that lays its columns out for the width it is given, at render time; ``rows``
    (a slice of row indexes) shows part of it, with column widths still measured over every row, so
    that scrolling does not make the columns jump."""

    def __init__(self, columns: list[Column], rows: slice | None = None) -> None:
        self.columns = columns
        self.rows = rows

    def __len__(self) -> int:
        return len(self.columns[0].cells) if self.columns else 0

    def table(self, width: int) -> Table:
        table = Table(box=None, pad_edge=False, show_edge=False, expand=False)
        chosen = fit(self.columns, width)
        for column, column_width in chosen:
            table.add_column(column.shown_header, justify=column.justify, width=column_width, no_wrap=True,
                             overflow="ellipsis", header_style="bold")
        cells = [column.shown_cells[self.rows or slice(None)] for column, _ in chosen]
        for row in zip(*cells, strict=True):
            table.add_row(*row)
        return table

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield self.table(options.max_width)


def list_table(columns: Sequence[Column], rows: Sequence[Sequence[object]]) -> FitTable:
    """A plain list (jobs, agents) laid out like the heartbeat table: each value one line, the
    columns given cut or dropped by their own priority and flex before anything wraps."""
    for row in rows:
        for column, value in zip(columns, row, strict=True):
            column.add(cell(value))
    return FitTable(list(columns))


# -- heartbeat ---------------------------------------------------------------------------------
def _status(snap: TelemetrySnapshot) -> Text:
    return cell(snap.status, "" if snap.ok else "red")


def _gib(value: float | None) -> str:
    return "" if value is None else f"{value / 1024:.0f}"


def fleet_table(round_: HeartbeatRound) -> FitTable:
    """``heartbeat`` and ``demo``: one line per GPU, one per host without GPU data (with its error)."""
    agent = Column("AGENT", flex=2, min_width=8)
    status = Column("STATUS")
    index = Column("GPU", justify="right")
    name = Column("NAME", flex=1, min_width=22)
    memory = Column("MEM USED/TOTAL MiB", priority=60, narrow_header="MEM GiB")
    util = Column("UTIL%", priority=50, justify="right", narrow_header="UTIL")
    temp = Column("TEMP°C", priority=40, justify="right", narrow_header="TEMP")
    power = Column("POWER W", priority=30, justify="right", narrow_header="W")
    load = Column("LOAD", priority=20, justify="right")
    latency = Column("MS", priority=10, justify="right")
    error = Column("ERROR", flex=3, min_width=12, hide_empty=True)
    columns = [agent, status, index, name, memory, util, temp, power, load, latency, error]
    for snap in round_:
        rows: list[GpuSample | None] = list(snap.gpus) or [None]
        for gpu in rows:
            agent.add(cell(snap.agent))
            status.add(_status(snap))
            load.add(cell(_num(snap.host.load_1m, "{:.2f}")))
            latency.add(cell(_num(snap.latency_ms)))
            error.add(cell(snap.error if gpu is None else "", "red"))
            index.add(cell("" if gpu is None else _num(gpu.index, "{}")))
            name.add(cell(None if gpu is None else gpu.name))
            used, total = (None, None) if gpu is None else (gpu.memory_used_mib, gpu.memory_total_mib)
            both = used is not None or total is not None
            memory.add(cell(f"{_num(used)}/{_num(total)}" if both else ""),
                       cell(f"{_gib(used)}/{_gib(total)}" if both else ""))
            util.add(cell(None if gpu is None else _num(gpu.utilization_gpu_pct)))
            temp.add(cell(None if gpu is None else _num(gpu.temperature_c)))
            power.add(cell(None if gpu is None else _num(gpu.power_draw_w)))
    return FitTable(columns)


# -- top ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TopData:
    """One round as ``top`` shows it: the snapshots, each agent's health, and when it finished."""

    round_: HeartbeatRound
    health: Mapping[str, str]  # agent -> online / offline / unknown
    draining: frozenset[str]
    finished: datetime  # wall clock, local time


def power_text(gpu: GpuSample, unit: bool = True) -> str:
    """``36/290 W``, or ``36 W`` when the tool gives no limit (AMD often does not); never ``36/``."""
    if gpu.power_draw_w is None:
        return ""
    shown = _num(gpu.power_draw_w)
    if gpu.power_limit_w:
        shown += f"/{_num(gpu.power_limit_w)}"
    return f"{shown} W" if unit else shown


def _bar(used: float | None, total: float | None) -> Text:
    if used is None or not total:
        return Text("")
    share = max(0.0, min(1.0, used / total))
    filled = round(share * BAR_WIDTH)
    colour = "red" if share > 0.9 else "yellow" if share > 0.6 else "green"
    bar = Text("█" * filled, style=colour)
    bar.append("░" * (BAR_WIDTH - filled))
    bar.append(f" {share * 100:3.0f}%")
    return bar


def _share(used: float | None, total: float | None) -> str:
    return "" if used is None or not total else f"{max(0.0, min(1.0, used / total)) * 100:.0f}%"


def _rank(snap: TelemetrySnapshot, data: TopData) -> int:
    return 0 if not snap.ok else 1 if data.health.get(snap.agent) == "offline" else 2


def needs_attention(snap: TelemetrySnapshot, data: TopData) -> bool:
    return _rank(snap, data) < 2


def top_order(data: TopData) -> list[TelemetrySnapshot]:
    """Failed hosts, then offline ones, then the rest, each group as listed: a failure must not hide
    below the fold."""
    return sorted(data.round_, key=lambda snap: _rank(snap, data))


def top_table(data: TopData) -> FitTable:
    """``fleetctl top``: one line per GPU (one per host without GPU data), failed hosts first."""
    host = Column("HOST", flex=1, min_width=8)
    status = Column("STATUS")
    health = Column("HEALTH", priority=20)
    index = Column("GPU", justify="right")
    name = Column("NAME", flex=2, min_width=14)
    memory = Column("MEMORY", priority=60, narrow_header="MEM")
    util = Column("UTIL%", priority=50, justify="right", narrow_header="UTIL")
    temp = Column("TEMP°C", priority=40, justify="right", narrow_header="TEMP")
    power = Column("POWER", priority=30, justify="right", narrow_header="W")
    gpu_health = Column("GPU HEALTH", priority=45, flex=2, min_width=10, hide_empty=True)  # shown only when a GPU is not ok
    error = Column("ERROR", flex=3, min_width=20, hide_empty=True)
    columns = [host, status, health, index, name, memory, util, temp, power, gpu_health, error]
    for snap in top_order(data):
        state = data.health.get(snap.agent, "unknown")
        draining = snap.agent in data.draining
        rows: list[GpuSample | None] = list(snap.gpus) or [None]
        for gpu in rows:
            host.add(cell(snap.agent, "bold" if needs_attention(snap, data) else ""))
            status.add(_status(snap))
            health.add(cell(state + (", draining" if draining else ""),
                            "red" if state == "offline" else "yellow" if draining or state != "online" else ""))
            error.add(cell(snap.error if gpu is None else "", "red"))
            gpu_health.add(_gpu_health_cell(snap, gpu))
            if gpu is None:
                for column in (index, name, util, temp):
                    column.add(cell(""))
                memory.add(cell(""), cell(""))
                power.add(cell(""), cell(""))
                continue
            index.add(cell(_num(gpu.index, "{}")))
            name.add(cell(gpu.name))
            memory.add(_bar(gpu.memory_used_mib, gpu.memory_total_mib),
                       cell(_share(gpu.memory_used_mib, gpu.memory_total_mib)))
            util.add(cell(_num(gpu.utilization_gpu_pct)))
            temp.add(cell(_num(gpu.temperature_c)))
            power.add(cell(power_text(gpu)), cell(power_text(gpu, unit=False)))
    return FitTable(columns)


def _gpu_health_cell(snap: TelemetrySnapshot, gpu: GpuSample | None) -> Text:
    """Empty for a healthy GPU; else its verdict and why (``failed: Xid 79 (fallen off the bus) at 09:14``)."""
    if gpu is None or gpu.index is None or snap.gpu_health is None or not snap.ok:
        return cell("")
    verdict = snap.gpu_health.of(gpu.index)
    if verdict is None or (verdict.state == "ok" and verdict.quarantined is None):
        return cell("")
    why = verdict.reason.split(": ", 1)[-1]
    return cell(f"{verdict.state}: {why}" if why else verdict.state, "red" if verdict.state == "failed" else "yellow")


def _failed_gpus(round_: HeartbeatRound) -> int:
    return sum(1 for snap in round_ if snap.ok and snap.gpu_health for g in snap.gpu_health.gpus if g.state == "failed")


def _ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.0f} h ago"


def top_header(data: TopData | None, now: datetime) -> Text:
    """The first line of ``top``: the wall clock and the round's age, so that a still screen is
    visibly alive (or visibly stale), and how many hosts need attention."""
    line = Text(no_wrap=True, overflow="ellipsis")
    line.append(f"{now:%H:%M:%S}", style="bold")
    if data is None:
        line.append("  waiting for the first heartbeat round…")
        return line
    round_ = data.round_
    failed = len(round_.failed)
    offline = sum(1 for snap in round_ if data.health.get(snap.agent) == "offline")
    line.append(f"  {len(round_.ok)}/{len(round_)} hosts ok")
    if failed:
        line.append(f"  {failed} failed", style="red")
    if offline:
        line.append(f"  {offline} offline", style="red")
    failed_gpus = _failed_gpus(round_)
    if failed_gpus:
        line.append(f"  {failed_gpus} GPU{'s' if failed_gpus > 1 else ''} failed", style="red")
    line.append(f"  updated {_ago((now - data.finished).total_seconds())}"
                f" (round took {round_.duration_s * 1000:.0f} ms)")
    return line


HINT = "q/Esc quit · j/k ↑/↓ scroll · space/b PgDn/PgUp page"


@dataclass
class TopScreen:
    """What ``top`` shows in a terminal of a given size, and where the user has scrolled to."""

    data: TopData | None = None
    offset: int = 0
    page: int = 1  # rows that fit, as of the last render
    now: datetime = field(default_factory=datetime.now)

    def scroll(self, key: str) -> None:
        moves = {"j": 1, "down": 1, "k": -1, "up": -1, " ": self.page, "pgdn": self.page, "f": self.page,
                 "b": -self.page, "pgup": -self.page}
        if key in moves:
            self.offset += moves[key]
        elif key in ("g", "home"):
            self.offset = 0
        elif key in ("G", "end"):
            self.offset = 1 << 30
        self._clamp(self._rows())

    def _rows(self) -> int:
        return 0 if self.data is None else sum(len(s.gpus) or 1 for s in self.data.round_)

    def _clamp(self, rows: int) -> None:
        self.offset = max(0, min(self.offset, rows - self.page))

    def lines(self, width: int, height: int) -> Iterator[Text | FitTable]:
        """Exactly ``height`` lines or fewer: header, table header, the rows that fit, the hint."""
        yield top_header(self.data, self.now)
        if self.data is None:
            return
        table = top_table(self.data)
        self.page = max(1, height - 3)
        self._clamp(len(table))
        table.rows = slice(self.offset, self.offset + self.page)
        yield table
        last = min(len(table), self.offset + self.page)
        hint = Text(f"rows {self.offset + 1 if len(table) else 0}-{last} of {len(table)} · {HINT}", style="dim")
        hint.truncate(width, overflow="ellipsis")
        yield hint

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        width = options.max_width
        for line in self.lines(width, options.height or console.height):
            if isinstance(line, Text):
                line.no_wrap = True
                line.overflow = "ellipsis"
            yield line


def top_frame(data: TopData, now: datetime) -> Group:
    """One whole frame for a pipe or ``--once``: header and every row, no hint, no scrolling.
    (A Group, because ``Console.print`` merges loose Text objects and loses their ``no_wrap``.)"""
    return Group(top_header(data, now), top_table(data))
