"""The REST API as `esd` calls it: the key and the user on every call, the ESD envelope
unwrapped, and any error turned into one readable line (`ApiError`)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx

from cli.config import Config


class ApiError(Exception):
    """A call that did not succeed: the server's message, or why there was no answer."""


@dataclass
class Event:
    """One Server-Sent Event: its stream offset, type and data."""

    id: int | None
    type: str
    data: dict[str, Any]


def parse_events(lines: Iterator[str]) -> Iterator[Event]:
    """The events of a `text/event-stream`, line by line (comments are keep-alives)."""
    fields: dict[str, str] = {}
    for line in lines:
        if not line:
            if "data" in fields:
                offset = fields.get("id")
                yield Event(
                    id=int(offset) if offset and offset.isdigit() else None,
                    type=fields.get("event", "message"),
                    data=json.loads(fields["data"]),
                )
            fields = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            fields[name] = fields[name] + "\n" + value if name == "data" and name in fields else value


class Api:
    def __init__(self, config: Config, *, timeout: float = 60.0) -> None:
        self.config = config
        headers = {"x-api-key": config.api_key, "username": config.user, "user-agent": "esd-cli"}
        if config.token:  # names the user by itself; the only way in the token auth mode
            headers["authorization"] = f"Bearer {config.token}"
        self.http = httpx.Client(base_url=config.url.rstrip("/"), headers=headers, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def call(self, method: str, path: str, *, json: Any = None, params: dict | None = None) -> dict[str, Any]:
        """The reply's `data` (empty for a 204), or ApiError with the server's message."""
        try:
            response = self.http.request(method, path, json=json, params=_params(params))
        except httpx.HTTPError as error:
            raise ApiError(f"cannot reach {self.config.url}: {error}") from None
        return unwrap(response)

    def events(self, path: str, *, params: dict | None = None, last_event_id: int | None = None) -> Iterator[Event]:
        """A Server-Sent Events stream, as it comes (the caller stops reading when done)."""
        headers = {"accept": "text/event-stream"}
        if last_event_id is not None:
            headers["last-event-id"] = str(last_event_id)
        try:
            with self.http.stream(
                "GET", path, params=_params(params), headers=headers, timeout=httpx.Timeout(60, read=None)
            ) as response:
                if response.status_code != 200:
                    response.read()
                    unwrap(response)
                yield from parse_events(response.iter_lines())
        except httpx.HTTPError as error:
            raise ApiError(f"the event stream from {self.config.url} broke off: {error}") from None

    def put_file(self, url: str, path) -> None:
        """A file to a presigned PUT URL."""
        try:
            response = httpx.put(url, content=path.read_bytes(), timeout=120)
        except httpx.HTTPError as error:
            raise ApiError(f"cannot upload {path}: {error}") from None
        if response.status_code != 200:
            raise ApiError(f"cannot upload {path}: HTTP {response.status_code}")

    def download(self, url: str) -> bytes:
        """A presigned URL's object (no key: the URL is the permission)."""
        try:
            response = httpx.get(url, timeout=120)
        except httpx.HTTPError as error:
            raise ApiError(f"cannot download {url.split('?')[0]}: {error}") from None
        if response.status_code != 200:
            raise ApiError(f"cannot download {url.split('?')[0]}: HTTP {response.status_code}")
        return response.content


def _params(params: dict | None) -> dict | None:
    return None if params is None else {key: value for key, value in params.items() if value is not None}


def unwrap(response: httpx.Response) -> dict[str, Any]:
    if response.status_code == 204:
        return {}
    try:
        body = response.json()
    except ValueError:
        body = None
    if response.is_success and isinstance(body, dict):
        return body.get("data") or {}
    message = body.get("message") if isinstance(body, dict) else None
    if response.status_code == 403 and message == "Forbidden":
        message = "Forbidden: the API key is wrong (see `esd login`)"
    elif response.status_code == 401 and response.request.headers.get("authorization"):
        message = f"{message or 'Unauthorized'} (run `esd login --password` for a new token)"
    elif response.status_code == 401 and (message or "").startswith("Unauthorized: this deployment needs"):
        message = f"{message} (run `esd login --password`)"
    elif response.status_code == 401:
        message = f"Unauthorized: no user {response.request.headers.get('username')!r} (see `esd login`)"
    raise ApiError(f"{message or response.reason_phrase} (HTTP {response.status_code})")
