"""ESD's conventions that several services follow: how times look, and the paging keys
(`exclusive_start_key` / `last_evaluated_key`)."""

from __future__ import annotations

import re
from datetime import UTC, datetime

from shared.errors import Invalid


def esd_time(timestamp: float | None) -> str | None:
    """`2024-02-05 06:10:52.552528`, as ESD 1.5 writes times (UTC)."""
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")


# A paging key is the creation time of the last item of a page, exactly (`repr`), which the
# next page starts after: a plain decimal number, as the OpenAPI document says.
POSITION_PATTERN = r"^[0-9]{1,17}(\.[0-9]{1,17})?$"


def created_at(esd_formatted: str | None) -> datetime:
    """The time of an `esd_time` string (UTC); now when there is none."""
    if not esd_formatted:
        return datetime.now(UTC)
    return datetime.strptime(esd_formatted, "%Y-%m-%d %H:%M:%S.%f").replace(tzinfo=UTC)


def encode_position(created: float) -> str:
    return repr(created)


def decode_position(key: str | None) -> float | None:
    if not key:
        return None
    if re.fullmatch(POSITION_PATTERN, key) is None:
        raise Invalid("exclusive_start_key is not a key this API gave")
    return float(key)
