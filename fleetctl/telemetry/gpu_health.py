"""GPU health judgment: findings in, one verdict per GPU out, with a one-line reason. Pure; no I/O.

Each finding (see :mod:`fleetctl.telemetry.parsers.findings`) is looked up in one table, first by
``kind:code`` (``xid:79``, ``recovery_action:reset``), then by ``kind`` alone. A verdict is

* ``ok``: recorded and exported, nothing else;
* ``degraded``: warn (``agents show``, ``top``, metrics), keep placing jobs;
* ``failed``: quarantine the GPU: no job is placed on it until it is cleared or the finding is gone;
* ``unknown``: the host's health could not be read: never shown as healthy.

A GPU's verdict is its worst finding's (ok < unknown < degraded < failed). A rule with ``repeat``
gives ``repeat_verdict`` instead when that many findings of its key on one GPU fall within
``window_s`` before ``now``: application Xids alone never quarantine, a storm of them degrades.
The table (README-ready; ``tests/unit/telemetry/test_gpu_health.py`` keeps it equal to :data:`DEFAULT_TABLE`):

| finding | verdict | repeated | meaning |
|---|---|---|---|
| `xid:13` | ok | 5 in 10 min: degraded | graphics engine exception (the application's fault) |
| `xid:31` | ok | 5 in 10 min: degraded | GPU memory page fault (the application's fault) |
| `xid:32` | ok | 5 in 10 min: degraded | invalid or corrupted push buffer stream |
| `xid:43` | ok | 5 in 10 min: degraded | GPU stopped processing (the application's fault) |
| `xid:45` | ok | 10 in 10 min: degraded | preemptive cleanup after earlier errors |
| `xid:68` | ok | 5 in 10 min: degraded | video processor exception |
| `xid:69` | ok | 5 in 10 min: degraded | graphics engine class error |
| `xid:48` | failed | | double-bit ECC error |
| `xid:61` | degraded | | internal micro-controller breakpoint/warning |
| `xid:62` | failed | | internal micro-controller halt |
| `xid:63` | failed | | ECC page retirement or row remap recorded (reset needed) |
| `xid:64` | failed | | ECC page retirement or row remap recording failure |
| `xid:74` | failed | | NVLink error |
| `xid:79` | failed | | fallen off the bus |
| `xid:92` | failed | | high single-bit ECC error rate |
| `xid:94` | failed | | contained ECC error |
| `xid:95` | failed | | uncontained ECC error |
| `xid:119` | failed | | GSP RPC timeout |
| `xid:120` | failed | | GSP error |
| `xid:140` | failed | | unrecovered ECC error |
| `xid:154` | degraded | | GPU recovery action changed |
| `xid` | degraded | | an Xid not listed above |
| `ecc_uncorrected_volatile` | failed | | uncorrectable ECC errors since the driver loaded |
| `ecc_uncorrected_aggregate` | degraded | | uncorrectable ECC errors over the GPU's life |
| `ecc_corrected_volatile` | ok | | corrected ECC errors |
| `ecc_deferred` | degraded | | deferred ECC errors |
| `retired_pages_pending` | failed | | page retirement pending (reset needed) |
| `retired_pages_dbe` | degraded | | pages retired for double-bit errors |
| `retired_pages_sbe` | ok | | pages retired for single-bit errors |
| `retired_pages_limit` | failed | | retired pages at the replacement limit |
| `bad_page_threshold_exceeded` | failed | | bad pages past the board's threshold |
| `remap_pending` | failed | | row remap pending (reset needed) |
| `remap_failure` | failed | | row remap failed: no spare rows |
| `remap_uncorrectable` | degraded | | rows remapped for uncorrectable errors |
| `clock_hw_slowdown` | degraded | | hardware slowdown |
| `clock_hw_thermal_slowdown` | degraded | | hardware thermal slowdown |
| `clock_hw_power_brake` | degraded | | hardware power brake slowdown |
| `clock_sw_thermal_slowdown` | ok | | software thermal slowdown |
| `pcie_width_degraded` | degraded | | PCIe link narrower than its max |
| `pcie_gen_degraded` | degraded | | PCIe link slower than its max under load |
| `recovery_action:drain_p2p` | degraded | | driver asks to drain peer-to-peer traffic |
| `recovery_action` | failed | | driver asks for a reset, a reboot or a drain and reset |
| `gpu_requires_reset` | failed | | GPU requires reset |
| `value_error` | degraded | | the driver reads a field as an error |
| `gpu_missing` | failed | | GPU missing since the last heartbeat |
| `tool_hung` | unknown | | GPU tool did not answer |
| `health_unreadable` | unknown | | health not readable |
| `journal_unreadable` | ok | | kernel log not readable: Xids unseen |

Overrides (a later ``[controller]`` setting passes them to :func:`table_with`) map a key to a
verdict, or to a table of the rule's fields::

    {"xid:45": "ok", "pcie_width_degraded": "ok",
     "xid:13": {"verdict": "ok", "repeat": 20, "window_s": 3600, "repeat_verdict": "degraded"}}
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone, tzinfo
from typing import Literal

from fleetctl.errors import ConfigError
from fleetctl.telemetry.parsers.findings import KINDS, Finding

Verdict = Literal["ok", "unknown", "degraded", "failed"]
VERDICTS: tuple[Verdict, ...] = ("ok", "unknown", "degraded", "failed")  # worst last
_RANK = {v: i for i, v in enumerate(VERDICTS)}


@dataclass(frozen=True)
class Rule:
    verdict: Verdict
    label: str
    repeat: int = 0                        # this many findings of the key on one GPU ...
    window_s: float = 0.0                  # ... within this many seconds before now ...
    repeat_verdict: Verdict = "degraded"   # ... give this verdict instead


def _app(label: str, repeat: int = 5) -> Rule:
    return Rule("ok", label, repeat=repeat, window_s=600.0, repeat_verdict="degraded")


DEFAULT_TABLE: Mapping[str, Rule] = {
    "xid:13": _app("graphics engine exception (the application's fault)"),
    "xid:31": _app("GPU memory page fault (the application's fault)"),
    "xid:32": _app("invalid or corrupted push buffer stream"),
    "xid:43": _app("GPU stopped processing (the application's fault)"),
    "xid:45": _app("preemptive cleanup after earlier errors", repeat=10),
    "xid:68": _app("video processor exception"),
    "xid:69": _app("graphics engine class error"),
    "xid:48": Rule("failed", "double-bit ECC error"),
    "xid:61": Rule("degraded", "internal micro-controller breakpoint/warning"),
    "xid:62": Rule("failed", "internal micro-controller halt"),
    "xid:63": Rule("failed", "ECC page retirement or row remap recorded (reset needed)"),
    "xid:64": Rule("failed", "ECC page retirement or row remap recording failure"),
    "xid:74": Rule("failed", "NVLink error"),
    "xid:79": Rule("failed", "fallen off the bus"),
    "xid:92": Rule("failed", "high single-bit ECC error rate"),
    "xid:94": Rule("failed", "contained ECC error"),
    "xid:95": Rule("failed", "uncontained ECC error"),
    "xid:119": Rule("failed", "GSP RPC timeout"),
    "xid:120": Rule("failed", "GSP error"),
    "xid:140": Rule("failed", "unrecovered ECC error"),
    "xid:154": Rule("degraded", "GPU recovery action changed"),
    "xid": Rule("degraded", "an Xid not listed above"),
    "ecc_uncorrected_volatile": Rule("failed", "uncorrectable ECC errors since the driver loaded"),
    "ecc_uncorrected_aggregate": Rule("degraded", "uncorrectable ECC errors over the GPU's life"),
    "ecc_corrected_volatile": Rule("ok", "corrected ECC errors"),
    "ecc_deferred": Rule("degraded", "deferred ECC errors"),
    "retired_pages_pending": Rule("failed", "page retirement pending (reset needed)"),
    "retired_pages_dbe": Rule("degraded", "pages retired for double-bit errors"),
    "retired_pages_sbe": Rule("ok", "pages retired for single-bit errors"),
    "retired_pages_limit": Rule("failed", "retired pages at the replacement limit"),
    "bad_page_threshold_exceeded": Rule("failed", "bad pages past the board's threshold"),
    "remap_pending": Rule("failed", "row remap pending (reset needed)"),
    "remap_failure": Rule("failed", "row remap failed: no spare rows"),
    "remap_uncorrectable": Rule("degraded", "rows remapped for uncorrectable errors"),
    "clock_hw_slowdown": Rule("degraded", "hardware slowdown"),
    "clock_hw_thermal_slowdown": Rule("degraded", "hardware thermal slowdown"),
    "clock_hw_power_brake": Rule("degraded", "hardware power brake slowdown"),
    "clock_sw_thermal_slowdown": Rule("ok", "software thermal slowdown"),
    "pcie_width_degraded": Rule("degraded", "PCIe link narrower than its max"),
    "pcie_gen_degraded": Rule("degraded", "PCIe link slower than its max under load"),
    "recovery_action:drain_p2p": Rule("degraded", "driver asks to drain peer-to-peer traffic"),
    "recovery_action": Rule("failed", "driver asks for a reset, a reboot or a drain and reset"),
    "gpu_requires_reset": Rule("failed", "GPU requires reset"),
    "value_error": Rule("degraded", "the driver reads a field as an error"),
    "gpu_missing": Rule("failed", "GPU missing since the last heartbeat"),
    "tool_hung": Rule("unknown", "GPU tool did not answer"),
    "health_unreadable": Rule("unknown", "health not readable"),
    "journal_unreadable": Rule("ok", "kernel log not readable: Xids unseen"),
}
# Short names for the one-line reasons (the table's labels explain; these name).
_XID_SHORT = {"13": "graphics engine exception", "31": "GPU memory page fault", "43": "GPU stopped processing",
              "45": "preemptive cleanup", "48": "double-bit ECC error", "63": "row remap recorded",
              "64": "row remap failure", "74": "NVLink error", "79": "fallen off the bus", "92": "high SBE rate",
              "94": "contained ECC error", "95": "uncontained ECC error", "119": "GSP RPC timeout", "120": "GSP error"}


def table_markdown(table: Mapping[str, Rule] = DEFAULT_TABLE) -> str:
    """The table as the module docstring (and the README) show it."""
    lines = ["| finding | verdict | repeated | meaning |", "|---|---|---|---|"]
    for key, rule in table.items():
        repeated = f" {rule.repeat} in {_span(rule.window_s)}: {rule.repeat_verdict} " if rule.repeat else " "
        lines.append(f"| `{key}` | {rule.verdict} |{repeated}| {rule.label} |")
    return "\n".join(lines)


def _span(seconds: float) -> str:
    if seconds % 3600 == 0 and seconds >= 3600:
        return f"{int(seconds // 3600)} h"
    if seconds % 60 == 0 and seconds >= 60:
        return f"{int(seconds // 60)} min"
    return f"{seconds:g} s"


_RULE_FIELDS = {"verdict", "label", "repeat", "window_s", "repeat_verdict"}


def table_with(overrides: Mapping[str, object] | None, table: Mapping[str, Rule] = DEFAULT_TABLE) -> dict[str, Rule]:
    """The table with a user's overrides; a bad entry raises :class:`ConfigError` naming it."""
    merged = dict(table)
    for key, value in (overrides or {}).items():
        where = f"[controller] gpu_health {key!r}"
        kind, _, code = str(key).partition(":")
        if kind not in KINDS or (kind == "xid" and code and not code.isdigit()):
            raise ConfigError(f"{where}: no such finding", hint="use a finding of the GPU health table, "
                              "e.g. xid:45, pcie_width_degraded")
        base = merged.get(key) or merged.get(kind) or Rule("ok", key)
        if isinstance(value, str):
            merged[key] = replace(base, verdict=_verdict(value, where))
            continue
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: {value!r} is neither a verdict nor a table", hint="use e.g. \"ok\"")
        unknown = set(value) - _RULE_FIELDS
        if unknown:
            raise ConfigError(f"{where}: unknown field {sorted(unknown)[0]!r}", hint=f"use {', '.join(sorted(_RULE_FIELDS))}")
        changes: dict[str, object] = {}
        for name, item in value.items():
            if name in ("verdict", "repeat_verdict"):
                changes[name] = _verdict(item, f"{where}.{name}")
            elif name == "label":
                changes[name] = str(item)[:120]
            elif name == "repeat":
                if not isinstance(item, int) or isinstance(item, bool) or not 0 <= item <= 1_000_000:
                    raise ConfigError(f"{where}.repeat: {item!r} is not a count", hint="use a whole number, 0 for never")
                changes[name] = item
            else:
                if not isinstance(item, (int, float)) or isinstance(item, bool) or not 0 <= item <= 30 * 86400:
                    raise ConfigError(f"{where}.window_s: {item!r} is not a window", hint="use seconds, up to 30 days")
                changes[name] = float(item)
        merged[key] = replace(base, **changes)  # type: ignore[arg-type]
    return merged


