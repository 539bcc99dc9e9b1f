"""The hand-written AMQP frames of the RPC hot path (shared/amqp.py), read and written as
pamqp (aiormq's codec) reads and writes them."""

import pytest
from pamqp import commands as spec
from pamqp import frame as pamqp_frame
from pamqp import header as pamqp_header
from pamqp.body import ContentBody

from shared.amqp import _Address, _deliver, _reply_to, ack_frame, publish_frames


def frames_of(data: bytes) -> list:
    found = []
    while data:
        used, channel, value = pamqp_frame.unmarshal(data)
        found.append((channel, value))
        data = data[used:]
    return found


@pytest.mark.parametrize(
    "properties",
    [
        {},
        {"content_type": "application/json", "reply_to": "esd.rpc.replies.abc", "expiration": "10000"},
        {"reply_to": "r"},
        {"expiration": "1"},
    ],
)
def test_a_publish_is_what_pamqp_reads(properties):
    body = b'[["c1",{"x":1}]]'
    (channel, method), (_, header), (_, content) = frames_of(
        publish_frames(3, "esd.identity.rpc.list_users", body, **properties)
    )
    assert channel == 3
    assert isinstance(method, spec.Basic.Publish)
    assert (method.exchange, method.routing_key, method.mandatory, method.immediate) == (
        "",
        "esd.identity.rpc.list_users",
        False,
        False,
    )
    assert header.body_size == len(body)
    for name in ("content_type", "reply_to", "expiration"):
        assert getattr(header.properties, name) == properties.get(name)
    assert content.value == body


def test_a_large_body_is_split_at_the_frame_size_and_an_empty_one_sends_no_body_frame():
    body = bytes(range(256)) * 40  # 10 KiB
    frames = frames_of(publish_frames(1, "q", body, frame_max=4096))
    bodies = [value for _, value in frames if isinstance(value, ContentBody)]
    assert [len(part.value) for part in bodies] == [4088, 4088, 2064]
    assert b"".join(part.value for part in bodies) == body
    assert len(frames_of(publish_frames(1, "q", b""))) == 2


def test_an_ack_is_what_pamqp_writes():
    assert ack_frame(2, 123456789012) == pamqp_frame.marshal(spec.Basic.Ack(delivery_tag=123456789012), 2)


def test_a_name_longer_than_a_short_string_is_refused():
    with pytest.raises(ValueError, match="255 bytes"):
        publish_frames(1, "q" * 256, b"")


def test_a_delivery_is_read_as_pamqp_writes_it():
    written = pamqp_frame.marshal(
        spec.Basic.Deliver(
            consumer_tag="rpc-server.1a2b", delivery_tag=2**40 + 7, redelivered=True, exchange="ex", routing_key="rk.é"
        ),
        1,
    )
    incoming = _deliver(written[7:-1])
    assert (incoming.consumer_tag, incoming.delivery_tag, incoming.redelivered, incoming.routing_key) == (
        "rpc-server.1a2b",
        2**40 + 7,
        True,
        "rk.é",
    )


@pytest.mark.parametrize(
    "properties",
    [
        spec.Basic.Properties(reply_to="esd.rpc.replies.1"),
        spec.Basic.Properties(content_type="application/json", delivery_mode=1, priority=3, reply_to="back"),
        spec.Basic.Properties(correlation_id="c", reply_to="there", expiration="5", message_id="m"),
        # a headers table before it: read by pamqp
        spec.Basic.Properties(headers={"x-death": [{"count": 1}], "k": "v"}, reply_to="after.headers"),
        spec.Basic.Properties(content_type="text/plain"),
        spec.Basic.Properties(),
    ],
)
def test_reply_to_is_found_among_any_properties(properties):
    written = pamqp_frame.marshal(pamqp_header.ContentHeader(0, 10, properties), 1)
    assert _reply_to(written[7:-1]) == properties.reply_to


@pytest.mark.parametrize(
    "url, expected",
    [
        ("amqp://guest:guest@127.0.0.1:5672/", ("127.0.0.1", 5672, "guest", "guest", "/", False)),
        ("amqp://u%40x:p%2Fw@rabbit/esd", ("rabbit", 5672, "u@x", "p/w", "esd", False)),
        ("amqps://rabbit.example/%2F", ("rabbit.example", 5671, "guest", "guest", "/", True)),
        ("amqp://h:5673", ("h", 5673, "guest", "guest", "/", False)),
    ],
)
def test_broker_addresses(url, expected):
    address = _Address.parse(url)
    assert (address.host, address.port, address.username, address.password, address.vhost, address.tls) == expected


def test_a_url_of_another_scheme_is_refused():
    with pytest.raises(ValueError, match="not an AMQP URL"):
        _Address.parse("http://rabbit:5672/")
