"""Metrics and the console's files, without servers: what is observed and under which labels,
where workers serve theirs, and which files /console serves ahead of the key check."""

import json
import socket

from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry, Histogram

from deploy.local.stack import LocalStack
from services.gateway.metrics import RequestMetrics
from services.gateway.routes.console import ConsoleFiles, console_files
from services.training.worker.__main__ import loss_curve
from shared.metrics import HTTP_REQUEST_SECONDS, StepClock, _remove_if_ours, serve_metrics
from shared.pools import LocalPool
from shared.settings import Settings


def test_a_step_clock_observes_the_time_between_steps_not_before_the_first():
    histogram = Histogram("steps", "test", registry=CollectorRegistry())
    clock = StepClock(histogram)
    for _ in range(4):
        clock.step()
    observed = [s.value for s in histogram.collect()[0].samples if s.name == "steps_count"]
    assert observed == [3]


def test_the_loss_curve_keeps_every_step_or_spreads_its_points_over_them():
    assert loss_curve([0.5, 0.4]) == [[1, 0.5], [2, 0.4]]
    curve = loss_curve([float(i) for i in range(1000)], points=200)
    assert len(curve) == 200
    assert curve[0] == [1, 0.0] and curve[-1] == [1000, 999.0]
    assert [step for step, _ in curve] == sorted({step for step, _ in curve})


def count(method: str, route: str, status: str) -> float:
    wanted = {"method": method, "route": route, "status": status}
    samples = HTTP_REQUEST_SECONDS.collect()[0].samples
    return next((s.value for s in samples if s.name.endswith("_count") and s.labels == wanted), 0.0)


def test_http_requests_are_timed_by_route_template_and_status():
    app = FastAPI()

    @app.get("/things/{thing_id}")
    async def thing(thing_id: str) -> dict:
        return {"id": thing_id}

    app.add_middleware(RequestMetrics)
    client = TestClient(app)
    before = count("GET", "/things/{thing_id}", "200")
    client.get("/things/a")
    client.get("/things/b")
    assert count("GET", "/things/{thing_id}", "200") == before + 2  # one series, not one per id
    before_unrouted = count("GET", "unrouted", "404")
    client.get("/nowhere")
    assert count("GET", "unrouted", "404") == before_unrouted + 1


def test_workers_of_a_service_with_metrics_serve_theirs_on_free_ports(tmp_path):
    pool = LocalPool(tmp_path, env={"ESD_METRICS_PORT": "9101", "ESD_WORKER_THREADS": "2"})
    assert pool._worker_env(host_total=1)["ESD_METRICS_PORT"] == "0"
    assert pool._worker_env(host_total=1)["ESD_WORKER_THREADS"] == "2"
    quiet = LocalPool(tmp_path, env={"ESD_METRICS_PORT": ""})
    assert not quiet._worker_env(host_total=1)["ESD_METRICS_PORT"]


def test_a_process_says_where_its_metrics_are(tmp_path):
    assert serve_metrics(Settings(var_dir=tmp_path), "quiet") is None  # no port set: none served
    port = serve_metrics(Settings(var_dir=tmp_path, metrics_port=0), "worker-w1")
    assert port
    target = json.loads((tmp_path / "metrics" / "worker-w1.json").read_text())
    assert target == [{"targets": [f"127.0.0.1:{port}"], "labels": {"process": "worker-w1"}}]


def test_the_stack_lists_only_targets_whose_process_still_answers(tmp_path):
    port = serve_metrics(Settings(var_dir=tmp_path, metrics_port=0), "worker-alive")
    with socket.socket() as closed:  # a port nothing listens on: a process killed with SIGKILL
        closed.bind(("127.0.0.1", 0))
        dead = closed.getsockname()[1]
    stale = [{"targets": [f"127.0.0.1:{dead}"], "labels": {"process": "worker-killed"}}]
    (tmp_path / "metrics" / "worker-killed.json").write_text(json.dumps(stale))
    urls = LocalStack(tmp_path, quiet=True).metrics_urls()
    assert urls == {"worker-alive": f"http://127.0.0.1:{port}/metrics"}


def test_a_process_leaves_a_successors_target_alone_at_exit(tmp_path):
    path = tmp_path / "w.json"
    path.write_text("mine")
    _remove_if_ours(path, "mine")
    assert not path.exists()
    path.write_text("the successor's")
    _remove_if_ours(path, "mine")
    assert path.read_text() == "the successor's"


def console_client() -> TestClient:
    api = FastAPI()

    @api.get("/ping")
    async def ping() -> dict:
        return {"message": "pong"}

    api.add_middleware(ConsoleFiles)
    return TestClient(api, follow_redirects=False)


def test_the_console_serves_its_own_files_only():
    client = console_client()
    assert client.get("/console").headers["location"] == "/console/"
    page = client.get("/console/")
    assert page.status_code == 200 and "<title>ESD console</title>" in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    script = client.get("/console/console.js")
    assert script.status_code == 200 and script.headers["content-type"].startswith("text/javascript")
    assert client.get("/console/../security.py").status_code == 404
    assert client.get("/console/missing.js").status_code == 404
    assert client.post("/console/").status_code == 405
    assert client.get("/ping").json() == {"message": "pong"}  # the rest goes on to the API
    assert set(console_files()) >= {"/console/index.html", "/console/console.js", "/console/api.js"}


def test_the_console_fetches_nothing_from_elsewhere():
    for path in console_files().values():
        text = path.read_text()
        assert "http://" not in text and "https://" not in text and "//cdn" not in text, path


def test_the_dashboard_shows_only_series_the_processes_have():
    import re
    from pathlib import Path

    from prometheus_client import REGISTRY

    dashboard = json.loads((Path(__file__).parents[2] / "deploy" / "grafana" / "esd.json").read_text())
    queries = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    known = {
        sample_name
        for collector in REGISTRY.collect()
        for sample_name in [collector.name, *(f"{collector.name}{s}" for s in ("_count", "_sum", "_bucket", "_total"))]
        if collector.name.startswith("esd_")
    }
    used = {name for query in queries for name in re.findall(r"\besd_[a-z_]+", query)}
    assert used and used <= known, used - known
    assert {name.removesuffix("_bucket").removesuffix("_count").removesuffix("_sum") for name in used} >= {
        "esd_http_request_duration_seconds",
        "esd_rpc_call_duration_seconds",
        "esd_queue_depth",
        "esd_pool_workers",
        "esd_jobs_total",
        "esd_inference_step_seconds",
        "esd_inference_image_seconds",
        "esd_model_load_seconds",
        "esd_model_cache_requests_total",
        "esd_training_step_seconds",
        "esd_training_loss",
    }