def _verdict(value: object, where: str) -> Verdict:
    for verdict in VERDICTS:
        if value == verdict:
            return verdict
    raise ConfigError(f"{where}: {value!r} is not a verdict", hint=f"use {', '.join(VERDICTS)}")


def rule_for(finding: Finding, table: Mapping[str, Rule]) -> Rule:
    return table.get(finding.key) or table.get(finding.kind) or Rule("degraded", finding.kind)


@dataclass(frozen=True)
class GpuVerdict:
    gpu: int | None                 # None: the host as a whole
    state: Verdict = "ok"
    reasons: tuple[str, ...] = ()   # one line each, worst first
    findings: tuple[Finding, ...] = field(default=(), repr=False)

    @property
    def reason(self) -> str:
        return self.reasons[0] if self.reasons else ""


@dataclass(frozen=True)
class HostVerdict:
    host: GpuVerdict                             # host-level findings (unreadable, hung, an unplaced Xid)
    gpus: Mapping[int, GpuVerdict]

    def quarantined(self) -> list[int]:
        return sorted(i for i, v in self.gpus.items() if v.state == "failed")


def judge(findings: Iterable[Finding], *, now: float, history: Iterable[Finding] = (), gpus: Iterable[int] = (),
          table: Mapping[str, Rule] | None = None, overrides: Mapping[str, object] | None = None,
          tz: tzinfo = timezone.utc) -> HostVerdict:
    """Verdicts for each GPU in ``gpus`` (ok when nothing is found) and each GPU a finding names.

    ``findings`` are this beat's; ``history`` the earlier events still worth counting (the Xids of
    past beats): both count toward a rule's ``repeat`` within its window, a finding without a time
    counting as ``now``. Events older than every window and never cleared are the caller's to
    pass or drop (a fatal Xid stays failed until cleared: its rule has no window)."""
    rules = table_with(overrides, table if table is not None else DEFAULT_TABLE)
    by_gpu: dict[int | None, list[Finding]] = defaultdict(list)
    for finding in (*history, *findings):
        by_gpu[finding.gpu].append(finding)
    verdicts = {index: _verdict_of(index, by_gpu.get(index, []), rules, now, tz) for index in {*gpus, *by_gpu} if index is not None}
    host = _verdict_of(None, by_gpu.get(None, []), rules, now, tz)
    if host.state == "unknown":  # a GPU whose health was not read is unknown, never ok
        verdicts = {i: v if _RANK[v.state] > _RANK["unknown"] else
                    GpuVerdict(i, "unknown", (f"GPU {i}: {host.reason.split(': ', 1)[-1]}",) + v.reasons, v.findings)
                    for i, v in verdicts.items()}
    return HostVerdict(host, dict(sorted(verdicts.items())))


