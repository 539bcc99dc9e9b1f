"""Events are never lost: a service killed between the write of a change and the publishing of
its event publishes the event when it comes back (shared/outbox.py)."""

import asyncio
import os
import subprocess
import sys

import pytest
from aiormq.exceptions import ChannelInvalidStateError

from shared.contracts.identity import CREATE_USER, CreateUser, Principal, UserCreated
from shared.db import mongo_client
from shared.errors import Unavailable
from shared.outbox import Outbox, embedded
from shared.permissions import EVERY_ALL
from shared.rpc import CheckHealth, RpcClient, health_check

pytestmark = pytest.mark.asyncio(loop_scope="session")

ADMIN = Principal(username="admin", roles=["IT Operator"], permissions=list(EVERY_ALL))


def start_identity(settings, **extra: str) -> subprocess.Popen:
    env = {
        **os.environ,
        "ESD_AMQP_URL": settings.amqp_url,
        "ESD_BROKER_PREFIX": settings.broker_prefix,
        "ESD_MONGO_URL": settings.mongo_url,
        "ESD_MONGO_DB_PREFIX": settings.mongo_db_prefix,
        "ESD_ADMIN_PASSWORD": "admin-password",
        "ESD_LOG_FORMAT": "json",
        **extra,
    }
    return subprocess.Popen([sys.executable, "-m", "services.identity"], env=env)


async def healthy(rpc: RpcClient) -> None:
    for _ in range(100):
        try:
            await rpc.call(health_check("identity"), CheckHealth(), timeout=1)
            return
        except Unavailable:
            await asyncio.sleep(0.2)
    raise AssertionError("identity did not come up")


async def test_a_service_killed_before_publishing_publishes_when_it_is_back(settings_factory, event_log):
    settings = settings_factory()
    rpc = RpcClient(settings.amqp_url, settings.broker_prefix, timeout=3)
    first = start_identity(settings)  # creates the admin (announced) at its first start
    await healthy(rpc)
    first.terminate()
    await asyncio.to_thread(first.wait, 20)
    events = await event_log(settings, "user.*")
    doomed = start_identity(settings, ESD_TEST_CRASH_BEFORE_PUBLISHING="user.created")
    try:
        await healthy(rpc)
        with pytest.raises(Unavailable):  # it died while handling the command
            await rpc.call(CREATE_USER, CreateUser(username="survivor", password="pw", roles=[], actor=ADMIN))
        assert await asyncio.to_thread(doomed.wait, 10) == 3

        # the change is stored, its event with it, and nothing went out
        client = mongo_client(settings)
        stored = await client[settings.database_name("identity")].users.find_one({"username": "survivor"})
        await client.close()
        (pending,) = stored["outbox"].values()
        assert pending["routing_key"] == "user.created"
        with pytest.raises(TimeoutError):
            await events.next("user.created", timeout=1)

        revived = start_identity(settings)
        try:
            await healthy(rpc)
            created = await events.next("user.created", timeout=20)
            assert created["username"] == "survivor"
            assert created["id"] == pending["body"]["id"]  # the very event that was written
        finally:
            revived.terminate()
            await asyncio.to_thread(revived.wait, 20)
    finally:
        if doomed.poll() is None:
            doomed.kill()
        await rpc.close()


class FlakyPublisher:
    """Publishes nothing until `up`: raises as aio-pika does while its connection is away."""

    def __init__(self, failure: Exception) -> None:
        self.failure = failure
        self.up = False
        self.published: list[str] = []

    async def publish_raw(self, routing_key: str, body: dict) -> None:
        if not self.up:
            raise self.failure
        self.published.append(body["id"])


async def test_a_change_made_while_the_broker_is_away_keeps_its_event_for_the_sweep(settings_factory, monkeypatch):
    settings = settings_factory()
    client = mongo_client(settings)
    users = client[settings.database_name("outboxtest")]["users"]
    publisher = FlakyPublisher(ChannelInvalidStateError("channel closed"))
    outbox = Outbox(publisher)  # type: ignore[arg-type]
    outbox.watch(users)
    first, second = (UserCreated(username=name, roles=[], creator="admin") for name in ("a", "b"))
    try:
        await users.insert_one({"username": "a", **embedded(first)})
        await outbox.send(users, {"username": "a"})  # the writer's caller hears of no failure
        await users.insert_one({"username": "b", **embedded(second)})
        await outbox.send(users, {"username": "b"})
        assert await users.count_documents({"outbox": {"$type": "object", "$ne": {}}}) == 2

        publisher.up = True
        monkeypatch.setattr("shared.outbox.SWEEP_SECONDS", 0.0)
        await outbox.sweep()
        assert sorted(publisher.published) == sorted([first.id, second.id])
        assert await users.count_documents({"outbox": {"$type": "object", "$ne": {}}}) == 0

        # anything else than the broker being away is a bug, which the writer's caller hears
        publisher.up, publisher.failure = False, ValueError("a bug")
        await users.insert_one({"username": "c", **embedded(UserCreated(username="c", roles=[], creator="admin"))})
        with pytest.raises(ValueError, match="a bug"):
            await outbox.send(users, {"username": "c"})
    finally:
        await client.close()
