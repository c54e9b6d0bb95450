"""``fleetctl serve --metrics``: the collector on a real store, /metrics as text, and a real Prometheus
server (Debian's ``prometheus``) scraping serve while it beats a sandbox with one host stopped."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, TypeVar

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from fleetctl.errors import ConfigError
from fleetctl.sandbox import HostSpec, Sandbox
from fleetctl.serve.metrics import MAX_LABEL_CHARS, FleetCollector, parse_address, registry_for
from fleetctl.store import SQLiteStore
from fleetctl.telemetry.health import HealthPolicy
from fleetctl.telemetry.history import record
from fleetctl.telemetry.snapshot import GpuHealth, GpuHealthReport, GpuSample, HealthFinding, TelemetrySnapshot
from tests.conftest import require_sshd, run_cli
from tests.waiting import poll

T = TypeVar("T")
GPU_SERIES = ("DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_FB_USED", "DCGM_FI_DEV_FB_FREE", "DCGM_FI_DEV_GPU_TEMP",
              "DCGM_FI_DEV_POWER_USAGE")
HOSTS = {"m-nv": 2, "m-amd": 2}  # agent -> GPUs; "m-gone" is stopped after start


def _until(what: str, probe: Callable[[], T | None], timeout: float = 60.0) -> T:
    """Poll ``probe`` until it returns something, or fail naming ``what``."""
    return poll(what, probe, timeout, interval=0.25)


def _get(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return str(response.read().decode())
    except OSError:
        return None


def _samples(text: str) -> dict[str, list[Any]]:
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


# -- the collector on a store, no network -----------------------------------------------------
def _snapshot(agent: str, status: str = "ok", *, name: str = "NVIDIA H100 80GB HBM3", ago_s: float = 0.0,
              gpus: int = 2) -> TelemetrySnapshot:
    samples = [GpuSample(index=i, uuid=f"GPU-{agent}-{i}", name=name, vendor="nvidia", memory_total_mib=81559,
                         memory_used_mib=1000 + i, memory_free_mib=80559 - i, utilization_gpu_pct=10 * i,
                         temperature_c=40 + i, power_draw_w=80.5) for i in range(gpus)] if status == "ok" else []
    return TelemetrySnapshot(agent=agent, hostname=f"{agent}.example", status=status,  # type: ignore[arg-type]
                             timestamp=datetime.now(timezone.utc) - timedelta(seconds=ago_s), latency_ms=25.0,
                             error=None if status == "ok" else "connection refused", gpus=samples)


def _scrape(collector: FleetCollector) -> dict[str, list[Any]]:
    return _samples(generate_latest(registry_for(collector)).decode())


@pytest.mark.sqlite_only(reason="builds its store with SQLiteStore.in_state_dir: SQLite on either pass")
def test_a_failed_host_exports_its_status_never_its_last_gpu_values(tmp_path: Path) -> None:
    store = SQLiteStore.in_state_dir(tmp_path)
    try:
        record(store, [_snapshot("a"), _snapshot("b")], HealthPolicy())
        record(store, [_snapshot("b", "unreachable")], HealthPolicy())  # b was fine, now it is not
        families = _scrape(FleetCollector(store, agents=lambda: ["a", "b", "never-seen"]))
    finally:
        store.close()
    util = families["DCGM_FI_DEV_GPU_UTIL"]
    assert {(s.labels["agent"], s.labels["gpu"]) for s in util} == {("a", "0"), ("a", "1")}
    assert util[1].labels == {"gpu": "1", "UUID": "GPU-a-1", "modelName": "NVIDIA H100 80GB HBM3",
                              "Hostname": "a.example", "agent": "a"} and util[1].value == 10.0
    for name in GPU_SERIES:
        assert {s.labels["agent"] for s in families[name]} == {"a"}, name
    up = {s.labels["agent"]: s.value for s in families["fleetctl_agent_up"]}
    assert up == {"a": 1.0, "b": 0.0, "never-seen": 0.0}
    status = {(s.labels["agent"], s.labels["status"]) for s in families["fleetctl_agent_status"] if s.value == 1}
    assert status == {("a", "ok"), ("b", "unreachable")}  # never-seen has no status yet
    health = {(s.labels["agent"], s.labels["health"]) for s in families["fleetctl_agent_health"] if s.value == 1}
    assert health == {("a", "online"), ("b", "online"), ("never-seen", "unknown")}  # one miss is not offline yet
    assert {s.labels["agent"] for s in families["fleetctl_agent_last_success_age_seconds"]} == {"a", "b"}
    assert [s.value for s in families["fleetctl_heartbeat_latency_seconds"]] == [0.025, 0.025]
    assert {s.labels["state"]: s.value for s in families["fleetctl_jobs"]}["queued"] == 0.0
    assert families["fleetctl_store_up"][0].value == 1.0


@pytest.mark.sqlite_only(reason="builds its store with SQLiteStore.in_state_dir: SQLite on either pass")
def test_a_stale_ok_snapshot_is_not_the_present(tmp_path: Path) -> None:
    store = SQLiteStore.in_state_dir(tmp_path)
    try:
        record(store, [_snapshot("old", ago_s=3600), _snapshot("new")], HealthPolicy())
        families = _scrape(FleetCollector(store, max_age_s=60))
    finally:
        store.close()
    assert {s.labels["agent"] for s in families["DCGM_FI_DEV_GPU_UTIL"]} == {"new"}
    assert {s.labels["agent"]: s.value for s in families["fleetctl_agent_up"]} == {"new": 1.0, "old": 0.0}
    age = {s.labels["agent"]: s.value for s in families["fleetctl_agent_last_success_age_seconds"]}
    assert age["old"] >= 3600 and age["new"] < 60


@pytest.mark.sqlite_only(reason="builds its store with SQLiteStore.in_state_dir: SQLite on either pass")
def test_label_values_from_hosts_are_data_escaped_and_bounded(tmp_path: Path) -> None:
    odd = 'GPU "quoted" \\ back\nslash ünïcode ' + "x" * 500
    store = SQLiteStore.in_state_dir(tmp_path)
    try:
        record(store, [_snapshot('we"ird\nagent', name=odd, gpus=1)], HealthPolicy())
        text = generate_latest(registry_for(FleetCollector(store))).decode()
    finally:
        store.close()
    families = _samples(text)  # the exposition format escaped them: the parser reads them back whole
    (sample,) = families["DCGM_FI_DEV_GPU_UTIL"]
    assert sample.labels["agent"] == 'we"ird\nagent'
    assert len(sample.labels["modelName"]) == MAX_LABEL_CHARS and sample.labels["modelName"].startswith(odd[:100])


@pytest.mark.sqlite_only(reason="builds its store with SQLiteStore.in_state_dir: SQLite on either pass")
def test_a_store_that_cannot_be_read_is_a_series_not_a_traceback(tmp_path: Path) -> None:
    store = SQLiteStore.in_state_dir(tmp_path)
    store.close()  # every query now fails with a StoreError
    families = _scrape(FleetCollector(store))
    assert list(families) == ["fleetctl_store_up"] and families["fleetctl_store_up"][0].value == 0.0


@pytest.mark.parametrize(("text", "host", "port", "loopback"), [
    ("9400", "127.0.0.1", 9400, True), (":9400", "127.0.0.1", 9400, True), ("localhost:1", "localhost", 1, True),
    ("0.0.0.0:9400", "0.0.0.0", 9400, False), ("[::1]:0", "::1", 0, True), ("gpu-ctl.example:80", "gpu-ctl.example", 80, False),
])
def test_metrics_addresses(text: str, host: str, port: int, loopback: bool) -> None:
    address = parse_address(text)
    assert (address.host, address.port, address.loopback) == (host, port, loopback)


@pytest.mark.parametrize("text", ["", "host:", "::1:9400", "127.0.0.1:99999", "127.0.0.1:http"])
def test_bad_metrics_addresses_are_config_errors(text: str) -> None:
    with pytest.raises(ConfigError, match="--metrics"):
        parse_address(text)


@pytest.mark.sqlite_only(reason="builds its store with SQLiteStore.in_state_dir: SQLite on either pass")
def test_a_gpu_missing_by_count_is_exported_per_host(tmp_path: Path) -> None:
    """Where no bus id tells which GPU went, the host's count does: fleetctl_gpu_missing_count."""
    store = SQLiteStore.in_state_dir(tmp_path)
    try:
        short = _snapshot("a", gpus=1)
        short.gpu_health = GpuHealthReport(gpus=[GpuHealth(index=0)], findings=[
            HealthFinding(kind="gpu_missing", value=1.0, detail="1 of 2 GPUs answer")])
        whole = _snapshot("b")
        whole.gpu_health = GpuHealthReport(gpus=[GpuHealth(index=0), GpuHealth(index=1)])
        record(store, [short, whole], HealthPolicy())
        families = _scrape(FleetCollector(store))
    finally:
        store.close()
    counts = {s.labels["agent"]: s.value for s in families["fleetctl_gpu_missing_count"]}
    assert counts == {"a": 1.0, "b": 0.0}


