"""``fleetctl doctor``: a per-hop preflight that says what works and, for what does not, the fix.

Checks, in order, each only if the one before passed: ssh_config resolution (and where from);
every hop's TCP, handshake and host-key verdict, and login (which key worked); forwarding on each
bastion (the next hop was reached through it); then on the target, in one exec: the GPU tool, the
driver answering, MIG mode, a private temp dir for jobs, and SFTP into it.
"""

from __future__ import annotations

import contextlib
import shlex
from dataclasses import asdict, dataclass

from fleetctl._text import one_line
from fleetctl.errors import FleetError, TransportError
from fleetctl.hosts.core import Hosts
from fleetctl.inventory.config import Agent
from fleetctl.ssh.seam import Connection, Route
from fleetctl.telemetry.gpu_tools import TOOLS
from fleetctl.telemetry.outcomes import status_of
from fleetctl.telemetry.parsers.xid import GRANTING_GROUPS
from fleetctl.telemetry.snapshot import TelemetrySnapshot

_PROBE = ("for t in " + " ".join(TOOLS) + '; do command -v "$t" >/dev/null 2>&1 && echo "tool $t"; done; '
          'if command -v nvidia-smi >/dev/null 2>&1; then nvidia-smi --query-gpu=index,mig.mode.current '
          '--format=csv,noheader 2>/dev/null | sed "s/^/mig /"; fi; '
          'd=$(umask 077; mktemp -d "${TMPDIR:-/tmp}/fleetctl-doctor.XXXXXXXX" 2>/dev/null) && echo "tmp $d"')


@dataclass(frozen=True)
class Check:
    agent: str
    check: str
    ok: bool
    detail: str
    fix: str | None = None

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def _fail(agent: str, check: str, exc: FleetError) -> Check:
    return Check(agent, check, False, one_line(exc.message), exc.hint)


def check_agent(fleet: Hosts, agent: Agent) -> list[Check]:
    name = agent.name
    try:
        route = fleet.route(name)
    except FleetError as exc:
        return [_fail(name, "resolve", exc)]
    checks = [Check(name, "resolve", True, f"{route.describe()} ({fleet.resolver.mode if agent.ssh_config is not False else 'ssh_config off'})")]
    try:
        conn = fleet.connection(agent)
    except TransportError as exc:
        return checks + _hop_failure(name, route, exc)
    for index, seen in enumerate(conn.host_keys):
        role = "bastion" if index < len(route.hops) - 1 else "target"
        forwards = "; forwarding allowed" if role == "bastion" else ""
        checks.append(Check(name, f"hop {index + 1} ({role})", True,
                            f"{seen.address}: host key {seen.key_type} {seen.fingerprint} {seen.verdict}; "
                            f"logged in with {seen.identity}{forwards}"))
    return checks + _target_checks(fleet, agent, conn)


def _hop_failure(name: str, route: Route, exc: TransportError) -> list[Check]:
    addresses = [hop.address for hop in route.hops]
    failed = addresses.index(exc.hop) if exc.hop in addresses else len(addresses) - 1
    stage = {"host_key_mismatch": "host key", "auth_failed": "login"}.get(status_of(exc), "connect")
    checks = [Check(name, f"hop {i + 1} (bastion)", True, f"{addresses[i]}: reached; forwarding allowed")
              for i in range(failed)]
    role = "bastion" if failed < len(addresses) - 1 else "target"
    checks.append(Check(name, f"hop {failed + 1} ({role}) {stage}", False, one_line(exc.message), exc.hint))
    return checks


