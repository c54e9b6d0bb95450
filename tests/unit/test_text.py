"""Text shown safely, CSV cells neutralised, one JSON time format, short reprs: pure, no I/O but tmp files."""

from __future__ import annotations

import csv
import io
import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from rich.text import Text

from fleetctl._text import one_line, visible
from fleetctl.cli.common import _Console, iso_utc, json_ready, parse_labels
from fleetctl.errors import ConfigError
from fleetctl.fleet import HeartbeatRound
from fleetctl.jobs.model import JobRecord, JobResult, JobSpec
from fleetctl.telemetry.frames import append_csv, csv_safe, csv_text, neutralise_cell, to_dataframe, write_csv
from fleetctl.telemetry.snapshot import GpuSample, TelemetrySnapshot

pytestmark = pytest.mark.no_store  # never opens a store: the PostgreSQL pass deselects it

HOSTILE = "[/][link=http://evil]x[/link]\x1b]0;pwned\x07\x1b]8;;http://evil\x1b\\\x9b31m\u202ename"
NOW = datetime(2026, 11, 2, 9, 15, 4, 123456, tzinfo=timezone.utc)


def _raw_controls(text: str) -> list[str]:
    return [c for c in text if ord(c) < 0x20 or 0x7f <= ord(c) <= 0x9f or 0x202a <= ord(c) <= 0x202e]


def test_visible_shows_every_control_character_as_an_escape() -> None:
    shown = visible(HOSTILE)
    assert _raw_controls(shown) == []
    assert "\\x1b]0;pwned\\x07" in shown and "\\x9b31m" in shown and "\\u202e" in shown
    assert "[/][link=http://evil]" in shown  # markup characters are data: kept, and printed with markup off


def test_one_line_folds_whitespace_and_cuts() -> None:
    assert one_line("a\n\n b\tc\r\n") == "a b c"
    assert one_line("x" * 500, limit=10) == "xxxxxxx..."


