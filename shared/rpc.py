"""Request/reply between processes over RabbitMQ.

- **Commands are declared once**: `CREATE_USER = command(SERVICE, CreateUser, reply=None)` in
  the service's module of `shared/contracts`. The command's name comes from its request model
  (`CreateUser` -> `create_user`), so every command follows one pattern and no string names a
  command anywhere else; declaring the same command twice fails at import.
- **`RpcClient`** keeps any number of calls in flight per process: one exclusive reply queue
  per client and a correlation id -> future map. A request expires in the broker with the
  caller's timeout, so a service that comes back late never acts on a command whose caller has
  given up; a reply that arrives after its caller gave up is dropped quietly.
- **`RpcServer`** consumes `<prefix><service>.rpc.<command>` and answers each request in its
  own task, up to `concurrency` at once per command (the channel's prefetch), acking once the
  reply is published. Replies are `{"result": ...}` or `{"error": ErrorInfo}`: a domain error
  travels as itself, anything else as an internal error whose stack stays in the service's log.

Both talk to RabbitMQ through aio-pika directly: a routed call is on the hot path of every HTTP
request, and the framework's per-message machinery costs more than the work of a fast handler.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import cache
from typing import Any, Generic, TypeVar

import aio_pika
import orjson
import structlog
from pydantic import BaseModel, ValidationError

from shared.errors import ErrorInfo, EsdError, Internal, Invalid, Unavailable

log = structlog.get_logger(__name__)

Req = TypeVar("Req", bound=BaseModel)
Rep = TypeVar("Rep")

_DECLARED: dict[tuple[str, str], Command] = {}


def command_name(request: type[BaseModel]) -> str:
    """`CreateUser` -> `create_user`: the one naming pattern of commands."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", request.__name__).lower()


@dataclass(frozen=True, eq=False)
class Command(Generic[Req, Rep]):
    """One request/reply command: which service answers it, what it takes and what it gives
    back (`reply=None`: nothing but success)."""

    service: str
    request: type[Req]
    reply: type[Rep] | None
    name: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "name", command_name(self.request))

    def queue(self, prefix: str) -> str:
        return f"{prefix}{self.service}.rpc.{self.name}"

    def __repr__(self) -> str:
        return f"<command {self.service}.{self.name}>"


def command(service: str, request: type[Req], reply: type[Rep] | None = None) -> Command[Req, Rep]:
    """Declare a command; a second declaration of the same service and name is a bug."""
    declared = Command(service, request, reply)
    key = (service, declared.name)
    if key in _DECLARED:
        raise RuntimeError(f"command {service}.{declared.name} is declared twice")
    _DECLARED[key] = declared
    return declared


class CheckHealth(BaseModel):
    pass


class Health(BaseModel):
    service: str
    status: str = "ok"


@cache
def health_check(service: str) -> Command[CheckHealth, Health]:
    """The health command every service answers (declared once per service)."""
    return command(service, CheckHealth, Health)


def _encode_reply(command: Command, result: Any) -> bytes:
    if result is None:
        return b'{"result":null}'
    if isinstance(result, BaseModel):
        return b'{"result":' + result.__pydantic_serializer__.to_json(result) + b"}"
    return orjson.dumps({"result": result})


def _encode_error(error: EsdError) -> bytes:
    return orjson.dumps({"error": error.to_info().model_dump()})


async def answer(command: Command, handler: Callable[[Any], Awaitable[Any]], body: bytes) -> bytes:
    """The reply to one request: its result, or the domain error the handler raised, or an
    internal error (logged here with its stack; the caller sees no stack trace)."""
    try:
        request = command.request.model_validate_json(body)
    except ValidationError as error:  # a caller's bug: say so, never crash
        return _encode_error(Invalid(f"malformed {command.name} request: {error}"))
    try:
        result = await handler(request)
    except EsdError as error:
        return _encode_error(error)
    except Exception:
        log.exception("rpc.failed", command=command.name)
        return _encode_error(Internal("internal error, see the service log"))
    return _encode_reply(command, result)


