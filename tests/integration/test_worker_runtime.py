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


async def test_a_bug_in_the_handling_dead_letters_the_job_once_instead_of_looping(chores):
    settings = chores
    queue = f"chores.{uuid.uuid4().hex[:6]}"
    runtime = WorkerRuntime(settings, pool="chores", worker_id="w3", heartbeats="chores.heartbeat", grace_seconds=5)
    calls: list[int] = []

    async def handle(chore: Chore) -> None:
        calls.append(chore.number)
        raise TypeError("a bug outside the job's work")

    serving = asyncio.create_task(runtime.serve(queue, Chore, handle))
    broker = create_broker(settings)
    await broker.connect()
    names = Names(settings.broker_prefix)
    try:
        for _ in range(100):
            if runtime.state == "ready":
                break
            await asyncio.sleep(0.05)
        await send_work(broker, names, queue, Chore(number=7))
        dead = await broker.declare_queue(names.dead_letter_queue(queue))
        message = None
        for _ in range(100):
            message = await dead.get(no_ack=True, fail=False)
            if message is not None:
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)  # time enough for a redelivery loop to show
    finally:
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)
        await broker.stop()
    assert message is not None and Chore.model_validate_json(message.body).number == 7
    assert calls == [7]  # handled once, not redelivered


async def _drain_scene(settings, *, grace: float, seconds: float) -> list[str]:
    """Two chores on a queue; worker w1 is told to stop while it runs the first; then w2 starts.
    Returns who reported what."""
    queue = f"chores.{uuid.uuid4().hex[:6]}"
    names = Names(settings.broker_prefix)
    outcomes: list[str] = []
    started = asyncio.Event()

    def worker(worker_id: str, grace_seconds: float) -> tuple[WorkerRuntime, object]:
        runtime = WorkerRuntime(
            settings,
            pool="chores",
            worker_id=worker_id,
            heartbeats="chores.heartbeat",
            grace_seconds=grace_seconds,
            exit_after_give_back=False,  # in-process: the test goes on
        )

        async def handle(chore: Chore) -> None:
            async def work() -> int:
                started.set()
                await asyncio.sleep(seconds)
                return chore.number

            async def succeeded(number: int) -> None:
                outcomes.append(f"{worker_id} did {number}")

            async def failed(error: str) -> None:
                outcomes.append(f"{worker_id} failed {error}")

            await runtime.job(
                CHORE_STARTED,
                ReportChoreStarted(number=chore.number),
                work,
                job_id=str(chore.number),
                succeeded=succeeded,
                failed=failed,
            )

        return runtime, handle

    broker = create_broker(settings)
    await broker.connect()
    first, first_handle = worker("w1", grace)
    second, second_handle = worker("w2", 5)
    tasks = [asyncio.create_task(first.serve(queue, Chore, first_handle))]
    try:
        for _ in range(100):
            if first.state == "ready":
                break
            await asyncio.sleep(0.05)
        for number in (1, 2):
            await send_work(broker, names, queue, Chore(number=number))
        await asyncio.wait_for(started.wait(), 10)
        first.request_stop()  # as SIGTERM would: a scale-down in the middle of chore 1
        await asyncio.wait_for(tasks[0], 10)
        tasks.append(asyncio.create_task(second.serve(queue, Chore, second_handle)))
        for _ in range(100):
            if len(outcomes) >= 2 and second.state == "ready":
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(seconds + 0.5)  # time for a wrong second report to show up
    finally:
        second.request_stop()
        await asyncio.gather(*tasks, return_exceptions=True)
        await broker.stop()
    return outcomes


async def test_a_stopping_worker_finishes_its_job_and_leaves_the_next_to_another(chores):
    outcomes = await _drain_scene(chores, grace=5, seconds=0.5)
    assert outcomes == ["w1 did 1", "w2 did 2"]


async def test_past_its_grace_a_stopping_worker_gives_its_job_back_and_never_reports_it(chores):
    outcomes = await _drain_scene(chores, grace=0.2, seconds=1.0)
    assert sorted(outcomes) == ["w2 did 1", "w2 did 2"]
