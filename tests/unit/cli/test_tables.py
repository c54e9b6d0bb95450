"""The table builders laid out at 80 columns: one line per row, data never read as markup."""

from __future__ import annotations

import io
from datetime import datetime, timedelta, timezone

import pytest
from rich.console import Console, RenderableType

from fleetctl.cli.keys import parse
from fleetctl.cli.tables import TopData, TopScreen, fleet_table, power_text, top_frame, top_table
from fleetctl.fleet import HeartbeatRound
from fleetctl.telemetry.snapshot import GpuSample, TelemetrySnapshot

pytestmark = pytest.mark.no_store  # never opens a store: the PostgreSQL pass deselects it

NOW = datetime(2026, 5, 1, 12, 0, 0, tzinfo=timezone.utc)
H100 = "NVIDIA H100 80GB HBM3"
LONG_ERROR = ("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.\n"
              "Make sure that the latest NVIDIA driver is installed and running.")


def gpu(index: int, name: str | None = H100, vendor: str = "nvidia", limit: float | None = 700.0) -> GpuSample:
    return GpuSample(index=index, name=name, vendor=vendor, memory_total_mib=81559, memory_used_mib=40000,  # type: ignore[arg-type]
                     utilization_gpu_pct=3, temperature_c=41, power_draw_w=36, power_limit_w=limit)


def snap(agent: str, *gpus: GpuSample, status: str = "ok", error: str | None = None) -> TelemetrySnapshot:
    return TelemetrySnapshot(agent=agent, timestamp=NOW, status=status, error=error, latency_ms=12,  # type: ignore[arg-type]
                             gpus=list(gpus))


def render(renderable: RenderableType, width: int = 80, height: int = 24) -> list[str]:
    console = Console(width=width, height=height, file=io.StringIO(), color_system=None, legacy_windows=False)
    console.print(renderable)
    text = console.file.getvalue()  # type: ignore[attr-defined]
    return [line.rstrip() for line in text.splitlines()]


def assert_fits(lines: list[str], width: int = 80) -> None:
    assert all(len(line) <= width for line in lines), [line for line in lines if len(line) > width]


FLEET = HeartbeatRound([
    snap("gpu-1", gpu(0), gpu(1)),
    snap("gpu-2", gpu(0, "Arcturus GL-XL [Instinct MI100]", "amd", limit=None)),
    snap("a-host-with-a-rather-long-inventory-name", gpu(0, "NVIDIA GeForce RTX 4090 with a very long marketing name")),
    snap("broken", status="driver_error", error=LONG_ERROR),
], 0.25)


def test_heartbeat_table_at_80_columns_keeps_header_and_names_on_one_line() -> None:
    lines = render(fleet_table(FLEET))
    assert_fits(lines)
    assert len(lines) == 1 + 5  # the header and one line per GPU or failed host: nothing wrapped
    assert lines[0].split()[:4] == ["AGENT", "STATUS", "GPU", "NAME"]
    assert H100 in lines[1]
    assert lines[5].startswith("broken") and "NVIDIA-SMI" in lines[5] and "…" in lines[5]  # cut, on its line


def test_heartbeat_table_when_piped_is_one_line_per_row_with_everything() -> None:
    lines = render(fleet_table(FLEET), width=200)
    assert len(lines) == 6
    assert "MEM USED/TOTAL MiB" in lines[0] and "POWER W" in lines[0] and "LOAD" in lines[0]
    assert "Arcturus GL-XL [Instinct MI100]" in lines[3]


@pytest.mark.parametrize("name", ["[/]", "[link=https://evil.example]click[/link]", "[bold red]x", "a\x1b]0;t\x07b\nc"])
def test_host_strings_are_text_never_markup_or_controls(name: str) -> None:
    round_ = HeartbeatRound([snap(f"agent{name}", gpu(0, name)), snap("down", status="unreachable", error=name)], 0.1)
    data = TopData(round_, {}, frozenset(), datetime.now())
    console = Console(width=200, file=io.StringIO(), force_terminal=True, color_system="truecolor")
    for renderable in (fleet_table(round_), top_table(data), TopScreen(data)):
        console.print(renderable)  # a MarkupError here is the bug
    printed = console.file.getvalue()  # type: ignore[attr-defined]
    assert "\x1b]8;" not in printed  # no OSC 8 hyperlink
    assert "\x07" not in printed  # no bell, no window title
    lines = render(fleet_table(round_), width=200)
    assert len(lines) == 3  # a newline in a name does not start a row of its own
    plain = "\n".join(lines)
    if "\x1b" not in name:
        assert name.replace("\n", " ") in plain
    else:
        assert "\\x1b]0;t\\x07b c" in plain


