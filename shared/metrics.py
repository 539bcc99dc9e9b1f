"""Prometheus metrics of every process (gateway, services, workers): the series, all named
`esd_*` and declared here once (so that a dashboard has one place to look), and serving them.

A process serves `/metrics` on its own port (`ESD_METRICS_PORT`, none when unset) from a
thread, so a scrape never waits on the event loop or a job. Each series is filled where its
event happens: HTTP in the gateway's middleware, RPC in `shared/rpc.py`, pools and jobs in the
services, steps, images and models in the workers. Every series has labels, so a process shows
only the series it fills.

Where Prometheus finds them: Kubernetes scrapes the pods' annotated port; the local stack gives
every process a port and writes `<var>/metrics/<process>.json` in Prometheus's file-based
discovery format (`file_sd_configs`), so that workers, which come and go on ports of their
own, are found too.
"""

from __future__ import annotations

import atexit
import json
import time
from pathlib import Path

import structlog
from prometheus_client import Counter, Gauge, Histogram, start_http_server

from shared.settings import Settings

log = structlog.get_logger(__name__)

# generation and loading run from milliseconds (a tiny model on a GPU) to minutes (SDXL on a CPU)
_LONG = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

HTTP_REQUEST_SECONDS = Histogram(
    "esd_http_request_duration_seconds",
    "Gateway: time from a request to its response's start, by route template and status",
    ["method", "route", "status"],
)
RPC_CALL_SECONDS = Histogram(
    "esd_rpc_call_duration_seconds",
    "Time from an RPC call to its reply, as the caller sees it, by command and outcome",
    ["command", "outcome"],
)
RPC_HANDLE_SECONDS = Histogram(
    "esd_rpc_handle_duration_seconds",
    "Time a service spends answering a command, by command and outcome",
    ["command", "outcome"],
)
QUEUE_DEPTH = Gauge("esd_queue_depth", "Jobs waiting in an endpoint's queue", ["endpoint"])
POOL_WORKERS = Gauge("esd_pool_workers", "Workers of an endpoint's pool", ["endpoint"])
POOL_BUSY_WORKERS = Gauge("esd_pool_busy_workers", "Workers of an endpoint's pool running a job", ["endpoint"])
JOBS_BY_STATUS = Counter(
    "esd_jobs_total", "Jobs that reached a status, by kind (inference, training)", ["kind", "status"]
)
INFERENCE_STEP_SECONDS = Histogram(
    "esd_inference_step_seconds", "Time per denoising step, by endpoint", ["endpoint"], buckets=_LONG
)
INFERENCE_IMAGE_SECONDS = Histogram(
    "esd_inference_image_seconds",
    "Time per image of a job (its generation time over its images), by endpoint",
    ["endpoint"],
    buckets=_LONG,
)
MODEL_LOAD_SECONDS = Histogram(
    "esd_model_load_seconds",
    "Time to load a model: `download` into the disk cache, or a checkpoint, VAE or ControlNet into memory",
    ["kind"],
    buckets=_LONG,
)
MODEL_CACHE_REQUESTS = Counter(
    "esd_model_cache_requests_total",
    "Model look-ups in a worker's caches (`disk`: files, `memory`: loaded models), hit or miss",
    ["cache", "result"],
)
WEBHOOK_DELIVERIES = Counter(
    "esd_webhook_deliveries_total", "Webhook delivery attempts, by outcome (delivered, retry, dead)", ["outcome"]
)
WEBHOOK_SECONDS = Histogram("esd_webhook_delivery_duration_seconds", "Time of a webhook delivery attempt", ["outcome"])
TRAINING_STEP_SECONDS = Histogram(
    "esd_training_step_seconds", "Time per training step, by training pool", ["pool"], buckets=_LONG
)
TRAINING_LOSS = Gauge("esd_training_loss", "Loss of a training worker's latest step", ["pool"])
TRAINING_EPOCH = Gauge("esd_training_epoch", "Epoch of a training worker's latest step", ["pool"])


class StepClock:
    """Observes the time between consecutive steps of one job into a histogram. The time to
    the first step (fetching, loading, encoding) is no step's: it is not observed."""

    def __init__(self, histogram) -> None:
        self.histogram = histogram
        self.last: float | None = None

    def step(self) -> None:
        now = time.perf_counter()
        if self.last is not None:
            self.histogram.observe(now - self.last)
        self.last = now


def targets_dir(settings: Settings) -> Path:
    return settings.var_dir.resolve() / "metrics"


def serve_metrics(settings: Settings, process: str) -> int | None:
    """Serve `/metrics` on `settings.metrics_port` (0: a free one) and say where: in the log
    and in `<var>/metrics/<process>.json` (removed at exit). Returns the port, None when off."""
    if settings.metrics_port is None:
        return None
    server, _ = start_http_server(settings.metrics_port, addr=settings.metrics_host)
    port = server.server_port
    host = "127.0.0.1" if settings.metrics_host in ("", "0.0.0.0", "::") else settings.metrics_host
    target = f"{host}:{port}"
    log.info("metrics.serving", url=f"http://{target}/metrics")
    path = targets_dir(settings) / f"{process}.json"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        content = json.dumps([{"targets": [target], "labels": {"process": process}}])
        path.write_text(content)
        atexit.register(_remove_if_ours, path, content)
    except OSError as error:  # a read-only var folder: the log says where the metrics are
        log.warning("metrics.target_not_written", path=str(path), error=str(error))
    return port


def _remove_if_ours(path: Path, content: str) -> None:
    """At exit, a process removes its target unless a successor of the same name rewrote it."""
    try:
        if path.read_text() == content:
            path.unlink()
    except OSError:
        pass
