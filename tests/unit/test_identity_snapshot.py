"""The in-memory snapshot of identity's small collections (users, roles): when it reads the
database again and when a read is not kept."""

import asyncio

import pytest

from services.identity.store import Snapshot


class Source:
    def __init__(self) -> None:
        self.value = ["a"]
        self.reads = 0
        self.gate: asyncio.Event | None = None

    async def load(self) -> list[str]:
        self.reads += 1
        value = list(self.value)
        if self.gate is not None:
            await self.gate.wait()
        return value


async def test_reads_once_until_forgotten():
    source = Source()
    snapshot = Snapshot(source.load)
    assert await snapshot.get() == ["a"]
    source.value = ["a", "b"]
    assert await snapshot.get() == ["a"]
    assert source.reads == 1
    snapshot.forget()
    assert await snapshot.get() == ["a", "b"]
    assert source.reads == 2


async def test_reads_again_after_its_ttl(monkeypatch):
    now = [100.0]
    monkeypatch.setattr("services.identity.store.time.monotonic", lambda: now[0])
    source = Source()
    snapshot = Snapshot(source.load, ttl=30.0)
    await snapshot.get()
    now[0] += 29.0
    await snapshot.get()
    assert source.reads == 1
    now[0] += 2.0
    await snapshot.get()
    assert source.reads == 2


async def test_a_read_overtaken_by_a_change_answers_but_is_not_kept():
    source = Source()
    snapshot = Snapshot(source.load)
    source.gate = asyncio.Event()
    reading = asyncio.ensure_future(snapshot.get())
    await asyncio.sleep(0)
    source.value = ["a", "changed"]
    snapshot.forget()  # the change's write is done while the read was under way
    source.gate.set()
    assert await reading == ["a"]
    source.gate = None
    assert await snapshot.get() == ["a", "changed"]
    assert source.reads == 2


@pytest.mark.parametrize("calls", [1, 3])
async def test_an_empty_collection_is_kept_too(calls):
    source = Source()
    source.value = []
    snapshot = Snapshot(source.load)
    for _ in range(calls):
        assert await snapshot.get() == []
    assert source.reads == 1