def test_amd_power_without_limit_is_never_a_dangling_slash() -> None:
    amd = gpu(0, "AMD Instinct MI210", "amd", limit=None)
    assert power_text(amd) == "36 W" and power_text(gpu(0)) == "36/700 W"
    assert power_text(amd, unit=False) == "36"
    data = TopData(HeartbeatRound([snap("amd", amd)], 0.1), {"amd": "online"}, frozenset(), datetime.now())
    for width in (80, 200):
        text = "\n".join(render(top_table(data), width=width))
        assert "36" in text and "36/" not in text


def _top_data() -> TopData:
    round_ = HeartbeatRound([snap(f"h{n:02d}", gpu(0), gpu(1)) for n in range(30)]
                            + [snap("zz-down", status="unreachable", error=LONG_ERROR)], 0.5)
    # h05 answered this round but health still says offline (it was gone for a while): first too.
    return TopData(round_, {**{f"h{n:02d}": "online" for n in range(30)}, "h05": "offline", "zz-down": "offline"},
                   frozenset({"h07"}), datetime.now() - timedelta(seconds=3))


def test_top_screen_at_80x24_sorts_failures_first_and_pages() -> None:
    screen = TopScreen(_top_data(), now=datetime.now())
    lines = render(screen)
    assert_fits(lines)
    assert len(lines) == 24
    assert "updated 3s ago" in lines[0] and "1 failed" in lines[0] and "2 offline" in lines[0]
    assert lines[1].startswith("HOST") and "ERROR" in lines[1]
    assert lines[2].startswith("zz-down") and "unreachable" in lines[2]
    assert lines[3].startswith("h05") and lines[4].startswith("h05")
    assert lines[-1].startswith("rows 1-21 of 61") and "q/Esc quit" in lines[-1]
    screen.scroll(" ")
    assert render(screen)[-1].startswith("rows 22-42 of 61")
    screen.scroll("G")
    lines = render(screen)
    assert lines[-1].startswith("rows 41-61 of 61") and lines[-2].startswith("h29")
    screen.scroll("k")
    screen.scroll("up")
    assert render(screen)[-1].startswith("rows 39-59 of 61")
    screen.scroll("g")
    assert render(screen)[-1].startswith("rows 1-21")


def test_top_frame_for_pipes_has_every_row_and_no_hint() -> None:
    lines = render(top_frame(_top_data(), datetime.now()))
    assert_fits(lines)
    assert len(lines) == 1 + 1 + 61 and not any("q/Esc" in line for line in lines)


def test_top_at_wide_terminal_shows_bar_health_and_power() -> None:
    lines = render(TopScreen(_top_data(), now=datetime.now()), width=200)
    assert "HEALTH" in lines[1] and "POWER" in lines[1] and "MEMORY" in lines[1]
    assert any("online, draining" in line for line in lines)
    assert any("36/700 W" in line and "█" in line for line in lines)


def test_key_parsing() -> None:
    assert parse("q") == ["q"]
    assert parse("\x1b") == ["esc"]
    assert parse("\x1b[A\x1bOB\x1b[5~\x1b[6~j k") == ["up", "down", "pgup", "pgdn", "j", " ", "k"]
    assert parse("\x1b[1;5A") == []  # an unknown sequence is skipped whole, not read as Esc then "A"
    assert parse("\x1bq") == ["esc", "q"]


def test_lists_fit_80_columns_one_line_per_row() -> None:
    from fleetctl.cli.tables import Column, list_table

    columns = [Column("ID"), Column("NAME", priority=40, flex=2, min_width=6), Column("STATE"),
               Column("REASON", priority=70, flex=1, min_width=12), Column("COMMAND", priority=20, flex=4, min_width=10)]
    rows = [("j0123456789", "a very long job name " * 5, "queued", "waiting for 4 free GPUs on agents matching x " * 3,
             "python3 train.py " * 10), ("j1", "[/]\x1b]0;t\x07", "running", "", "sh")]
    console = Console(width=80, file=io.StringIO(), color_system=None)
    console.print(list_table(columns, rows))
    lines = console.file.getvalue().splitlines()  # type: ignore[attr-defined]
    assert len(lines) == 3 and all(len(line) <= 80 for line in lines)
    assert "\\x1b" in lines[2] and "\x1b" not in lines[2]