def test_console_prints_markup_as_text_and_no_color_drops_all_styling(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_COLOR", raising=False)
    styled = io.StringIO()
    _Console(file=styled, force_terminal=True, width=200).print(Text("bold", style="bold italic red"))
    assert "\x1b[" in styled.getvalue()  # the check below would pass vacuously otherwise
    monkeypatch.setenv("NO_COLOR", "1")
    plain = io.StringIO()
    console = _Console(file=plain, force_terminal=True, width=200)
    console.print(Text("bold", style="bold italic red"))
    console.print("[/] [blink]x[/blink] :smile:")  # would raise MarkupError with markup on
    assert plain.getvalue() == "bold\n[/] [blink]x[/blink] :smile:\n"


def test_env_flag_hint_names_the_env_flag() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_labels(("gpu_type",), "--env")
    assert "--env NAME=value" in str(caught.value) and "gpu_type=a100" not in str(caught.value)
    with pytest.raises(ConfigError, match="--label gpu_type=a100"):
        parse_labels(("=x",))
    assert parse_labels(("A=1", "B=x=y"), "--env") == {"A": "1", "B": "x=y"}


# -- CSV ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("cell", ["=1+1", "+1", "-1", "@SUM(A1)", "\tx", "\rx", "=HYPERLINK(\"http://e\")"])
def test_formula_cells_get_a_leading_quote(cell: str) -> None:
    assert neutralise_cell(cell) == "'" + cell


@pytest.mark.parametrize("cell", ["NVIDIA H100", "", "a=b", "1-2", -1.5, 0, None, float("nan")])
def test_other_cells_are_untouched(cell: object) -> None:
    assert neutralise_cell(cell) is cell


def _snapshot(name: str, error: str | None = None, power: float | None = -3.5) -> TelemetrySnapshot:
    gpu = GpuSample(index=0, uuid="@uuid", name=name, vendor="nvidia", memory_total_mib=80.0, power_draw_w=power)
    return TelemetrySnapshot(agent="gpu-1", hostname="h", timestamp=NOW, status="ok" if error is None else "driver_error",
                             error=error, gpus=[gpu] if error is None else [])


def test_csv_neutralises_text_columns_and_keeps_numbers() -> None:
    frame = to_dataframe([_snapshot("=cmd|' /C calc'!A0"), _snapshot("x", error="-bash: nvidia-smi: not found")])
    rows = list(csv.DictReader(io.StringIO(csv_text(frame))))
    assert rows[0]["gpu_name"] == "'=cmd|' /C calc'!A0"
    assert rows[0]["gpu_uuid"] == "'@uuid"
    assert rows[0]["power_draw_w"] == "-3.5"  # a negative number in a numeric column stays a number
    assert rows[1]["error"] == "'-bash: nvidia-smi: not found"
    assert frame.loc[0, "gpu_name"] == "=cmd|' /C calc'!A0"  # the caller's frame is not changed
    numbers = frame[["power_draw_w", "memory_total_mib"]]
    assert csv_safe(numbers) is numbers  # nothing to neutralise: no copy


def test_csv_writers_neutralise_and_never_create_a_missing_directory(tmp_path: Path) -> None:
    frame = to_dataframe([_snapshot("+danger")])
    appended, replaced = tmp_path / "a.csv", tmp_path / "b.csv"
    append_csv(appended, frame)
    write_csv(replaced, frame)
    for path in (appended, replaced):
        assert next(csv.DictReader(path.open()))["gpu_name"] == "'+danger"
    missing = tmp_path / "nonexistent-dir" / "x.csv"
    for writer in (append_csv, write_csv):
        with pytest.raises(ConfigError, match="does not exist") as caught:
            writer(missing, frame)
        assert "\n" not in str(caught.value)
    assert not missing.parent.exists()


# -- one time format ---------------------------------------------------------------------------

def test_iso_utc_is_one_format_for_every_kind_of_time() -> None:
    assert iso_utc(NOW) == "2026-11-02T09:15:04.123456Z"
    assert iso_utc(NOW.replace(microsecond=0)) == "2026-11-02T09:15:04Z"
    assert iso_utc(NOW.timestamp()) == "2026-11-02T09:15:04.123456Z"
    assert iso_utc(NOW.astimezone(timezone(timedelta(hours=2)))) == "2026-11-02T09:15:04.123456Z"
    assert iso_utc(NOW.replace(tzinfo=None)) == "2026-11-02T09:15:04.123456Z"  # naive times are UTC


def test_json_ready_matches_pydantic_and_converts_loose_datetimes() -> None:
    snap = _snapshot("x")
    dumped = json_ready({"snap": snap, "at": NOW.astimezone(timezone(timedelta(hours=-5))), "n": [1.5]})
    assert dumped["snap"]["timestamp"] == iso_utc(NOW) == snap.model_dump(mode="json")["timestamp"]
    assert dumped["at"] == iso_utc(NOW) and dumped["n"] == [1.5]
    assert "+00:00" not in json.dumps(dumped)


# -- reprs -------------------------------------------------------------------------------------

def _record(**fields: object) -> JobRecord:
    return JobRecord(id="j0123456789", state="running", spec=JobSpec(command=["python3", "-c", "x" * 5000]),
                     submitted=NOW, **fields)  # type: ignore[arg-type]


def test_reprs_are_one_short_line() -> None:
    ok, failed = _snapshot("NVIDIA H100 " * 100), _snapshot("x", error="connection refused\n" * 100 + "\x1b[2J")
    result = JobResult(exit_code=0, agent="gpu-3", gpus=["GPU-1", "GPU-2"], output={"big": "x" * 10000})
    record = _record(name="train", agent="gpu-3", result=result)
    round_ = HeartbeatRound([ok, failed], duration_s=0.25)
    for thing in (ok, failed, result, record, round_, [ok, failed]):
        text = repr(thing)
        assert "\n" not in text and len(text) < 200 and _raw_controls(text) == [], text
    assert repr(ok) == "<TelemetrySnapshot gpu-1 ok, 1 GPUs>"
    assert repr(failed).startswith("<TelemetrySnapshot gpu-1 driver_error: connection refused")
    assert repr(result) == "<JobResult exit 0 on gpu-3, 2 GPUs>"
    assert repr(record) == "<JobRecord j0123456789 'train' running on gpu-3>"
    assert repr(JobResult(signal=9, timed_out=True)) == "<JobResult timed out, 0 GPUs>"
    assert repr(round_) == "<HeartbeatRound 1 ok, 1 failed, 0.25s>"