def _dashboard_queries() -> list[str]:
    dashboard = json.loads((Path(__file__).parents[2] / "examples" / "grafana-dashboard.json").read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


@pytest.mark.sqlite_only(reason="builds its store with SQLiteStore.in_state_dir: SQLite on either pass")
def test_the_grafana_dashboard_is_built_on_exported_names(tmp_path: Path) -> None:
    store = SQLiteStore.in_state_dir(tmp_path)
    try:
        record(store, [_snapshot("a")], HealthPolicy())
        exported = set(_scrape(FleetCollector(store)))
    finally:
        store.close()
    dashboard = json.loads((Path(__file__).parents[2] / "examples" / "grafana-dashboard.json").read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert all(p["datasource"]["uid"] == "${datasource}" for p in dashboard["panels"])
    used = {name for expr in _dashboard_queries() for name in re.findall(r"\b(?:DCGM_FI_\w+|fleetctl_\w+)", expr)}
    assert used and used <= exported, used - exported
    assert set(GPU_SERIES) | {"fleetctl_agent_up", "fleetctl_jobs"} <= used
    assert {"fleetctl_gpu_health", "fleetctl_gpu_quarantined", "fleetctl_gpu_missing", "DCGM_FI_DEV_XID_ERRORS",
            "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL", "DCGM_FI_DEV_PCIE_LINK_WIDTH"} <= used  # the GPU health row


# -- serve against a sandbox ------------------------------------------------------------------
class Served:
    def __init__(self, sandbox: Sandbox, url: str) -> None:
        self.sandbox, self.url = sandbox, url


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _stop(process: subprocess.Popen[Any], timeout: float = 20) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """Three hosts (NVIDIA, AMD, and one whose sshd is stopped), and ``serve --metrics 127.0.0.1:0``
    beating them every 0.5 s. Stopped by PID; serve must exit 0 without a traceback."""
    require_sshd()
    root = tmp_path_factory.mktemp("metrics")
    sandbox = Sandbox(root / "sb", [HostSpec("m-nv", gpus=HOSTS["m-nv"]), HostSpec("m-amd", vendor="amd", gpus=HOSTS["m-amd"]),
                                    HostSpec("m-gone")])
    sandbox.up()
    process: subprocess.Popen[str] | None = None
    log = root / "serve.log"
    try:
        sandbox.stop_host("m-gone")
        # One application Xid in m-nv's kernel log: exported as its last Xid, judged ok (quarantines nothing).
        sandbox.write_host_state("m-nv", {**sandbox.host_state("m-nv"),
                                          "kernel_log": [{"at": time.time() - 30, "gpu": 1, "xid": 13}]})
        config = root / "agents.toml"
        config.write_text("[controller]\nheartbeat_interval_s = 0.5\n\n" + sandbox.inventory_path.read_text())
        home = root / "home"
        home.mkdir()
        env = {**os.environ, "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"),
               "XDG_STATE_HOME": str(home / ".state"), "FLEETCTL_SSH_CONFIG": str(config.with_name("ssh_config"))}
        config.with_name("ssh_config").touch()
        with log.open("w") as stderr:
            # Port 0: serve picks a free port and prints it, so no other process can take it first.
            process = subprocess.Popen([sys.executable, "-m", "fleetctl", "serve", "--no-jobs", "--metrics", "127.0.0.1:0",
                                        "--config", str(config), "--state-dir", str(root / "state")],
                                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr, text=True, env=env)

        def url() -> str | None:
            assert process is not None and process.poll() is None, log.read_text()
            found = [line.split("metrics on ", 1)[1].strip() for line in log.read_text().splitlines() if "metrics on " in line]
            return found[0] if found else None
        yield Served(sandbox, _until("serve to print its metrics URL", url, timeout=30))
    finally:
        if process is not None:
            _stop(process)
        sandbox.down()
    stderr_text = log.read_text()
    assert process.returncode == 0 and "Traceback" not in stderr_text, stderr_text


def test_metrics_text_has_every_host_and_the_stopped_one_down(served: Served) -> None:
    assert served.url.startswith("http://127.0.0.1:") and served.url.endswith("/metrics")

    def complete() -> dict[str, list[Any]] | None:
        text = _get(served.url)
        if text is None:
            return None
        families = _samples(text)
        seen = {s.labels["agent"] for s in families.get("DCGM_FI_DEV_GPU_UTIL", [])}
        down = {s.labels["agent"] for s in families.get("fleetctl_agent_up", []) if s.value == 0}
        return families if seen == set(HOSTS) and down == {"m-gone"} else None
    families = _until("every host in /metrics", complete)
    for name in GPU_SERIES:
        per_agent = [s.labels["agent"] for s in families[name]]
        assert sorted(per_agent) == sorted(a for a, n in HOSTS.items() for _ in range(n)), name
    amd = [s for s in families["DCGM_FI_DEV_FB_USED"] if s.labels["agent"] == "m-amd"]
    assert {s.labels["gpu"] for s in amd} == {"0", "1"} and all("MI100" in s.labels["modelName"] for s in amd)
    nv = [s for s in families["DCGM_FI_DEV_GPU_TEMP"] if s.labels["agent"] == "m-nv"]
    assert all(s.labels["UUID"].startswith("GPU-") and s.labels["Hostname"] == "127.0.0.1" for s in nv)
    status = {(s.labels["agent"], s.labels["status"]) for s in families["fleetctl_agent_status"] if s.value == 1}
    assert ("m-gone", "unreachable") in status and ("m-nv", "ok") in status
    assert {s.labels["agent"] for s in families["fleetctl_heartbeat_latency_seconds"]} == {"m-nv", "m-amd", "m-gone"}
    assert "fleetctl_jobs" in families


def test_a_real_prometheus_scrapes_serve(served: Served, tmp_path: Path) -> None:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("prometheus is missing: run the tests with scripts/test, which installs it")
    target = urllib.parse.urlsplit(served.url).netloc
    port = _free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(json.dumps({  # JSON is YAML: no YAML library needed
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "fleetctl", "static_configs": [{"targets": [target]}]}],
    }))
    with (tmp_path / "prometheus.log").open("w") as log:
        prometheus = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
                                       f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                                      stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    api = f"http://127.0.0.1:{port}/api/v1/query?query="
    try:
        def query(expr: str) -> list[dict[str, Any]]:
            assert prometheus.poll() is None, (tmp_path / "prometheus.log").read_text()
            text = _get(api + urllib.parse.quote(expr))
            return list(json.loads(text)["data"]["result"]) if text else []

        def all_hosts() -> tuple[list[dict[str, Any]], dict[str, str]] | None:
            gpus = query("DCGM_FI_DEV_GPU_UTIL")
            up = {r["metric"]["agent"]: r["value"][1] for r in query("fleetctl_agent_up")}
            seen = {(r["metric"]["agent"], r["metric"]["gpu"]) for r in gpus}
            wanted = {(a, str(i)) for a, n in HOSTS.items() for i in range(n)}
            return (gpus, up) if seen == wanted and up == {"m-nv": "1", "m-amd": "1", "m-gone": "0"} else None
        gpus, _ = _until("Prometheus to show every host's GPUs and m-gone down", all_hosts, timeout=90)
        assert all(r["metric"]["job"] == "fleetctl" and {"UUID", "modelName", "Hostname"} <= set(r["metric"]) for r in gpus)
        for name in GPU_SERIES[1:]:
            assert {r["metric"]["agent"] for r in query(name)} == set(HOSTS), name
        assert query('fleetctl_agent_status{agent="m-gone",status="unreachable"}')[0]["value"][1] == "1"
        assert query('sum(fleetctl_jobs)')[0]["value"][1] == "0"
        # Every query of the example dashboard is valid PromQL and finds data (its $agent is "all").
        for expr in _dashboard_queries():
            assert query(expr.replace("$agent", ".*")), expr
    finally:
        _stop(prometheus)
    assert prometheus.returncode == 0, (tmp_path / "prometheus.log").read_text()


def test_a_port_in_use_is_one_line_and_a_public_address_warns(served: Served, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("serve", "--no-jobs", "--metrics", f"0.0.0.0:{port}", "--config", str(served.sandbox.inventory_path),
                         "--state-dir", str(tmp_path / "state"), timeout=60)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert "unauthenticated" in lines[0] and "warning" in lines[0]
    assert lines[-1] == (f"fleetctl: error: cannot serve metrics on 0.0.0.0:{port}: the port is in use "
                         "(pick another address with --metrics HOST:PORT)")
    bad = run_cli("serve", "--metrics", "host:", "--config", str(served.sandbox.inventory_path),
                  "--state-dir", str(tmp_path / "state"))
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "--metrics 'host:'" in bad.stderr
