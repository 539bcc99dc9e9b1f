"""Request/reply between processes (shared/rpc.py) over the real RabbitMQ: calls in flight at
once, errors as themselves, expiry, late replies, services with no replica, and a connection
lost and found again on either side."""

import asyncio
import uuid

import pytest
from pydantic import BaseModel

from shared.amqp import Link
from shared.errors import Internal, NotFound, Unavailable
from shared.rpc import RpcClient, RpcServer, command
from shared.settings import Settings

pytestmark = pytest.mark.asyncio(loop_scope="session")

SERVICE = "rpctest"


class Echo(BaseModel):
    text: str
    wait: float = 0.0


class Echoed(BaseModel):
    text: str


class Lookup(BaseModel):
    name: str


class Unanswered(BaseModel):
    pass


ECHO = command(SERVICE, Echo, Echoed)
LOOKUP = command(SERVICE, Lookup, Echoed)
UNANSWERED = command(SERVICE, Unanswered)


class Service:
    """The handlers, and what they saw."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self.running = 0
        self.peak = 0
        self.release = asyncio.Event()
        self.release.set()
        self.arrived = asyncio.Event()  # a request came

    async def echo(self, request: Echo) -> Echoed:
        self.seen.append(request.text)
        self.arrived.set()
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            await asyncio.sleep(request.wait)
            await self.release.wait()
        finally:
            self.running -= 1
        return Echoed(text=request.text)

    async def lookup(self, request: Lookup) -> Echoed:
        if request.name == "missing":
            raise NotFound("no such thing: missing")
        raise RuntimeError("a bug, with a secret in its message: s3cret")


@pytest.fixture
async def settings() -> Settings:
    return Settings(broker_prefix=f"test-{uuid.uuid4().hex[:8]}.")


@pytest.fixture
async def served(settings):
    made: list[RpcServer] = []

    async def serve(concurrency: int = 16) -> tuple[RpcServer, Service]:
        service = Service()
        server = RpcServer(settings.amqp_url, settings.broker_prefix, concurrency=concurrency)
        server.register_all({ECHO: service.echo, LOOKUP: service.lookup})
        await server.start()
        made.append(server)
        return server, service

    yield serve
    for server in made:
        await server.stop(grace=1)


@pytest.fixture
async def client(settings):
    rpc = RpcClient(settings.amqp_url, settings.broker_prefix, timeout=5)
    await rpc.start()
    yield rpc
    await rpc.close()


async def test_calls_are_in_flight_together_and_each_gets_its_own_reply(served, client):
    _, service = await served()
    replies = await asyncio.gather(*(client.call(ECHO, Echo(text=f"n{n}", wait=0.3)) for n in range(40)))
    assert [reply.text for reply in replies] == [f"n{n}" for n in range(40)]
    assert service.peak == 16  # the server's concurrency, not one at a time


async def test_a_domain_error_travels_as_itself_and_a_bug_as_an_internal_error_without_details(served, client):
    await served()
    with pytest.raises(NotFound, match="no such thing: missing"):
        await client.call(LOOKUP, Lookup(name="missing"))
    with pytest.raises(Internal) as raised:
        await client.call(LOOKUP, Lookup(name="other"))
    assert "s3cret" not in str(raised.value) and "see the service log" in str(raised.value)


async def test_a_command_no_replica_serves_fails_at_once(served, client):
    await served()  # a replica of the service, but nobody answers this command
    with pytest.raises(Unavailable, match="no replica"):
        await asyncio.wait_for(client.call(UNANSWERED, Unanswered()), 2)


async def test_a_caller_that_gave_up_hears_so_and_its_late_reply_is_dropped(served, client):
    _, service = await served()
    with pytest.raises(Unavailable, match="did not answer within 0.3 s"):
        await client.call(ECHO, Echo(text="slow", wait=0.8), timeout=0.3)
    await asyncio.sleep(0.8)  # its reply arrives now, for nobody
    assert service.seen == ["slow"]
    assert (await client.call(ECHO, Echo(text="next"))).text == "next"
    assert client.pending == {}


async def test_a_request_whose_caller_gave_up_expires_unseen_in_the_queue(served, client):
    _, service = await served(concurrency=1)
    service.release.clear()
    first = asyncio.ensure_future(client.call(ECHO, Echo(text="first")))
    await asyncio.wait_for(service.arrived.wait(), 5)
    with pytest.raises(Unavailable):  # waits behind the first, in the queue, past its time
        await client.call(ECHO, Echo(text="second"), timeout=0.3)
    service.release.set()
    assert (await first).text == "first"
    assert (await client.call(ECHO, Echo(text="third"))).text == "third"
    assert service.seen == ["first", "third"]


async def test_a_message_that_is_not_a_request_is_dropped_and_the_service_goes_on(served, client, settings):
    await served()
    link = await Link.open(settings.amqp_url, name="garbage")
    try:
        link.publish(ECHO.queue(settings.broker_prefix), b"\xff not json", reply_to="nowhere")
        link.publish(ECHO.queue(settings.broker_prefix), b'[["id-1", {"no": "text"}], "junk"]', reply_to="nowhere")
    finally:
        await link.close()
    assert (await client.call(ECHO, Echo(text="still here"))).text == "still here"


async def test_a_service_whose_connection_drops_serves_again_on_a_new_one(served, client):
    server, _ = await served()
    assert (await client.call(ECHO, Echo(text="before"))).text == "before"
    lost = server.connection.link
    lost.abort()
    await asyncio.sleep(0.1)
    assert not lost.is_open
    for _ in range(100):  # reconnected within its backoff
        if server.connection.opened.is_set():
            break
        await asyncio.sleep(0.05)
    assert (await client.call(ECHO, Echo(text="after"))).text == "after"


async def test_calls_waiting_when_the_clients_connection_drops_fail_at_once_and_later_calls_work(served, client):
    _, service = await served()
    service.release.clear()
    waiting = asyncio.ensure_future(client.call(ECHO, Echo(text="in hand"), timeout=30))
    await asyncio.wait_for(service.arrived.wait(), 5)
    client.connection.link.abort()
    with pytest.raises(Unavailable, match="message broker"):
        await asyncio.wait_for(waiting, 2)
    service.release.set()
    for _ in range(100):
        if client.connection.opened.is_set():
            break
        await asyncio.sleep(0.05)
    assert (await client.call(ECHO, Echo(text="again"))).text == "again"


async def test_two_replicas_share_the_calls(served, client):
    _, first = await served()
    _, second = await served()
    assert await client.replicas(ECHO) == 2
    await asyncio.gather(*(client.call(ECHO, Echo(text=str(n), wait=0.05)) for n in range(40)))
    assert first.seen and second.seen
    assert sorted(first.seen + second.seen, key=int) == [str(n) for n in range(40)]


async def test_asking_about_a_queue_never_declared_again_and_again_uses_no_more_channels(client, settings):
    for _ in range(50):
        assert await client.replicas(UNANSWERED) == 0
    # the probe's channel, closed by the broker each time, is number 2 each time
    assert await client.connection.link.open_channel() == 2
