"""The one error hierarchy. The domain raises these; the gateway maps them to the ESD
envelope in exactly one place (`services/gateway/envelope.py`), and RPC carries them between
processes as `ErrorInfo`."""

from __future__ import annotations

from pydantic import BaseModel


class EsdError(Exception):
    status: int = 400

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_info(self) -> ErrorInfo:
        return ErrorInfo(kind=type(self).__name__, status=self.status, message=self.message)


class Invalid(EsdError):
    """Bad input, a rule the request breaks, a duplicate name: ESD answers all of these 400."""

    status = 400


class Unauthorized(EsdError):
    status = 401


class Forbidden(EsdError):
    status = 403


class NotFound(EsdError):
    status = 404


class Conflict(EsdError):
    """The request clashes with one in progress (try again), or reuses what it may not."""

    status = 409


class Unprocessable(EsdError):
    """Well-formed, but reusing what belongs to another request (an Idempotency-Key)."""

    status = 422


class PayloadTooLarge(EsdError):
    status = 413


class TooManyRequests(EsdError):
    """Refused for now (too many failed sign-ins): the message says when to try again."""

    status = 429


class Unavailable(EsdError):
    """A service did not answer in time: the caller may retry."""

    status = 503


class JobTimeout(EsdError):
    """A caller waited for a job as long as it may; the job goes on."""

    status = 504


class Internal(EsdError):
    status = 500


def outage(error: BaseException) -> Unavailable | None:
    """The dependency an exception says is away (the database, object storage, the broker), as
    the caller hears it: a 503 naming it. None for anything else (a bug: a 500)."""
    from aiormq.exceptions import AMQPError, ChannelInvalidStateError
    from botocore.exceptions import ClientError, ConnectionError, HTTPClientError
    from pymongo.errors import ConnectionFailure

    from shared.amqp import AmqpError as LinkError

    if isinstance(error, ConnectionFailure):  # server selection timed out, connection lost
        return Unavailable(f"the database is unavailable: {type(error).__name__}")
    if isinstance(error, ConnectionError | HTTPClientError):
        return Unavailable(f"object storage is unavailable: {type(error).__name__}")
    if isinstance(error, ClientError) and error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) >= 500:
        return Unavailable(f"object storage is unavailable: {error.response['Error'].get('Code', 'error')}")
    # a channel of aio-pika's that its connection's loss closed is a RuntimeError of aiormq's
    if isinstance(error, AMQPError | LinkError | ChannelInvalidStateError):
        return Unavailable(f"the message broker is unavailable: {type(error).__name__}")
    return None


_BY_KIND: dict[str, type[EsdError]] = {
    cls.__name__: cls
    for cls in (
        Invalid,
        Unauthorized,
        Forbidden,
        NotFound,
        Conflict,
        PayloadTooLarge,
        TooManyRequests,
        Unavailable,
        JobTimeout,
        Internal,
    )
}


class ErrorInfo(BaseModel):
    kind: str
    status: int
    message: str

    def to_error(self) -> EsdError:
        cls = _BY_KIND.get(self.kind)
        if cls is None:
            error = EsdError(self.message)
            error.status = self.status
            return error
        return cls(self.message)
