"""What the local stack does when one of its processes dies or a server it needs goes away:
the process comes back by itself (and `make status` says so), a killed service's workers do
not outlive it, a call to a service with no live replica fails at once, and an outage of the
broker or the database is a 503 naming it, never a 500."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from deploy.local import supervisor
from deploy.local.servers import EmbeddedMongo
from tests.faults.conftest import alive, processes_of, remove_endpoint
from tests.support import wait_for

pytestmark = pytest.mark.faults


def answers(api, method: str, path: str, **kwargs) -> int:
    try:
        return api(method, path, **kwargs).status_code
    except Exception:  # the gateway itself may be down a moment
        return 0


def kill(stack, name: str) -> int:
    pid = stack.processes[name].running_pid()
    assert pid is not None, f"{name} is not running"
    os.kill(pid, signal.SIGKILL)
    return pid


def back(stack, name: str, old_pid: int) -> bool:
    pid = stack.processes[name].running_pid()
    return pid is not None and pid != old_pid


def test_a_killed_service_is_restarted_and_make_status_says_so(stack, api):
    restarts = {name: watched["restarts"] for name, watched in supervisor.read_state(stack.var_dir).items()}
    old = kill(stack, "identity")
    wait_for(lambda: back(stack, "identity", old), timeout=60, what="identity restarted")
    wait_for(lambda: answers(api, "GET", "/users") == 200, timeout=60, what="GET /users answering again")
    assert supervisor.read_state(stack.var_dir)["identity"]["restarts"] == restarts["identity"] + 1

    old = kill(stack, "gateway")
    wait_for(lambda: answers(api, "GET", "/ping") == 200 and back(stack, "gateway", old), timeout=60)

    status = subprocess.run(
        [sys.executable, "-m", "deploy.local", "status", "--var-dir", str(stack.var_dir)],
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    lines = {line.split()[0]: line for line in status.splitlines() if line.strip()}
    assert f"restarted {restarts['identity'] + 1} times" in lines["identity"], status
    assert f"restarted {restarts['gateway'] + 1} times" in lines["gateway"], status
    assert "running" in lines["supervisor"], status


@pytest.fixture(scope="module")
def endpoint(stack, api) -> Iterator[str]:
    created = api(
        "POST",
        "/endpoints",
        json={
            "endpoint_name": "recovery",
            "endpoint_type": "Async",
            "instance_type": "local",
            "initial_instance_count": 1,
            "autoscaling_enabled": False,
            "assign_to_roles": ["IT Operator"],
        },
    )
    assert created.status_code == 202, created.text
    name = created.json()["data"]["endpoint_name"]

    def in_service() -> bool:
        listed = api("GET", "/endpoints").json()["data"]["endpoints"]
        return any(e["endpoint_name"] == name and e["endpoint_status"] == "InService" for e in listed)

    wait_for(in_service, timeout=180, what="the endpoint InService")
    yield name
    remove_endpoint(stack, api, name)


@pytest.mark.parametrize(
    ("service", "worker"),
    [("inference", "services.inference.worker"), ("training", "services.training.worker")],
)
def test_a_killed_service_leaves_no_worker_behind(stack, api, endpoint, service, worker):
    before = wait_for(lambda: processes_of(stack.var_dir, worker), timeout=120, what=f"a {worker} process")
    old = kill(stack, service)
    # they drain and exit: nothing is left consuming outside the pool of the service's successor
    wait_for(lambda: not any(alive(pid) for pid in before), timeout=60, what=f"the workers of the killed {service}")
    wait_for(lambda: back(stack, service, old), timeout=60, what=f"{service} restarted")
    # the successor starts its own pool: as many workers as before, never both sets
    after = wait_for(
        lambda: (found := processes_of(stack.var_dir, worker)) and len(found) == len(before) and found,
        timeout=180,
        what=f"the successor's {worker} processes",
    )
    assert not set(after) & set(before)
    time.sleep(3)
    assert len(processes_of(stack.var_dir, worker)) == len(before)


@pytest.fixture
def unsupervised(stack):
    """The supervisor paused, so that what a test kills stays down until it is done."""
    stack.supervisor.stop()
    yield
    stack.supervise()


TRAINING = {
    "lora_train_type": "kohya",
    "params": {
        "training_params": {
            "training_instance_type": "local",
            "fm_type": "sd_1_5",
            "model": "no-such-model.safetensors",
            "dataset": "no-such-dataset",
        },
        "config_params": {"training": {"output_name": "recovery", "max_train_epochs": 1}},
    },
}


def test_a_call_to_a_service_with_no_replica_fails_at_once(stack, api, unsupervised):
    timeout = float(stack.env.get("ESD_RPC_TIMEOUT", 10))
    old = kill(stack, "checkpoint")
    try:
        began = time.monotonic()
        direct = api("GET", "/checkpoints")
        direct_seconds = time.monotonic() - began
        # the training service asks the checkpoint service first: a chain of two calls
        began = time.monotonic()
        chained = api("POST", "/trainings", json=TRAINING)
        chained_seconds = time.monotonic() - began
    finally:
        stack.supervise()
    assert direct.status_code == 503, direct.text
    assert "checkpoint service is unavailable" in direct.json()["message"]
    assert chained.status_code == 503, chained.text
    assert "checkpoint service is unavailable" in chained.json()["message"]
    # not after an RPC timeout (nor two, chained): the broker knows no replica consumes
    assert direct_seconds < timeout / 2 and chained_seconds < timeout / 2, (direct_seconds, chained_seconds)
    wait_for(lambda: back(stack, "checkpoint", old), timeout=60)
    wait_for(lambda: answers(api, "GET", "/checkpoints") == 200, timeout=60, what="GET /checkpoints again")


def no_crash_in_logs(stack) -> None:
    """No process logged a crash (an unexpected exception: a 500's stack trace)."""
    for log in (stack.var_dir / "log").glob("*.log"):
        text = log.read_text(errors="replace")
        for crash in ("request.crashed", '"rpc.failed"'):
            assert crash not in text, f"{log.name} logged {crash}:\n" + "\n".join(
                line for line in text.splitlines() if crash in line
            )


def test_a_broker_outage_answers_503_naming_the_broker(stack, api, broker):
    assert answers(api, "GET", "/users") == 200
    broker.stop()
    try:
        outage = [api("GET", path) for path in ("/users", "/checkpoints", "/inferences", "/endpoints")]
    finally:
        broker.start()
    for response in outage:
        assert response.status_code == 503, response.text
        assert "message broker is unavailable" in response.json()["message"], response.text
    # everything reconnects by itself
    for path in ("/users", "/checkpoints", "/inferences", "/endpoints", "/trainings"):
        wait_for(lambda path=path: answers(api, "GET", path) == 200, timeout=90, what=f"GET {path} after the outage")
    no_crash_in_logs(stack)


def test_a_database_outage_answers_503_naming_the_database(stack, api):
    mongo = EmbeddedMongo(stack.var_dir, stack.mongo_port)
    assert answers(api, "GET", "/checkpoints") == 200
    mongo.process.send(signal.SIGKILL)
    try:
        wait_for(lambda: mongo.process.running_pid() is None, timeout=30)
        # a user not cached by the gateway: identity must ask its database
        outage = [api("GET", "/checkpoints"), api("GET", "/users", user=f"nobody-{time.time_ns()}")]
    finally:
        mongo.start()
    for response in outage:
        assert response.status_code == 503, response.text
        assert "database is unavailable" in response.json()["message"], response.text
    wait_for(lambda: answers(api, "GET", "/checkpoints") == 200, timeout=60, what="GET /checkpoints after")
    no_crash_in_logs(stack)
