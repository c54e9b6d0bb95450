"""The GPU health judgment table and judge() (issue 22): table-driven."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

import fleetctl.telemetry.gpu_health as gpu_health
from fleetctl.errors import ConfigError
from fleetctl.telemetry.gpu_health import DEFAULT_TABLE, Rule, judge, table_markdown, table_with
from fleetctl.telemetry.parsers.findings import KINDS, Finding
from fleetctl.telemetry.parsers.nvidia_health import findings_of, parse_health_csv
from fleetctl.telemetry.parsers.xid import parse_kernel_log
from tests.shared import FIXTURES

NOW = datetime(2026, 9, 14, 9, 20, tzinfo=timezone.utc).timestamp()
AT_0914 = datetime(2026, 9, 14, 9, 14, 31, tzinfo=timezone.utc).timestamp()


def xid(code: int, gpu: int | None = 0, at: float = AT_0914) -> Finding:
    return Finding("xid", gpu=gpu, code=str(code), at=at, bus_id=None if gpu is not None else "0000:99:00")


def test_the_docstring_table_is_the_table() -> None:
    assert table_markdown() in (gpu_health.__doc__ or "")


def test_every_finding_kind_has_an_entry() -> None:
    assert set(KINDS) <= {key.partition(":")[0] for key in DEFAULT_TABLE}
    assert all(key.partition(":")[0] in KINDS for key in DEFAULT_TABLE)


@pytest.mark.parametrize("code", [13, 31, 43, 45, 32, 68, 69])
def test_a_single_application_xid_quarantines_nothing(code: int) -> None:
    verdict = judge([xid(code)], now=NOW, gpus=[0, 1])
    assert verdict.quarantined() == [] and verdict.gpus[0].state == "ok" and verdict.gpus[1].state == "ok"
    assert verdict.gpus[0].reason.startswith(f"GPU 0: Xid {code}")  # shown, not acted on


@pytest.mark.parametrize("code", [48, 63, 64, 74, 79, 92, 94, 95, 119, 120])
def test_a_fatal_xid_fails_that_gpu_only(code: int) -> None:
    verdict = judge([xid(code, gpu=2)], now=NOW, gpus=range(4))
    assert verdict.quarantined() == [2]
    assert {i: v.state for i, v in verdict.gpus.items()} == {0: "ok", 1: "ok", 2: "failed", 3: "ok"}


def test_the_reason_is_one_line_naming_gpu_xid_and_time() -> None:
    assert judge([xid(79, gpu=2)], now=NOW).gpus[2].reason == "GPU 2: Xid 79 (fallen off the bus) at 09:14"


CASES = [
    # (findings, gpu 0's expected state)
    ([xid(13, at=NOW - 60 * i) for i in range(5)], "degraded"),    # 5 in 10 min
    ([xid(13, at=NOW - 60 * i) for i in range(4)], "ok"),          # 4 are not a storm
    ([xid(13, at=NOW - 3600 - 60 * i) for i in range(9)], "ok"),   # a storm an hour ago has passed
    ([xid(45, at=NOW - 30 * i) for i in range(9)], "ok"),          # Xid 45 needs 10
    ([xid(45, at=NOW - 30 * i) for i in range(10)], "degraded"),
    ([xid(13, at=NOW - 10 * i) for i in range(100)], "degraded"),  # hundreds never quarantine
    ([xid(13), xid(79)], "failed"),
    ([xid(777)], "degraded"),                                      # an unlisted Xid: warn
    ([Finding("ecc_uncorrected_volatile", gpu=0, value=2)], "failed"),
    ([Finding("ecc_uncorrected_aggregate", gpu=0, value=2)], "degraded"),
    ([Finding("ecc_corrected_volatile", gpu=0, value=20)], "ok"),
    ([Finding("remap_pending", gpu=0)], "failed"),
    ([Finding("remap_failure", gpu=0)], "failed"),
    ([Finding("remap_uncorrectable", gpu=0, value=1)], "degraded"),
    ([Finding("retired_pages_pending", gpu=0)], "failed"),
    ([Finding("clock_hw_slowdown", gpu=0)], "degraded"),
    ([Finding("pcie_width_degraded", gpu=0, value=4, detail="x4 of x16")], "degraded"),
    ([Finding("recovery_action", gpu=0, code="drain_p2p")], "degraded"),
    ([Finding("recovery_action", gpu=0, code="reset")], "failed"),
    ([Finding("recovery_action", gpu=0, code="something_new")], "failed"),
    ([Finding("gpu_requires_reset", gpu=0)], "failed"),
    ([Finding("value_error", gpu=0)], "degraded"),
    ([Finding("gpu_missing", gpu=0, bus_id="0000:18:00")], "failed"),
    ([], "ok"),
]


@pytest.mark.parametrize(("findings", "state"), CASES)
def test_the_table(findings: list[Finding], state: str) -> None:
    assert judge(findings, now=NOW, gpus=[0]).gpus[0].state == state


def test_a_repeated_storm_says_how_many_and_when() -> None:
    reason = judge([xid(13, at=NOW - 60 * i) for i in range(6)], now=NOW).gpus[0].reason
    assert reason == "GPU 0: Xid 13 (graphics engine exception) x6 in 10 min at 09:20"


def test_history_counts_toward_the_window() -> None:
    history = [xid(31, at=NOW - 100 * i) for i in range(1, 5)]
    assert judge([xid(31, at=NOW)], now=NOW, history=history).gpus[0].state == "degraded"
    assert judge([xid(31, at=NOW)], now=NOW).gpus[0].state == "ok"


def test_worst_finding_wins_and_reasons_are_worst_first() -> None:
    verdict = judge([Finding("clock_hw_slowdown", gpu=1), Finding("remap_pending", gpu=1),
                     Finding("ecc_corrected_volatile", gpu=1, value=3)], now=NOW).gpus[1]
    assert verdict.state == "failed"
    assert verdict.reasons == ("GPU 1: row remap pending (reset needed)", "GPU 1: hardware slowdown",
                               "GPU 1: corrected ECC errors (3)")


@pytest.mark.parametrize("kind", ["health_unreadable", "tool_hung"])
def test_a_host_that_cannot_be_read_is_unknown_never_healthy(kind: str) -> None:
    verdict = judge([Finding(kind, detail="nvidia-smi timed out")], now=NOW, gpus=[0, 1])
    assert verdict.host.state == "unknown"
    assert {v.state for v in verdict.gpus.values()} == {"unknown"}
    assert verdict.gpus[0].reason.startswith("GPU 0: ")
    # ... but what is known to be failed stays failed.
    both = judge([Finding(kind), xid(79, gpu=1)], now=NOW, gpus=[0, 1])
    assert both.gpus[1].state == "failed" and both.gpus[0].state == "unknown"


def test_an_unreadable_journal_alone_keeps_gpus_ok_and_says_so() -> None:
    verdict = judge([Finding("journal_unreadable", detail="add the user to group adm")], now=NOW, gpus=[0])
    assert verdict.gpus[0].state == "ok" and verdict.host.state == "ok"
    assert "kernel log not readable" in verdict.host.reason


def test_an_xid_on_an_unknown_bus_is_the_hosts() -> None:
    verdict = judge([xid(79, gpu=None)], now=NOW, gpus=[0])
    assert verdict.host.state == "failed" and verdict.gpus[0].state == "ok"
    assert verdict.host.reason == "GPU at 0000:99:00: Xid 79 (fallen off the bus) at 09:14"


def test_gpu_count_below_last_known_is_failed_for_the_host() -> None:
    verdict = judge([Finding("gpu_missing", value=1, detail="7 of 8 GPUs answer")], now=NOW, gpus=range(7))
    assert verdict.host.state == "failed" and verdict.host.reason == "host: GPU missing since the last heartbeat (7 of 8 GPUs answer)"


# --- overrides --------------------------------------------------------------------------------------


def test_overrides_change_an_entry_and_add_one() -> None:
    overrides = {"xid:79": "degraded", "pcie_width_degraded": "ok", "xid:13": {"repeat": 2, "window_s": 60},
                 "xid:777": "failed"}
    findings = [xid(79), Finding("pcie_width_degraded", gpu=1), xid(13, gpu=2, at=NOW), xid(13, gpu=2, at=NOW - 30),
                xid(777, gpu=3)]
    verdict = judge(findings, now=NOW, overrides=overrides)
    assert [verdict.gpus[i].state for i in range(4)] == ["degraded", "ok", "degraded", "failed"]
    table = table_with(overrides)
    assert table["xid:13"] == Rule("ok", DEFAULT_TABLE["xid:13"].label, repeat=2, window_s=60.0, repeat_verdict="degraded")
    assert DEFAULT_TABLE["xid:79"].verdict == "failed"  # the default is untouched


BAD_OVERRIDES = [
    ({"xid:79": "fatal"}, "'fatal' is not a verdict"),
    ({"no_such_thing": "ok"}, "no such finding"),
    ({"xid:abc": "ok"}, "no such finding"),
    ({"xid:13": {"repeat": -1}}, "is not a count"),
    ({"xid:13": {"repeat": True}}, "is not a count"),
    ({"xid:13": {"window_s": "10m"}}, "is not a window"),
    ({"xid:13": {"colour": "red"}}, "unknown field 'colour'"),
    ({"xid:13": 5}, "neither a verdict nor a table"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD_OVERRIDES)
def test_a_bad_override_is_one_clear_config_error(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        table_with(overrides)
    assert message in str(caught.value) and "[controller] gpu_health" in str(caught.value) and caught.value.hint


# --- parsers to verdicts, end to end on fixtures -------------------------------------------------------


def test_fixture_faults_judge_to_the_expected_verdicts() -> None:
    findings = findings_of(parse_health_csv((FIXTURES / "health" / "nvidia_health_faults.csv").read_text()))
    verdict = judge(findings, now=NOW, gpus=range(4))
    assert {i: v.state for i, v in verdict.gpus.items()} == {0: "ok", 1: "failed", 2: "failed", 3: "degraded"}
    assert verdict.gpus[2].reasons[0].startswith("GPU 2: ")


def test_journal_fixture_judges_to_the_expected_verdicts() -> None:
    scan = parse_kernel_log((FIXTURES / "health" / "journal_short_iso.txt").read_text(),
                            {"00000000:3B:00.0": 0, "00000000:86:00.0": 1, "00000000:AF:00.0": 2})
    verdict = judge(scan.findings, now=NOW, gpus=range(4))
    assert {i: v.state for i, v in verdict.gpus.items()} == {0: "failed", 1: "ok", 2: "failed", 3: "ok"}
    assert verdict.gpus[2].reason == "GPU 2: Xid 79 (fallen off the bus) at 09:14"
