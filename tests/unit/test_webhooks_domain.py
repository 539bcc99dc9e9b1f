"""The webhooks service's decisions: filters, signatures, retries; and the address rule."""

import asyncio
import base64
import hashlib
import hmac

import pytest

from services.webhooks import domain
from shared.errors import Invalid
from shared.net import check_public_host


def subscription(*events: str) -> domain.Subscription:
    return domain.Subscription(job_id="j", url="https://example.com/hook", events=list(events), owner="o", created=0)


def test_the_filter_names_cogs_three_kinds_of_events():
    completed = subscription("completed")
    assert all(
        domain.wants(completed, key) for key in ("inference.succeeded", "inference.failed", "inference.canceled")
    )
    assert all(domain.wants(completed, key) for key in ("training.completed", "training.failed", "training.stopped"))
    assert not domain.wants(completed, "inference.progress") and not domain.wants(completed, "inference.started")
    everything = subscription(*domain.DEFAULT_FILTER)
    assert domain.wants(everything, "training.started") and domain.wants(everything, "training.progress")
    assert not domain.wants(everything, "inference.created")  # where the webhook comes from, not for it


def test_a_signature_is_standard_webhooks_hmac_of_id_timestamp_and_body():
    secret = domain.new_secret()
    assert secret.startswith("whsec_") and len(base64.b64decode(secret[6:])) == 24
    header = domain.signature(secret, "msg_1", 1_700_000_000, b'{"a":1}')
    key = base64.b64decode(secret[6:])
    expected = base64.b64encode(hmac.new(key, b'msg_1.1700000000.{"a":1}', hashlib.sha256).digest()).decode()
    assert header == f"v1,{expected}"
    assert domain.signature(secret, "msg_1", 1_700_000_000, b'{"a":2}') != header
    assert domain.signature(domain.new_secret(), "msg_1", 1_700_000_000, b'{"a":1}') != header


def test_retries_wait_longer_each_time_up_to_five_minutes():
    assert [domain.retry_pause(n) for n in range(1, 6)] == [1, 2, 4, 8, 16]
    assert domain.retry_pause(30) == 300


def test_the_payload_is_the_event_with_its_type_and_time():
    payload = domain.payload_of("inference.succeeded", {"id": "e", "occurred_at": 0.0, "inference_id": "j"})
    assert (payload.type, payload.timestamp, payload.data["inference_id"]) == (
        "inference.succeeded",
        "1970-01-01T00:00:00Z",
        "j",
    )


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "10.0.0.1", "169.254.169.254", "[::1]".strip("[]")])
def test_internal_addresses_are_refused_unless_allowed(host):
    with pytest.raises(Invalid, match="internal address"):
        asyncio.run(check_public_host(host, allow_private=False, doing="send webhooks to", setting="X"))
    asyncio.run(check_public_host(host, allow_private=True, doing="send webhooks to", setting="X"))
