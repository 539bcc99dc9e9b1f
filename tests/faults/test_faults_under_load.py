"""The fault suite: under a steady load of jobs and API calls, one process of each kind is
killed with SIGKILL at a bad moment, or a server is restarted or stopped a while. After each:
every submitted job reaches a final state once (none lost, none with its images twice, none
left `inprogress`), every download ends Active or Failed with a reason, no HTTP call hangs past
its timeout, every process reconnects by itself, and while a dependency is down the API
answers 503 naming it, never a 500. The counts of each fault are printed at the end of the run
("fault figures")."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import boto3
import pytest
from botocore.config import Config

from deploy.local.first_image import TINY_MODEL, Client, _ensure_model
from deploy.local.process import ManagedProcess, port_open
from deploy.local.servers import EmbeddedMongo
from tests.e2e.test_training import make_dataset, unique
from tests.faults.conftest import FIGURES, processes_of, remove_endpoint
from tests.faults.load import Load
from tests.support import wait_for

pytestmark = pytest.mark.faults

BEFORE, AFTER = 4.0, 8.0  # seconds of load before the fault and after it is over


@pytest.fixture(scope="module")
def storage(stack):
    return boto3.client(
        "s3",
        endpoint_url=stack.s3_endpoint_url,
        aws_access_key_id=stack.s3_access_key,
        aws_secret_access_key=stack.s3_secret_key,
        region_name="us-east-1",
        config=Config(signature_version="s3v4", s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
    )


@pytest.fixture(scope="module")
def endpoint(stack, api, tmp_path_factory) -> Iterator[str]:
    _ensure_model(Client(stack.gateway_url, stack.api_key, stack.admin_username), tmp_path_factory.mktemp("m"), print)
    created = api(
        "POST",
        "/endpoints",
        json={
            "endpoint_name": "faults",
            "endpoint_type": "Async",
            "instance_type": "local",
            "initial_instance_count": 2,
            "autoscaling_enabled": False,
            "assign_to_roles": ["IT Operator"],
        },
    )
    assert created.status_code == 202, created.text
    name = created.json()["data"]["endpoint_name"]

    def in_service() -> bool:
        listed = api("GET", "/endpoints").json()["data"]["endpoints"]
        return any(e["endpoint_name"] == name and e["current_instance_count"] == "2" for e in listed)

    wait_for(in_service, timeout=240, what="the endpoint's two workers")
    yield name
    remove_endpoint(stack, api, name)


@contextmanager
def load_during(fault: str, stack, api, endpoint, storage):
    """Load before, during and after what the `with` block does; then the reckoning."""
    load = Load(stack.gateway_url, stack.api_key, stack.admin_username, endpoint, TINY_MODEL)
    with load:
        time.sleep(BEFORE)
        yield load
        time.sleep(AFTER)
    figures = load.settle(storage, stack.base_env.get("ESD_S3_BUCKET", "esd"))
    FIGURES[fault] = figures.line()
    assert figures.submitted > 0
    assert (figures.lost, figures.duplicated) == (0, 0), figures.line()
    assert not figures.given_up, figures.given_up
    assert not figures.server_errors, figures.server_errors[:5]
    assert not figures.hung, figures.hung[:5]
    assert not figures.unnamed_503, figures.unnamed_503[:5]
    # everything reconnected by itself: every route answers again
    for path in ("/users", "/checkpoints", "/inferences", "/endpoints", "/trainings"):
        assert api("GET", path).status_code == 200, path


def kill_and_wait_back(stack, name: str) -> None:
    process = stack.processes[name]
    old = process.running_pid()
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: process.running_pid() not in (None, old), timeout=60, what=f"{name} restarted")


def test_the_gateway_killed_with_calls_in_flight(stack, api, endpoint, storage):
    with load_during("gateway", stack, api, endpoint, storage):
        kill_and_wait_back(stack, "gateway")


def test_identity_killed(stack, api, endpoint, storage):
    with load_during("identity", stack, api, endpoint, storage):
        kill_and_wait_back(stack, "identity")


def test_inference_killed_between_dispatch_and_record(stack, api, endpoint, storage):
    with load_during("inference", stack, api, endpoint, storage) as load:
        wait_for(lambda: len(load.jobs) >= 3, timeout=60)  # jobs dispatched, some not yet recorded
        kill_and_wait_back(stack, "inference")


def test_an_inference_worker_killed_mid_step(stack, api, endpoint, storage):
    with load_during("inference worker", stack, api, endpoint, storage):
        workers = wait_for(lambda: processes_of(stack.var_dir, "services.inference.worker"), timeout=60)
        os.kill(workers[0], signal.SIGKILL)


class SlowFiles:
    """An HTTP server that sends a file slowly (64 KiB every 20 ms): a download of it is still
    running when the checkpoint service is killed."""

    def __init__(self, size: int) -> None:
        import http.server

        body = os.urandom(size)

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    for start in range(0, len(body), 65536):
                        self.wfile.write(body[start : start + 65536])
                        time.sleep(0.02)
                except OSError:
                    pass  # the downloader went away

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()


def test_checkpoint_killed_mid_download(stack, api, endpoint, storage):
    files = SlowFiles(8 * 1024 * 1024)  # about 2.5 s to send
    try:
        with load_during("checkpoint", stack, api, endpoint, storage):
            created = api(
                "POST",
                "/checkpoints",
                json={"checkpoint_type": "Lora", "urls": [f"{files.url}/files/{unique('slow')}.safetensors"]},
            )
            assert created.status_code == 202, created.text
            checkpoint_id = created.json()["data"]["checkpoints"][0]["id"]
            time.sleep(1.0)
            kill_and_wait_back(stack, "checkpoint")

        def ended():
            response = api("GET", f"/checkpoints/{checkpoint_id}")
            checkpoint = response.json().get("data", {}).get("checkpoint", {}) if response.status_code == 200 else {}
            return checkpoint.get("status") in ("Active", "Failed") and checkpoint

        checkpoint = wait_for(ended, timeout=120, what="the download to end")
        assert checkpoint["status"] == "Active" or checkpoint.get("params", {}).get("message"), checkpoint
    finally:
        files.close()


@pytest.fixture(scope="module")
def training(api, endpoint):
    """Starts a training of many short epochs: returns its id."""

    def start() -> str:
        dataset = unique("faults")
        make_dataset(api, dataset, count=2)
        response = api(
            "POST",
            "/trainings",
            json={
                "lora_train_type": "kohya",
                "params": {
                    "training_params": {
                        "training_instance_type": "local",
                        "fm_type": "sd_1_5",
                        "model": TINY_MODEL,
                        "dataset": dataset,
                    },
                    "config_params": {
                        "training": {
                            "output_name": unique("faults").replace("-", "_"),
                            "max_train_epochs": 30,
                            "resolution": 64,
                            "learning_rate": 0.001,
                            "save_every_n_epochs": 100,
                        }
                    },
                },
            },
        )
        assert response.status_code == 201, response.text
        return response.json()["data"]["id"]

    return start


def training_ended(api, training_id: str) -> dict:
    def ended():
        response = api("GET", f"/trainings/{training_id}")
        data = response.json().get("data", {}) if response.status_code == 200 else {}
        return data.get("job_status") in ("Completed", "Failed") and data

    return wait_for(ended, timeout=300, what="the training to end")


def training_running(api, training_id: str) -> bool:
    response = api("GET", f"/trainings/{training_id}")
    return response.status_code == 200 and (response.json()["data"].get("progress") or {}).get("epoch", 0) >= 1


@pytest.mark.parametrize("victim", ["training worker", "training"])
def test_training_killed_mid_epoch(stack, api, endpoint, storage, training, victim):
    training_id = training()
    with load_during(victim, stack, api, endpoint, storage):
        wait_for(lambda: training_running(api, training_id), timeout=180, what="the training's first epoch")
        if victim == "training":
            kill_and_wait_back(stack, "training")
        else:
            os.kill(processes_of(stack.var_dir, "services.training.worker")[0], signal.SIGKILL)
    ended = training_ended(api, training_id)
    assert ended["job_status"] == "Completed", ended


def test_rabbitmq_restarted(stack, api, endpoint, storage, broker):
    with load_during("rabbitmq restart", stack, api, endpoint, storage):
        broker.stop()
        time.sleep(3)
        broker.start()


def test_mongodb_restarted(stack, api, endpoint, storage):
    mongo = EmbeddedMongo(stack.var_dir, stack.mongo_port)
    with load_during("mongodb restart", stack, api, endpoint, storage):
        mongo.process.send(signal.SIGKILL)
        wait_for(lambda: mongo.process.running_pid() is None, timeout=30)
        time.sleep(3)
        mongo.start(stack.base_env)


def test_s3_stopped_for_20_seconds(stack, api, endpoint, storage):
    weed = processes_of(stack.var_dir, "server")[0]  # `weed server ...`
    argv = [part.decode() for part in Path(f"/proc/{weed}/cmdline").read_bytes().split(b"\0") if part]
    process = ManagedProcess("weed", stack.var_dir, argv, marker=argv[0])
    with load_during("s3 stopped 20 s", stack, api, endpoint, storage):
        os.kill(weed, signal.SIGKILL)
        time.sleep(20)
        process.start(stack.base_env)
        wait_for(lambda: port_open("127.0.0.1", stack.s3_port), timeout=60, what="S3 again")
