"""The agent's Prometheus metrics and health check, served beside its record API (``--listen`` / ``--socket``).

``GET /metrics`` answers the Prometheus text format (``prometheus_client``): what the device ingested and
rejected, its inference traffic, the model version it serves, its adaptive strategy, its resources, the
SuperNode's starts and whether its sample-level privacy budget is spent. No record, prediction or data
size leaves through it (the row count stays on the device, as in telemetry). Values are read from the
running agent at each scrape, so they are never stale. ``GET /healthz`` is 200 while the agent's loop
ticks and, when it joins a fog, its SuperNode runs; 503 with the reason otherwise.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from hyprstream.agent.profile import Strategy

if TYPE_CHECKING:
    from hyprstream.agent.daemon import Agent


def _gauge(name: str, text: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, text, value=value)


def _counter(name: str, text: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, text, value=value)  # written as <name>_total


class AgentMetrics(Collector):
    """The running agent's state as metric families, read at each scrape."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.started = time.time()
        self.registry = CollectorRegistry()
        self.registry.register(self)

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        a = self.agent
        yield _gauge("hyprstream_agent_start_time_seconds", "Unix time at which the agent started.", self.started)
        if getattr(a, "pipeline", None) is not None:
            records, rejected = a.pipeline.stats()
            yield _counter("hyprstream_agent_records_ingested", "Records stored in the device's store.", records)
            yield _counter("hyprstream_agent_records_rejected", "Records refused as malformed (nothing stored).",
                           rejected)
        if getattr(a, "engine", None) is not None:
            es = a.engine.stats()
            yield _counter("hyprstream_agent_inference_requests", "Inference requests answered.", es.requests)
            yield _counter("hyprstream_agent_inference_batches", "Inference batches run.", es.batches)
            yield _counter("hyprstream_agent_inference_errors", "Inference requests that failed.", es.errors)
            if es.version is not None:
                yield _gauge("hyprstream_agent_model_version", "Global model version the device serves.", es.version)
        decision = getattr(a, "decision", None)
        if decision is not None:
            strategy = GaugeMetricFamily("hyprstream_agent_strategy", "1 for the adaptive strategy in force, 0 for "
                                         "the others.", labels=["strategy"])
            for s in Strategy:
                strategy.add_metric([s.value], float(s is decision.strategy))
            yield strategy
        sample = getattr(a, "sample", None)
        if sample is not None:
            yield _gauge("hyprstream_agent_cpu_ratio", "CPU use of the device, 0 to 1.", sample.cpu_percent / 100)
            yield _gauge("hyprstream_agent_memory_ratio", "Memory use of the device, 0 to 1.",
                         sample.memory_percent / 100)
            if sample.battery_percent is not None:
                yield _gauge("hyprstream_agent_battery_ratio", "Battery charge, 0 to 1.", sample.battery_percent / 100)
            if sample.soc_temp_c is not None:
                yield _gauge("hyprstream_agent_soc_temperature_celsius", "SoC temperature.", sample.soc_temp_c)
        if getattr(a, "last_tick", None) is not None:
            yield _gauge("hyprstream_agent_last_tick_timestamp_seconds", "Unix time of the agent loop's last step.",
                         a.last_tick)
        supernode = getattr(a, "supernode", None)
        if supernode is not None:
            yield _counter("hyprstream_agent_supernode_starts", "Starts of the Flower SuperNode (restarts after "
                           "the first).", supernode.starts)
        spent = getattr(a, "_budget_spent", None)
        if spent is not None and a.profile.dpsgd() is not None:
            yield _gauge("hyprstream_agent_privacy_budget_spent", "1 once the device's sample-level DP budget "
                         "cannot pay for another round.", float(spent))

    def health(self) -> tuple[bool, str]:
        a = self.agent
        now = time.time()
        allowed = 3 * a.config.tick_s + 30
        if a.last_tick is None or now - a.last_tick > allowed:
            return False, f"the agent loop has not stepped in {allowed:g} s"
        supernode = getattr(a, "supernode", None)
        if supernode is not None and supernode.pid is None:
            return False, "the SuperNode is not running (it is restarted with backoff)"
        return True, "ok"


__all__ = ["AgentMetrics"]
