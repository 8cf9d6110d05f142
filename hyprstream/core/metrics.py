"""Core's Prometheus metrics, counted from its audit log and read from its repository.

Every call core answers is audited before it returns (:mod:`hyprstream.core.audit`), so the audit log is
the one place to count from: :class:`CoreMetrics` listens to each appended entry (never to the network)
and counts it by action and outcome, and pushes by model, fog, outcome and refusal code. Gauges of each
model (current version, last commit time) are read from the repository at each scrape, so they are
never stale. Names follow Prometheus' conventions: ``hyprstream_core_`` prefix, base units as suffixes
(``_seconds``), ``_total`` counters (written by ``prometheus_client``), full precision.

``/healthz`` is ok while the audit log can be written (core refuses every call otherwise) and the
Flight server runs; core is ready as soon as it serves, so ``/readyz`` is the same check.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from hyprstream.core.audit import AuditEntry, AuditLog
from hyprstream.core.repository import ModelRepository


class _Models(Collector):
    """Per-model gauges, read from the repository at each scrape."""

    def __init__(self, repository: ModelRepository) -> None:
        self.repository = repository

    def collect(self) -> Iterator[GaugeMetricFamily]:
        version = GaugeMetricFamily("hyprstream_core_model_version", "Current version of each model.",
                                    labels=["model"])
        committed = GaugeMetricFamily("hyprstream_core_model_last_commit_timestamp_seconds",
                                      "Unix time at which each model's current version was committed.",
                                      labels=["model"])
        accuracy = GaugeMetricFamily("hyprstream_core_model_accuracy_ratio", "Accuracy of each model's current "
                                     "version on core's validation rows (models with an evaluation).",
                                     labels=["model"])
        federated = GaugeMetricFamily("hyprstream_core_model_federated_accuracy_ratio", "Accuracy of each model's "
                                      "newest version that fogs scored on their agents' held-out data.",
                                      labels=["model"])
        for model in self.repository.models():
            versions = self.repository.versions(model)
            last = versions[-1]
            scored = next((v.federated_score for v in reversed(versions) if v.federated), None)
            if scored is not None:
                federated.add_metric([model], scored["accuracy"])
            version.add_metric([model], last.version)
            committed.add_metric([model], last.created)
            if last.accuracy is not None:
                accuracy.add_metric([model], last.accuracy)
        yield version
        yield committed
        yield accuracy
        yield federated


class CoreMetrics:
    """The registry ``core run`` serves on its metrics endpoint."""

    def __init__(self, repository: ModelRepository, audit: AuditLog | None) -> None:
        self.registry = CollectorRegistry()
        self.audit = audit
        self.entries = Counter("hyprstream_core_audit_entries", "Audit log entries appended, by action and outcome.",
                               ["action", "outcome"], registry=self.registry)
        self.pushes = Counter("hyprstream_core_pushes", "Pushes core answered, by model, fog, outcome (ok, refused, "
                              "failed) and refusal code (empty unless refused).",
                              ["model", "fog", "outcome", "code"], registry=self.registry)
        Gauge("hyprstream_core_start_time_seconds", "Unix time at which core started.",
              registry=self.registry).set(time.time())
        last_seq = Gauge("hyprstream_core_audit_last_seq", "Sequence number of the audit log's last entry.",
                         registry=self.registry)
        if audit is not None:
            last_seq.set_function(lambda: audit.last_seq)
            audit.listeners.append(self.count)
        self.registry.register(_Models(repository))

    def count(self, entry: AuditEntry) -> None:
        """Count one appended audit entry (called by the audit log, under its lock: cheap, never raises)."""
        outcome = str(entry.outcome)
        self.entries.labels(entry.action, outcome).inc()
        if entry.action == "model.push":
            details = entry.details or {}
            model = entry.subject.removeprefix("model/")
            self.pushes.labels(model, str(details.get("fog", entry.actor)), outcome,
                               str(details.get("code", "")) if outcome != "ok" else "").inc()

    def close(self) -> None:
        if self.audit is not None and self.count in self.audit.listeners:
            self.audit.listeners.remove(self.count)


__all__ = ["CoreMetrics"]
