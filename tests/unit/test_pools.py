"""The local pool backend: real processes (a stand-in that sleeps), sized as asked, never more
than the host may run."""

import pytest

from shared.pools import LocalPool

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_pools_grow_and_shrink_and_share_the_hosts_room(tmp_path):
    pool = LocalPool(tmp_path, module="tests.sleeper", stop_timeout=5, max_workers=3)
    try:
        await pool.scale("a", 2)
        await pool.scale("b", 2)  # one place left on the host
        assert (await pool.count("a"), await pool.count("b")) == (2, 1)
        await pool.scale("a", 1)
        await pool.scale("b", 2)  # room again
        assert (await pool.count("a"), await pool.count("b")) == (1, 2)
        await pool.stop("a")
        assert await pool.count("a") == 0
    finally:
        await pool.close()
    assert await pool.count("b") == 0


async def test_a_host_that_runs_no_workers_starts_none(tmp_path):
    pool = LocalPool(tmp_path, module="tests.sleeper", max_workers=0)
    await pool.scale("a", 4)
    assert await pool.count("a") == 0
