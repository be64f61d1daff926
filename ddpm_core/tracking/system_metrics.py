"""MLflow's system metrics (CPU, memory, disk, network: `system/*`) of a stage run,
written through the store's patient client."""

from __future__ import annotations

import contextlib
import logging
import os
import time

from mlflow.entities import Metric
from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

from ddpm_core.tracking.store import _PatientClient

# The system-metrics monitor announces its start and stop, and warns when one of its
# status reads meets a store locked by a parallel experiment (it tries again 10 s later).
logging.getLogger("mlflow.system_metrics.system_metrics_monitor").setLevel(logging.ERROR)

SYSTEM_METRICS_SECONDS = 10  # sampling interval of CPU, memory, disk and network (system/* metrics)


def system_metrics_enabled() -> bool:
    """On unless MLflow's own switch, MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING, says false (or 0)."""
    return os.environ.get("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "true").strip().lower() not in ("false", "0", "no")


class _SystemMetrics(SystemMetricsMonitor):
    """MLflow's system-metrics monitor, writing through the patient client: its own client
    gives up on a SQLite store locked by a parallel experiment and says so on stderr."""

    def __init__(self, client: _PatientClient, run_id: str, uri: str):
        super().__init__(run_id, sampling_interval=SYSTEM_METRICS_SECONDS, tracking_uri=uri)
        self._client = client

    def finish(self) -> None:
        """Stop, then log one last sample: a stage shorter than the interval still gets one."""
        started = self._process is not None
        super().finish()
        if started:
            with contextlib.suppress(Exception):  # never fail a stage over its system metrics
                self.collect_metrics()
                self.publish_metrics(self.aggregate_metrics())

    def publish_metrics(self, metrics: dict[str, float]) -> None:
        timestamp = int(time.time() * 1000)
        entries = [
            Metric(self._metrics_prefix + k, float(v), timestamp, self._logging_step) for k, v in metrics.items()
        ]
        self._client.log_batch(self._run_id, metrics=entries)
        self._logging_step += 1
        for monitor in self.monitors:
            monitor.clear_metrics()
