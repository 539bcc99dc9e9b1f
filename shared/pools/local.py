"""The `local` pool backend: worker processes on this host (the embedded default, and the
training service's workers). It only knows the processes it started."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

if TYPE_CHECKING:
    from shared.pools import PoolSpec

log = structlog.get_logger(__name__)


class LocalPool:
    """Worker processes on this host, one `python -m <module> --endpoint <pool> --worker-id <id>`
    each."""

    scales_itself = False

    def __init__(
        self,
        log_dir: Path,
        module: str = "services.inference.worker",
        env: dict[str, str] | None = None,
        stop_timeout: float = 60.0,
        max_workers: int | None = None,
    ) -> None:
        self.log_dir = log_dir
        self.module = module
        self.env = {**os.environ, **(env or {})}
        self.stop_timeout = stop_timeout
        # what this host can run, all pools together; a pool asking for more gets what is left
        self.max_workers = max_workers
        self.held_back: dict[str, int] = {}  # pool -> workers it wanted but did not get (logged once)
        self.workers: dict[str, dict[str, asyncio.subprocess.Process]] = {}

    async def create(self, spec: PoolSpec) -> None:
        pass  # a local pool is its processes: nothing to make before them

    async def count(self, endpoint: str) -> int:
        return len(self._alive(endpoint))

    def _alive(self, endpoint: str) -> dict[str, asyncio.subprocess.Process]:
        pool = self.workers.setdefault(endpoint, {})
        for worker_id in [w for w, process in pool.items() if process.returncode is not None]:
            log.warning("pool.worker_exited", endpoint=endpoint, worker_id=worker_id, code=pool[worker_id].returncode)
            del pool[worker_id]
        return pool

    async def scale(self, endpoint: str, count: int) -> None:
        pool = self._alive(endpoint)
        others = sum(len(self._alive(name)) for name in list(self.workers) if name != endpoint)
        if self.max_workers is not None and count > len(pool):
            room = max(0, self.max_workers - others)
            if count > room:
                if self.held_back.get(endpoint) != count - room:
                    log.warning(
                        "pool.host_full", endpoint=endpoint, wanted=count, started=room, max_workers=self.max_workers
                    )
                self.held_back[endpoint] = count - room
                count = room
            else:
                self.held_back.pop(endpoint, None)
        host_total = others + count
        while len(pool) < count:
            worker_id = f"{endpoint}-{uuid.uuid4().hex[:6]}"
            self.log_dir.mkdir(parents=True, exist_ok=True)
            with open(self.log_dir / f"worker-{worker_id}.log", "ab") as output:
                pool[worker_id] = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    self.module,
                    "--endpoint",
                    endpoint,
                    "--worker-id",
                    worker_id,
                    stdout=output,
                    stderr=asyncio.subprocess.STDOUT,
                    env=self._worker_env(host_total),
                    start_new_session=True,
                )
            log.info("pool.worker_started", endpoint=endpoint, worker_id=worker_id, pid=pool[worker_id].pid)
        surplus = list(pool)[count:]
        await asyncio.gather(*(self._stop(endpoint, worker_id) for worker_id in surplus))

    def _worker_env(self, host_total: int) -> dict[str, str]:
        """The workers of this host share its cores: each new one gets its part, unless the
        operator named a thread count. Each knows its parent, with which it goes. Where the service serves metrics, each worker serves its
        own on a free port (the service's port is taken)."""
        env = dict(self.env)
        # the worker goes when this process goes (killed or not): its successor starts its own
        env["ESD_WORKER_PARENT_PID"] = str(os.getpid())
        if env.get("ESD_METRICS_PORT"):
            env["ESD_METRICS_PORT"] = "0"
        if not env.get("ESD_WORKER_THREADS"):
            env["ESD_WORKER_THREADS"] = str(max(1, (os.cpu_count() or 1) // max(host_total, 1)))
        return env

    async def _stop(self, endpoint: str, worker_id: str) -> None:
        process = self.workers.get(endpoint, {}).pop(worker_id, None)
        if process is None or process.returncode is not None:
            return
        process.send_signal(signal.SIGTERM)  # the worker finishes its job, then exits
        try:
            await asyncio.wait_for(process.wait(), self.stop_timeout)
        except TimeoutError:
            process.kill()
            await process.wait()
        log.info("pool.worker_stopped", endpoint=endpoint, worker_id=worker_id)

    async def stop(self, endpoint: str) -> None:
        await self.scale(endpoint, 0)
        self.workers.pop(endpoint, None)
        self.held_back.pop(endpoint, None)

    async def close(self) -> None:
        await asyncio.gather(*(self.stop(endpoint) for endpoint in list(self.workers)))
