"""The worker runtime both workers share, over the real broker: one job at a time (prefetch 1,
as the broker reports it), go-ahead / run / report, and the queue's dead letters."""

import asyncio
import time
import uuid

import pytest
from pydantic import BaseModel

from shared.contracts.workers import GoAhead
from shared.messaging import Names, create_broker, send_work
from shared.rpc import RpcServer, command
from shared.worker import WorkerRuntime
from tests.support import consumer_prefetch

pytestmark = pytest.mark.asyncio(loop_scope="session")


class Chore(BaseModel):
    number: int


class ReportChoreStarted(BaseModel):
    number: int


CHORE_STARTED = command("chores", ReportChoreStarted, GoAhead)


@pytest.fixture
async def chores(settings_factory, tmp_path):
    settings = settings_factory(var_dir=tmp_path, worker_heartbeat_seconds=0.5)
    service = RpcServer(settings.amqp_url, settings.broker_prefix)
    refused = {3}  # the service says "no" to chore 3 (a redelivery of a finished job, say)

    async def started(report: ReportChoreStarted) -> GoAhead:
        return GoAhead(run=report.number not in refused, reason="already done")

    service.register(CHORE_STARTED, started)
    await service.start()
    yield settings
    await service.stop()


async def test_a_worker_runs_its_jobs_one_after_another_with_prefetch_one(chores):
    settings = chores
    queue = f"chores.{uuid.uuid4().hex[:6]}"
    runtime = WorkerRuntime(settings, pool="chores", worker_id="w1", heartbeats="chores.heartbeat", grace_seconds=5)
    spans: list[tuple[int, float, float]] = []
    outcomes: list[str] = []

    async def handle(chore: Chore) -> None:
        async def work() -> int:
            begun = time.monotonic()
            await asyncio.sleep(0.3)
            spans.append((chore.number, begun, time.monotonic()))
            return chore.number

        async def succeeded(number: int) -> None:
            outcomes.append(f"done {number}")

        async def failed(error: str) -> None:
            outcomes.append(f"failed {error}")

        await runtime.job(
            CHORE_STARTED,
            ReportChoreStarted(number=chore.number),
            work,
            job_id=str(chore.number),
            succeeded=succeeded,
            failed=failed,
        )

    serving = asyncio.create_task(runtime.serve(queue, Chore, handle))
    broker = create_broker(settings)
    await broker.connect()
    names = Names(settings.broker_prefix)
    try:
        for _ in range(100):  # until the worker consumes
            if runtime.state == "ready":
                break
            await asyncio.sleep(0.05)
        for number in range(1, 6):
            await send_work(broker, names, queue, Chore(number=number))
        await asyncio.sleep(0.1)
        assert consumer_prefetch(f"{names.prefix}{queue}") == [1]
        for _ in range(100):
            if len(outcomes) == 4:
                break
            await asyncio.sleep(0.1)
    finally:
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)
        await broker.stop()
    assert outcomes == ["done 1", "done 2", "done 4", "done 5"]
    assert [number for number, _, _ in spans] == [1, 2, 4, 5]  # 3 was refused the go-ahead
    for (_, _, end), (_, begin, _) in zip(spans, spans[1:], strict=False):
        assert begin >= end  # never two at once


async def test_a_job_that_raises_invalid_fails_with_its_message_and_a_crash_with_its_type(chores):
    from shared.errors import Invalid

    settings = chores
    runtime = WorkerRuntime(settings, pool="chores", worker_id="w2", heartbeats="chores.heartbeat", grace_seconds=5)
    await runtime.broker.connect()
    await runtime.rpc.start()
    reported: list[str] = []

    async def failed(error: str) -> None:
        reported.append(error)

    async def nothing(_: object) -> None:
        raise AssertionError("not reached")

    async def users_mistake() -> None:
        raise Invalid("steps: must be at least 1")

    async def bug() -> None:
        raise KeyError("unet")

    try:
        for work in (users_mistake, bug):
            await runtime.job(
                CHORE_STARTED, ReportChoreStarted(number=1), work, job_id="1", succeeded=nothing, failed=failed
            )
    finally:
        await runtime.rpc.close()
        await runtime.broker.stop()
    assert reported == ["steps: must be at least 1", "KeyError: 'unet'"]
