"""JSON that users send (request bodies, `payload_string`, `api_param.json`), parsed with
limits: a document nested thousands deep exhausts Python's recursion (the parser's, or any
code that walks it later, a BSON encoder included), and one of gigabytes a worker's memory.
Either is the user's mistake, refused with a message that says which limit it broke.

Python's parser is used for its non-standard `Infinity`/`NaN` tokens, which AUTOMATIC1111
payloads carry."""

from __future__ import annotations

import json
from typing import Any

from shared.errors import Invalid

DEPTH_SETTING = "ESD_MAX_JSON_DEPTH"
PAYLOAD_SETTING = "ESD_MAX_PAYLOAD_BYTES"


def load_json(raw: bytes | str, *, what: str, max_depth: int, max_bytes: int | None = None, setting: str = "") -> Any:
    """`raw` parsed, or Invalid naming `what` and the broken limit: over `max_bytes` (when
    given; `setting` says how an operator raises it), not JSON, or nested deeper than
    `max_depth` arrays and objects."""
    if max_bytes is not None and len(raw) > max_bytes:
        raise too_large(what, len(raw), max_bytes, setting)
    try:
        value = json.loads(raw)
    except RecursionError:
        raise too_deep(what, max_depth) from None
    except (ValueError, UnicodeDecodeError) as error:
        raise Invalid(f"{what} is not valid JSON: {error}") from None
    if depth_over(value, max_depth):
        raise too_deep(what, max_depth)
    return value


def too_large(what: str, size: int, max_bytes: int, setting: str) -> Invalid:
    return Invalid(f"{what} is {size} bytes; at most {max_bytes} are accepted ({setting})")


def too_deep(what: str, max_depth: int) -> Invalid:
    return Invalid(f"{what} nests arrays and objects deeper than {max_depth} levels ({DEPTH_SETTING})")


def depth_over(value: Any, max_depth: int) -> bool:
    """Whether `value` nests arrays and objects deeper than `max_depth` (a scalar is at depth
    0, `[]` at 1). Walked without recursion, so that the walk itself cannot overflow."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth + 1 > max_depth:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


def excerpt(text: str, limit: int = 60) -> str:
    """The start of a user's text, for a message that must name it without repeating it all."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"