class RpcServer:
    """Answers the commands of one service (see the module docstring)."""

    def __init__(self, amqp_url: str, prefix: str, *, concurrency: int = 64) -> None:
        self.amqp_url = amqp_url
        self.prefix = prefix
        self.concurrency = concurrency
        self.handlers: dict[Command, Callable[[Any], Awaitable[Any]]] = {}
        self.connection: aio_pika.abc.AbstractRobustConnection | None = None
        self.consumers: list[tuple[aio_pika.abc.AbstractQueue, str]] = []
        self.running: set[asyncio.Task] = set()

    def register(self, command: Command[Req, Any], handler: Callable[[Req], Awaitable[Any]]) -> None:
        if command in self.handlers:
            raise RuntimeError(f"{command!r} has two handlers")
        self.handlers[command] = handler

    def register_all(self, handlers: dict[Command, Callable[[Any], Awaitable[Any]]]) -> None:
        for declared, handler in handlers.items():
            self.register(declared, handler)

    async def start(self) -> None:
        self.connection = await aio_pika.connect_robust(self.amqp_url)
        channel = await self.connection.channel(publisher_confirms=False)
        await channel.set_qos(prefetch_count=self.concurrency)
        for declared, handler in self.handlers.items():
            queue = await channel.declare_queue(declared.queue(self.prefix), durable=True)
            tag = await queue.consume(self._consumer(channel, declared, handler))
            self.consumers.append((queue, tag))

    def _consumer(self, channel, declared: Command, handler) -> Callable[[Any], Awaitable[None]]:
        exchange = channel.default_exchange

        async def on_request(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            task = asyncio.current_task()
            if task is not None:
                self.running.add(task)
            try:
                if message.reply_to:  # nobody waits otherwise
                    reply = await answer(declared, handler, message.body)
                    await exchange.publish(
                        aio_pika.Message(reply, correlation_id=message.correlation_id, content_type="application/json"),
                        routing_key=message.reply_to,
                    )
                await message.ack()
            except Exception:  # the connection went: the request is redelivered if unexpired
                log.warning("rpc.reply_failed", command=declared.name, exc_info=True)
            finally:
                if task is not None:
                    self.running.discard(task)

        return on_request

    async def stop(self, grace: float = 15.0) -> None:
        """Stop taking requests, let those in hand finish (up to `grace` seconds), close."""
        for queue, tag in self.consumers:
            try:
                await queue.cancel(tag)
            except Exception:
                pass
        self.consumers.clear()
        if self.running:
            await asyncio.wait(list(self.running), timeout=grace)
        if self.connection is not None:
            await self.connection.close()
            self.connection = None


class RpcClient:
    """Calls commands and waits for their replies (see the module docstring)."""

    def __init__(self, amqp_url: str, prefix: str, timeout: float) -> None:
        self.amqp_url = amqp_url
        self.prefix = prefix
        self.timeout = timeout
        self.pending: dict[str, asyncio.Future[bytes]] = {}
        self.connection: aio_pika.abc.AbstractRobustConnection | None = None
        self.channel: aio_pika.abc.AbstractChannel | None = None
        self.reply_queue = f"{prefix}rpc.replies.{uuid.uuid4().hex}"
        self._starting: asyncio.Lock | None = None

    async def start(self) -> None:
        if self._starting is None:
            self._starting = asyncio.Lock()
        async with self._starting:
            if self.channel is not None:
                return
            self.connection = await aio_pika.connect_robust(self.amqp_url)
            channel = await self.connection.channel(publisher_confirms=False)
            queue = await channel.declare_queue(self.reply_queue, exclusive=True, auto_delete=True)
            await queue.consume(self._on_reply, no_ack=True)
            self.channel = channel

    async def _on_reply(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        future = self.pending.pop(message.correlation_id or "", None)
        if future is not None and not future.done():  # else: its caller gave up
            future.set_result(message.body)

    async def call(self, command: Command[Req, Rep], request: Req, *, timeout: float | None = None) -> Rep:
        if not isinstance(request, command.request):
            raise TypeError(f"{command!r} takes {command.request.__name__}, not {type(request).__name__}")
        if self.channel is None:
            await self.start()
        assert self.channel is not None
        timeout = timeout or self.timeout
        correlation_id = uuid.uuid4().hex
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.pending[correlation_id] = future
        try:
            await self.channel.default_exchange.publish(
                aio_pika.Message(
                    request.__pydantic_serializer__.to_json(request),
                    correlation_id=correlation_id,
                    reply_to=self.reply_queue,
                    expiration=timeout,
                    content_type="application/json",
                ),
                routing_key=command.queue(self.prefix),
            )
            body = await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise Unavailable(f"the {command.service} service did not answer within {timeout:g} s") from None
        except aio_pika.exceptions.AMQPError as error:
            raise Unavailable(f"the message broker is unavailable: {error}") from None
        finally:
            self.pending.pop(correlation_id, None)
        reply = orjson.loads(body)
        if reply.get("error") is not None:
            raise ErrorInfo.model_validate(reply["error"]).to_error()
        if command.reply is None:
            return None  # type: ignore[return-value]
        return command.reply.model_validate(reply["result"])  # type: ignore[attr-defined]

    async def close(self) -> None:
        for future in self.pending.values():
            if not future.done():
                future.cancel()
        self.pending.clear()
        if self.connection is not None:
            await self.connection.close()
            self.connection = None
            self.channel = None