def _target_checks(fleet: Hosts, agent: Agent, conn: Connection) -> list[Check]:
    name = agent.name
    checks: list[Check] = []
    try:
        probe = conn.run("sh -c " + shlex.quote(_PROBE), timeout=agent.command_timeout_s, max_stdout=65536)
    except FleetError as exc:
        return [_fail(name, "probe", exc)]
    tools = [line.split(" ", 1)[1] for line in probe.stdout.splitlines() if line.startswith("tool ")]
    configured = agent.gpu_query_cmd.split()[0].rsplit("/", 1)[-1] if agent.gpu_query_cmd else None
    if tools:
        checks.append(Check(name, "gpu tool", True, ", ".join(tools) + (f" (gpu_query_cmd uses {configured})" if configured else "")))
    else:
        checks.append(Check(name, "gpu tool", False, "no nvidia-smi, rocm-smi or amd-smi on the PATH of a non-interactive login",
                            "install the driver tools, or set gpu_query_cmd with the tool's full path"))
    snapshot = fleet.heartbeat_one(agent)
    driver_ok = snapshot.status in ("ok", "no_gpus")
    detail = f"{len(snapshot.gpus)} GPU(s) answered" if driver_ok else f"{snapshot.status}: {snapshot.error or ''}"
    checks.append(Check(name, "driver", driver_ok, one_line(detail),
                        None if driver_ok else "run the gpu_query_cmd on the host by hand to see why"))
    checks += _health_checks(name, snapshot)
    mig = [line.split(" ", 1)[1] for line in probe.stdout.splitlines() if line.startswith("mig ")]
    if mig:
        checks.append(Check(name, "mig mode", True, "; ".join(f"GPU {one_line(m)}" for m in mig)))
    temp = next((line[4:].strip() for line in probe.stdout.splitlines() if line.startswith("tmp /")), None)
    if temp is None:
        checks.append(Check(name, "temp dir", False, "mktemp -d failed under ${TMPDIR:-/tmp}",
                            "make /tmp (or $TMPDIR) writable for the SSH user: jobs need a private directory"))
        return checks
    checks.append(Check(name, "temp dir", True, f"{temp} (mode 0700)"))
    try:
        conn.write_bytes(f"{temp}/probe", b"fleetctl")
        ok = conn.read_bytes(f"{temp}/probe") == b"fleetctl"
        checks.append(Check(name, "sftp", ok, "write and read back a file" if ok else "read back something else",
                            None if ok else "check the host's sftp subsystem"))
    except FleetError as exc:
        checks.append(_fail(name, "sftp", exc))
    finally:
        with contextlib.suppress(FleetError):  # best effort: mktemp's directory under /tmp
            conn.run(f"rm -rf -- {shlex.quote(temp)}", timeout=agent.command_timeout_s)
    return checks


def _health_checks(name: str, snapshot: TelemetrySnapshot) -> list[Check]:
    """GPU health as the heartbeat read it, and whether the kernel log (Xids) is readable without root."""
    report = snapshot.gpu_health
    if report is None or not snapshot.ok:
        return []
    states = [g.state for g in report.gpus]
    summary = ", ".join(f"{states.count(s)} {s}" for s in ("failed", "unknown", "degraded", "ok") if s in states)
    bad = [r for g in report.gpus if g.state != "ok" for r in g.reasons[:1]]
    checks = [Check(name, "gpu health", not any(s in ("failed", "unknown") for s in states),
                    one_line(summary + (f": {'; '.join(bad)}" if bad else "")),
                    None if not bad else "see `fleetctl agents show`; `fleetctl agents clear-gpu` once fixed")]
    if report.journal_problem:
        checks.append(Check(name, "kernel log", False, one_line(report.journal_problem),
                            f"add the SSH user to group {' or '.join(GRANTING_GROUPS)} (usermod -aG systemd-journal USER)"))
    else:
        checks.append(Check(name, "kernel log", True, "readable: Xids are read from the journal"))
    return checks


def doctor(fleet: Hosts, names: list[str] | None = None) -> list[Check]:
    """Every check for the named agents (all by default), agents in parallel on the fleet's pool."""
    agents = fleet.inventory.select(names)
    results = fleet.map_agents(lambda agent: check_agent(fleet, agent), agents)
    return [check for checks in results for check in checks]