def _verdict_of(gpu: int | None, findings: list[Finding], rules: Mapping[str, Rule], now: float, tz: tzinfo) -> GpuVerdict:
    groups: dict[str, list[Finding]] = defaultdict(list)
    for finding in findings:
        groups[finding.key].append(finding)
    judged: list[tuple[Verdict, str]] = []
    for key, group in groups.items():
        rule = rule_for(group[0], rules)
        verdict = rule.verdict
        recent = group
        if rule.repeat:
            recent = [f for f in group if f.at is None or f.at >= now - rule.window_s]  # a clock ahead still counts
            if len(recent) >= rule.repeat:
                verdict = rule.repeat_verdict
        if verdict == "ok" and not recent:
            continue
        judged.append((verdict, _reason(gpu, key, group[0], recent, rule, verdict, tz)))
    judged.sort(key=lambda item: -_RANK[item[0]])
    state: Verdict = judged[0][0] if judged else "ok"
    return GpuVerdict(gpu, state, tuple(reason for _, reason in judged), tuple(findings))


def _reason(gpu: int | None, key: str, first: Finding, recent: list[Finding], rule: Rule, verdict: Verdict,
            tz: tzinfo) -> str:
    subject = f"GPU {gpu}" if gpu is not None else ("host" if first.bus_id is None else f"GPU at {first.bus_id}")
    if first.kind == "xid":
        what = f"Xid {first.code} ({_XID_SHORT.get(first.code or '', rule.label)})"
    else:
        what = rule.label
        if first.detail:
            what += f" ({first.detail})"
        elif first.value is not None:
            what += f" ({first.value:g})"
    times = [f.at for f in recent if f.at is not None]
    if rule.repeat and len(recent) >= rule.repeat and verdict == rule.repeat_verdict:
        what += f" x{len(recent)} in {_span(rule.window_s)}"
    if times:
        what += f" at {datetime.fromtimestamp(max(times), tz).strftime('%H:%M')}"
    return f"{subject}: {what}"
