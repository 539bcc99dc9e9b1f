"""Which addresses the platform may reach on a user's say-so (a checkpoint URL, a webhook):
only the public internet, unless the deployment allows internal addresses. Every name is
resolved and every address it resolves to is checked."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from urllib.parse import urlsplit

from shared.errors import Invalid


def public_address(address: str) -> bool:
    """Whether an address is on the public internet (not loopback, private, link-local,
    multicast or reserved): only those may be fetched unless private ones are allowed."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def check_http_url(url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise Invalid(f"{url} is not an http(s) URL")


async def check_public_host(host: str, *, allow_private: bool, doing: str, setting: str) -> None:
    """Refuse (400) a host that does not resolve or resolves to an internal address; `doing`
    says what was refused ("download from"), `setting` how an operator allows it."""
    if allow_private:
        return
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror:
        raise Invalid(f"could not {doing} {host}: the name does not resolve") from None
    for info in infos:
        address = info[4][0]
        if not public_address(address):
            raise Invalid(
                f"refused to {doing} {host}: it resolves to the internal address {address} "
                f"(set {setting}=true to allow internal addresses)"
            )
