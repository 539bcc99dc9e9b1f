"""A whole local stack on a RabbitMQ node of its own, for tests that kill its processes and
stop its servers. The machine's RabbitMQ (127.0.0.1:5672) is shared with other test runs and
may not be stopped: the node here has its own name, ports and data under the test's folder."""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy.local.servers import EmbeddedRabbitMQ
from deploy.local.stack import LocalStack, free_port
from tests.e2e.conftest import Api
from tests.support import wait_for

FIGURES: dict[str, str] = {}  # fault -> what the load came to


def pytest_terminal_summary(terminalreporter) -> None:
    if FIGURES:
        terminalreporter.section("fault figures")
        for fault, line in FIGURES.items():
            terminalreporter.write_line(f"{fault:<18} {line}")


def processes_of(var_dir: Path, module: str | None = None) -> list[int]:
    """Pids of the live processes of the stack under `var_dir` (its environment says so), those
    running `python -m <module>` only when given."""
    tag = f"ESD_VAR_DIR={Path(var_dir).resolve()}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            environ = (entry / "environ").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state == "Z" or tag not in environ:
            continue
        if module is None or module.encode() in cmdline:
            found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def remove_endpoint(stack, api, name: str) -> None:
    """Deletes an endpoint and waits until its workers are gone: the host's two worker places
    are the next module's."""
    response = api("DELETE", "/endpoints", json={"endpoint_name_list": [name]})
    assert response.status_code in (200, 204), response.text
    wait_for(
        lambda: not processes_of(stack.var_dir, "services.inference.worker"),
        timeout=120,
        what=f"the workers of {name} to stop",
    )


@pytest.fixture(scope="session")
def broker(tmp_path_factory) -> Iterator[EmbeddedRabbitMQ]:
    node = EmbeddedRabbitMQ(tmp_path_factory.mktemp("broker"))
    node.start()
    yield node
    node.stop(signal.SIGKILL)


@pytest.fixture(scope="session")
def stack(tmp_path_factory, broker) -> Iterator[LocalStack]:
    running = LocalStack(
        tmp_path_factory.mktemp("stack"),
        gateway_port=free_port(),
        mongo_port=free_port(),
        s3_port=free_port(),
        env={
            "ESD_AMQP_URL": broker.url,
            "ESD_BROKER_PREFIX": f"faults-{uuid.uuid4().hex[:8]}.",
            # the by-URL downloads come from a local HTTP server
            "ESD_CHECKPOINT_ALLOW_PRIVATE_URLS": "true",
            # two cores: two inference workers at most, one training worker
            "ESD_LOCAL_MAX_WORKERS": "2",
            "ESD_TRAINING_WORKERS": "1",
        },
        quiet=True,
    )
    running.up()
    yield running
    running.down()
    # whatever a failed test left behind (an orphaned worker) goes too
    for pid in processes_of(running.var_dir):
        os.kill(pid, signal.SIGKILL)
    time.sleep(0.5)


@pytest.fixture(scope="session")
def api(stack) -> Api:
    return Api(stack)
