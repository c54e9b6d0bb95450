"""Prometheus ``/metrics`` for the whole fleet, read from the store on every scrape.

GPU series carry dcgm-exporter's names, units and labels (``DCGM_FI_DEV_GPU_UTIL`` in %,
``DCGM_FI_DEV_FB_USED``/``_FREE`` in MiB, ``DCGM_FI_DEV_GPU_TEMP`` in °C, ``DCGM_FI_DEV_POWER_USAGE`` in W;
labels ``gpu``, ``UUID``, ``modelName``, ``Hostname``) plus ``agent``, so dashboards built for
dcgm-exporter work unchanged; AMD GPUs appear under the same names. fleetctl's own series are
``fleetctl_*``. GPU series come only from an agent's latest snapshot, only when it is ``ok`` and
fresh: a failed host exports its status and ``fleetctl_agent_up 0``, never its last good values.

GPU health (issue 22, docs/gpu-health.md) adds dcgm-exporter's health fields under its names
(``DCGM_FI_DEV_XID_ERRORS``, ``DCGM_FI_DEV_ECC_DBE_VOL_TOTAL``, ``DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS``,
``DCGM_FI_DEV_CLOCKS_EVENT_REASONS``, ``DCGM_FI_DEV_PCIE_LINK_WIDTH``, ... as
:data:`fleetctl.telemetry.health_beat.DCGM_FIELDS` lists them), and per GPU
``fleetctl_gpu_health{state}`` (1 for its verdict), ``fleetctl_gpu_quarantined``, ``fleetctl_gpu_missing`` and,
per host, ``fleetctl_gpu_missing_count``.

The collector holds its own :class:`Store` (its own SQLite connection), so scrapes never wait on
the controller's writes and a scrape during shutdown never meets a store the controller closed."""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import get_args
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from fleetctl.errors import ConfigError, FleetError
from fleetctl.jobs.model import JobState
from fleetctl.store import Store, open_store
from fleetctl.telemetry.health import Health, HealthState
from fleetctl.telemetry.health_beat import DCGM_FIELDS, XID_FIELD
from fleetctl.telemetry.history import AgentStatus, agent_statuses
from fleetctl.telemetry.snapshot import GpuSample, Status, TelemetrySnapshot
from fleetctl.telemetry.snapshot import HealthState as GpuHealthState

MAX_LABEL_CHARS = 128  # hosts write model names and UUIDs: a bound keeps one odd host from bloating every scrape
DEFAULT_PORT = 9400  # dcgm-exporter's port: fleetctl stands in for it
STATUSES: tuple[str, ...] = get_args(Status)
HEALTH_STATES: tuple[str, ...] = get_args(HealthState)
JOB_STATES: tuple[str, ...] = get_args(JobState)
GPU_HEALTH_STATES: tuple[str, ...] = get_args(GpuHealthState)
GPU_HEALTH_LABELS = ("gpu", "Hostname", "agent")  # a vanished GPU has no UUID or model left to name
log = logging.getLogger("fleetctl.serve.metrics")
GPU_LABELS = ("gpu", "UUID", "modelName", "Hostname", "agent")

# (metric name, help as dcgm-exporter words it, how to read it from one GPU)
_GPU_SERIES: tuple[tuple[str, str, Callable[[GpuSample], float | None]], ...] = (
    ("DCGM_FI_DEV_GPU_UTIL", "GPU utilization (in %).", lambda g: g.utilization_gpu_pct),
    ("DCGM_FI_DEV_FB_USED", "Framebuffer memory used (in MiB).", lambda g: g.memory_used_mib),
    ("DCGM_FI_DEV_FB_FREE", "Framebuffer memory free (in MiB).", lambda g: _fb_free(g)),
    ("DCGM_FI_DEV_GPU_TEMP", "GPU temperature (in C).", lambda g: g.temperature_c),
    ("DCGM_FI_DEV_POWER_USAGE", "Power draw (in W).", lambda g: g.power_draw_w),
)


