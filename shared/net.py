"""Which addresses the platform may reach on a user's say-so (a checkpoint URL, a webhook):
only the public internet, unless the deployment allows internal addresses. Every name is
resolved and every address it resolves to is checked.

A check made apart from the connection can be fooled: a name may answer a public address to
the check and an internal one to the connection a moment later (DNS rebinding). `public_transport`
closes that gap for httpx: its connections resolve the name once, check every address, and
connect to a checked address; a redirect's new connection is checked the same way."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

import httpcore
import httpx

from shared.errors import Invalid


def public_address(address: str) -> bool:
    """Whether an address is on the public internet (not loopback, private, link-local,
    multicast or reserved): only those may be fetched unless private ones are allowed."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # an IPv6 scope (`fe80::1%eth0`) is no part of it
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def check_http_url(url: str) -> None:
    """An http(s) URL that the platform's HTTP client parses: it refuses hosts that resolvers
    read in ways of their own (`0177.0.0.1` is 127.0.0.1 to the C library), and so does this."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise Invalid(f"{url} is not an http(s) URL")
    try:
        httpx.URL(url)
    except httpx.InvalidURL as error:
        raise Invalid(f"{url} is not a valid URL: {error}") from None


async def resolve(host: str) -> list[str]:
    """The addresses a name resolves to (an address resolves to itself)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(info[4][0] for info in infos))


async def public_addresses(
    host: str, *, allow_private: bool, doing: str, setting: str, timeout: float | None = None
) -> list[str]:
    """The addresses `host` resolves to, every one checked: a name that does not resolve, or
    resolves to any internal address, is refused (400). `doing` says what was refused
    ("download from"), `setting` how an operator allows internal addresses."""
    try:
        addresses = await asyncio.wait_for(resolve(host), timeout)
    except (socket.gaierror, UnicodeError):
        raise Invalid(f"could not {doing} {host}: the name does not resolve") from None
    except TimeoutError:
        raise Invalid(f"could not {doing} {host}: the name did not resolve within {timeout:g} s") from None
    if not allow_private:
        for address in addresses:
            if not public_address(address):
                raise Invalid(
                    f"refused to {doing} {host}: it resolves to the internal address {address} "
                    f"(set {setting}=true to allow internal addresses)"
                )
    return addresses


async def check_public_host(host: str, *, allow_private: bool, doing: str, setting: str) -> None:
    """Refuse (400) a host that does not resolve or resolves to an internal address."""
    if not allow_private:
        await public_addresses(host, allow_private=False, doing=doing, setting=setting)


class _PinnedBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network backend, connecting only to addresses it resolved and checked itself."""

    def __init__(self, *, doing: str, setting: str) -> None:
        self.inner = httpcore.AnyIOBackend()
        self.doing = doing
        self.setting = setting

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        addresses = await public_addresses(
            host, allow_private=False, doing=self.doing, setting=self.setting, timeout=timeout
        )
        failure: Exception | None = None
        for address in addresses:  # as a resolver's client would: the next address if one fails
            try:
                # TLS still verifies the certificate against the name: httpcore passes the
                # URL's host to the handshake, not this address
                return await self.inner.connect_tcp(
                    address, port, timeout=timeout, local_address=local_address, socket_options=socket_options
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as error:
                failure = error
        raise failure or httpcore.ConnectError(f"{host} resolves to no address")

    async def connect_unix_socket(self, *args: Any, **kwargs: Any) -> httpcore.AsyncNetworkStream:
        raise Invalid(f"refused to {self.doing} a local socket")

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)


def public_transport(*, allow_private: bool, doing: str, setting: str) -> httpx.AsyncBaseTransport:
    """An httpx transport that reaches public addresses only (see the module docstring), or
    any address when the deployment allows internal ones."""
    transport = httpx.AsyncHTTPTransport()
    if not allow_private:
        # httpx takes no network backend of its own; its connection pool (httpcore's) does
        transport._pool = httpcore.AsyncConnectionPool(
            ssl_context=httpx.create_ssl_context(), network_backend=_PinnedBackend(doing=doing, setting=setting)
        )
    return transport
