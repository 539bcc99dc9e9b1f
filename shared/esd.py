"""ESD's conventions that several services follow: how times look, and the opaque paging keys
(`exclusive_start_key` / `last_evaluated_key`)."""

from __future__ import annotations

import base64
from datetime import UTC, datetime

from shared.errors import Invalid


def esd_time(timestamp: float | None) -> str | None:
    """`2024-02-05 06:10:52.552528`, as ESD 1.5 writes times (UTC)."""
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")


def encode_position(created: float) -> str:
    return base64.urlsafe_b64encode(repr(created).encode()).decode()


def decode_position(key: str | None) -> float | None:
    if not key:
        return None
    try:
        return float(base64.urlsafe_b64decode(key.encode()).decode())
    except (ValueError, UnicodeDecodeError):
        raise Invalid("exclusive_start_key is not a key this API gave") from None