def _fb_free(gpu: GpuSample) -> float | None:
    if gpu.memory_free_mib is not None:
        return gpu.memory_free_mib
    if gpu.memory_total_mib is not None and gpu.memory_used_mib is not None:
        return max(0.0, gpu.memory_total_mib - gpu.memory_used_mib)  # rocm-smi reports total and used only
    return None


def label(value: object) -> str:
    """A label value from a host, as data: kept as it is (the exposition format escapes quotes,
    backslashes and newlines), cut to a bound, and made valid UTF-8 so encoding a scrape never fails."""
    text = "" if value is None else str(value)
    if len(text) > MAX_LABEL_CHARS:
        text = text[:MAX_LABEL_CHARS - 1] + "…"
    return text.encode("utf-8", "replace").decode("utf-8")


class FleetCollector(Collector):
    """Every agent's latest snapshot and health, and jobs by state, read from the store per scrape.

    ``agents`` (a callable, read per scrape) limits the export to those names and adds the ones the
    store has not seen yet as ``unknown``; without it, every agent the store knows is exported.
    ``max_age_s``: a snapshot older than this is not the host's present state (it was written before
    this controller started, or the controller stopped beating it), so no GPU series and ``up`` 0."""

    def __init__(self, store: Store, *, agents: Callable[[], list[str]] | None = None,
                 max_age_s: float | None = None, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.agents = agents
        self.max_age_s = max_age_s
        self.clock = clock
        self._store_failed = False  # logged once per outage, not once per scrape

    def collect(self) -> Iterator[Metric]:
        store_up = GaugeMetricFamily("fleetctl_store_up", "1 when the store could be read for this scrape, else 0.")
        try:
            # Read whole before yielding: a half-read store must not export half a fleet.
            metrics = list(self._fleet(self.clock(), agent_statuses(self.store)))
            metrics.append(self._jobs())
        except FleetError as exc:  # a StoreError: the scrape says so instead of failing with a traceback
            if not self._store_failed:
                log.warning("metrics: %s", exc)
            self._store_failed = True
            store_up.add_metric([], 0.0)
            yield store_up
            return
        self._store_failed = False
        store_up.add_metric([], 1.0)
        yield store_up
        yield from metrics

    def _fleet(self, now: float, statuses: dict[str, AgentStatus]) -> Iterator[Metric]:
        names = self.agents() if self.agents is not None else sorted(statuses)

        up = GaugeMetricFamily("fleetctl_agent_up", "1 when the agent's latest heartbeat succeeded and is fresh, else 0.",
                               labels=["agent"])
        status = GaugeMetricFamily("fleetctl_agent_status", "1 for the status of the agent's latest heartbeat, 0 for the others.",
                                   labels=["agent", "status"])
        health = GaugeMetricFamily("fleetctl_agent_health", "1 for the agent's health (online, offline, unknown), 0 for the others.",
                                   labels=["agent", "health"])
        draining = GaugeMetricFamily("fleetctl_agent_draining", "1 while the agent is drained (no new jobs placed on it).",
                                     labels=["agent"])
        latency = GaugeMetricFamily("fleetctl_heartbeat_latency_seconds", "How long the agent's latest heartbeat took.",
                                    labels=["agent"])
        age = GaugeMetricFamily("fleetctl_agent_last_success_age_seconds", "Seconds since the agent's last good heartbeat.",
                                labels=["agent"])
        misses = GaugeMetricFamily("fleetctl_agent_heartbeat_misses", "Failed heartbeats in a row.", labels=["agent"])
        gpus = GaugeMetricFamily("fleetctl_agent_gpus", "GPUs in the agent's latest good heartbeat.", labels=["agent"])
        gpu_families = [(GaugeMetricFamily(name, help_text, labels=list(GPU_LABELS)), read)
                        for name, help_text, read in _GPU_SERIES]
        health_families = {name: GaugeMetricFamily(name, help_text, labels=list(GPU_LABELS))
                           for name, _, help_text in (*DCGM_FIELDS, (XID_FIELD[0], "", XID_FIELD[1]))}
        gpu_health = GaugeMetricFamily("fleetctl_gpu_health", "1 for the GPU's health verdict (ok, degraded, failed, "
                                       "unknown), 0 for the others.", labels=[*GPU_HEALTH_LABELS, "state"])
        quarantined = GaugeMetricFamily("fleetctl_gpu_quarantined", "1 while no job is placed on the GPU (failed "
                                        "until cleared or recovered).", labels=list(GPU_HEALTH_LABELS))
        missing = GaugeMetricFamily("fleetctl_gpu_missing", "1 when a GPU listed before no longer answers.",
                                    labels=list(GPU_HEALTH_LABELS))
        # Where no bus id tells which GPU went (old drivers, some AMD hosts), only how many: per host.
        missing_count = GaugeMetricFamily("fleetctl_gpu_missing_count", "GPUs fewer than the host had since it booted, "
                                          "where no bus id tells which one went.", labels=["Hostname", "agent"])

        for name in names:
            known = statuses.get(name) or AgentStatus(name, Health(), False, None)
            agent = label(name)
            snapshot = known.snapshot
            fresh = snapshot is not None and (self.max_age_s is None
                                               or now - snapshot.timestamp.timestamp() <= self.max_age_s)
            current = snapshot.status if snapshot is not None else None
            up.add_metric([agent], 1.0 if snapshot is not None and snapshot.ok and fresh else 0.0)
            for value in STATUSES:
                status.add_metric([agent, value], 1.0 if value == current else 0.0)
            for value in HEALTH_STATES:
                health.add_metric([agent, value], 1.0 if value == known.health.state else 0.0)
            draining.add_metric([agent], 1.0 if known.draining else 0.0)
            misses.add_metric([agent], float(known.health.misses))
            if snapshot is not None and snapshot.latency_ms is not None:
                latency.add_metric([agent], snapshot.latency_ms / 1000.0)
            if known.health.last_ok is not None:
                age.add_metric([agent], max(0.0, now - known.health.last_ok))
            # Only a fresh "ok" snapshot speaks for the GPUs now; anything else would be stale values.
            if snapshot is not None and snapshot.status == "ok" and fresh:
                gpus.add_metric([agent], float(len(snapshot.gpus)))
                for position, gpu in enumerate(snapshot.gpus):
                    labels = gpu_labels(snapshot, gpu, position)
                    for family, read in gpu_families:
                        reading = read(gpu)
                        if reading is not None:
                            family.add_metric(labels, float(reading))
                self._gpu_health(snapshot, health_families, gpu_health, quarantined, missing)
                if snapshot.gpu_health is not None:
                    gone = sum(f.value or 0.0 for f in snapshot.gpu_health.findings if f.kind == "gpu_missing" and f.gpu is None)
                    missing_count.add_metric([label(snapshot.hostname or snapshot.agent), agent], gone)

        yield from (up, status, health, draining, latency, age, misses, gpus)
        yield from (family for family, _ in gpu_families)
        yield from health_families.values()
        yield from (gpu_health, quarantined, missing, missing_count)

    @staticmethod
    def _gpu_health(snapshot: TelemetrySnapshot, families: dict[str, GaugeMetricFamily], gpu_health: GaugeMetricFamily,
                    quarantined: GaugeMetricFamily, missing: GaugeMetricFamily) -> None:
        if snapshot.gpu_health is None:
            return
        samples = {g.index: (g, position) for position, g in enumerate(snapshot.gpus) if g.index is not None}
        host = label(snapshot.hostname or snapshot.agent)
        for verdict in snapshot.gpu_health.gpus:
            short = [str(verdict.index), host, label(snapshot.agent)]
            for state in GPU_HEALTH_STATES:
                gpu_health.add_metric([*short, state], 1.0 if state == verdict.state else 0.0)
            quarantined.add_metric(short, 1.0 if verdict.quarantined is not None else 0.0)
            missing.add_metric(short, 1.0 if verdict.missing else 0.0)
            sample = samples.get(verdict.index)
            if sample is None:
                continue
            labels = gpu_labels(snapshot, *sample)
            for (name, _, _), value in zip(DCGM_FIELDS, verdict.values, strict=False):
                if value is not None:
                    families[name].add_metric(labels, value)
            if verdict.last_xid is not None:
                families[XID_FIELD[0]].add_metric(labels, float(verdict.last_xid))

    def _jobs(self) -> GaugeMetricFamily:
        counts = {state: 0 for state in JOB_STATES}
        for row in self.store.query("SELECT state, count(*) FROM jobs GROUP BY state"):
            counts[str(row[0])] = int(row[1])
        jobs = GaugeMetricFamily("fleetctl_jobs", "Jobs in the queue by state.", labels=["state"])
        for state, count in counts.items():
            jobs.add_metric([label(state)], float(count))
        return jobs


def gpu_labels(snapshot: TelemetrySnapshot, gpu: GpuSample, position: int) -> list[str]:
    """dcgm-exporter's labels, in GPU_LABELS order. ``Hostname`` is the host's address as the
    inventory names it (dcgm-exporter's is the node name); the GPU's index falls back to its position."""
    index = gpu.index if gpu.index is not None else position
    return [str(index), label(gpu.uuid), label(gpu.name), label(snapshot.hostname or snapshot.agent), label(snapshot.agent)]


def registry_for(collector: Collector) -> CollectorRegistry:
    """A registry of our own: the global one would add this process's Python and GC series."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry


# -- the address ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Address:
    host: str
    port: int

    @property
    def loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False  # a name: it may resolve anywhere

    def url(self, port: int | None = None) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port if port is None else port}/metrics"


def parse_address(text: str) -> Address:
    """``HOST:PORT``, ``[IPv6]:PORT``, ``:PORT`` or ``PORT``; a missing host is 127.0.0.1 (loopback
    unless asked). Port 0 picks a free one."""
    raw = text.strip()
    host, sep, port_text = raw.rpartition(":")
    if not sep:
        host, port_text = "", raw
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ConfigError(f"--metrics {text!r}: an IPv6 address needs brackets", hint="write e.g. [::1]:9400")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"--metrics {text!r}: the port must be a number from 0 to 65535",
                          hint=f"write HOST:PORT, :PORT or PORT, e.g. 127.0.0.1:{DEFAULT_PORT}")
    return Address(host or "127.0.0.1", int(port_text))


# -- the server ----------------------------------------------------------------------------------
class MetricsServer:
    """prometheus_client's threaded WSGI server on ``address``, stopped by :meth:`stop`."""

    def __init__(self, address: Address, collector: FleetCollector) -> None:
        self.address = address
        self.collector = collector
        try:
            self._httpd, self._thread = start_http_server(address.port, address.host, registry=registry_for(collector))
        except OSError as exc:
            reason = "the port is in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
            raise FleetError(f"cannot serve metrics on {address.host}:{address.port}: {reason}",
                             hint="pick another address with --metrics HOST:PORT") from None
        self._stopped = threading.Event()

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        return self.address.url(self.port)

    def stop(self) -> None:
        """Stop answering, wait for the serving thread, close the socket and the store (once)."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        httpd: WSGIServer = self._httpd
        httpd.shutdown()
        httpd.server_close()
        self._thread.join(timeout=5)
        self.collector.store.close()


def serve_metrics(address: Address, state_dir: str | os.PathLike[str], *, agents: Callable[[], list[str]] | None = None,
                  max_age_s: float | None = None, store_url: str | None = None) -> MetricsServer:
    """Open the fleet's store (``store_url``, else the SQLite file of ``state_dir``) on a connection
    of its own and serve its fleet on ``address`` until ``stop()``."""
    store = open_store(store_url, state_dir)
    try:
        return MetricsServer(address, FleetCollector(store, agents=agents, max_age_s=max_age_s))
    except BaseException:
        store.close()
        raise


__all__ = ["Address", "FleetCollector", "MetricsServer", "gpu_labels", "label", "parse_address", "registry_for",
           "serve_metrics"]
