"""What the broker hop costs a routed call.

Measures `GET /users` as a valid user (HTTP -> gateway -> RPC -> identity -> MongoDB -> reply)
beside `GET /ping`, which the same gateway process answers from memory, at concurrency 1 and
64: median and p99 latency and throughput, and their ratio. The difference of the medians is
what the platform adds per routed call (budget: < 5 ms on loopback).

    .venv/bin/python bench/gateway.py                 # starts a private stack on free ports
    .venv/bin/python bench/gateway.py --url http://127.0.0.1:8080 --key KEY   # a running one
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx


@dataclass
class Figures:
    median_ms: float
    p99_ms: float
    per_second: float


async def measure(client: httpx.AsyncClient, path: str, headers: dict, *, concurrency: int, total: int) -> Figures:
    latencies: list[float] = []
    remaining = total

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            started = time.perf_counter()
            response = await client.get(path, headers=headers)
            latencies.append(time.perf_counter() - started)
            if response.status_code != 200:
                raise SystemExit(f"{path} answered {response.status_code}: {response.text}")

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - started
    latencies.sort()
    return Figures(
        median_ms=statistics.median(latencies) * 1000,
        p99_ms=latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000,
        per_second=total / wall,
    )


async def run(url: str, key: str, user: str, total: int) -> None:
    headers = {"x-api-key": key, "username": user}
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as client:
        for path in ("/ping", "/users"):  # warm up connections and the principal cache
            await measure(client, path, headers, concurrency=8, total=200)
        print(f"{'route':<28}{'conc':>5}{'median ms':>11}{'p99 ms':>9}{'req/s':>9}")
        for concurrency in (1, 64):
            n = total if concurrency > 1 else total // 2
            baseline = await measure(client, "/ping", headers, concurrency=concurrency, total=n)
            routed = await measure(client, "/users", headers, concurrency=concurrency, total=n)
            for name, figures in (("GET /ping (from memory)", baseline), ("GET /users (RPC+MongoDB)", routed)):
                print(
                    f"{name:<28}{concurrency:>5}{figures.median_ms:>11.2f}"
                    f"{figures.p99_ms:>9.2f}{figures.per_second:>9.0f}"
                )
            print(
                f"{'  routed / baseline':<28}{concurrency:>5}"
                f"{routed.median_ms / baseline.median_ms:>10.2f}x"
                f"{routed.p99_ms / baseline.p99_ms:>8.2f}x"
                f"{routed.per_second / baseline.per_second:>8.2f}x"
                f"   added at the median: {routed.median_ms - baseline.median_ms:.2f} ms"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running gateway; default: start a private stack")
    parser.add_argument("--key", help="its API key")
    parser.add_argument("--user", default="admin")
    parser.add_argument("--requests", type=int, default=4000)
    args = parser.parse_args()
    if args.url:
        asyncio.run(run(args.url, args.key, args.user, args.requests))
        return

    from deploy.local.stack import LocalStack, free_port

    with tempfile.TemporaryDirectory(prefix="esd-bench-") as var:
        stack = LocalStack(
            Path(var),
            gateway_port=free_port(),
            mongo_port=free_port(),
            s3_port=free_port(),
            env={"ESD_BROKER_PREFIX": f"bench-{uuid.uuid4().hex[:6]}.", "ESD_LOG_LEVEL": "WARNING"},
            quiet=True,
        )
        stack.up()
        try:
            asyncio.run(run(stack.gateway_url, stack.api_key, stack.admin_username, args.requests))
        finally:
            stack.down()


if __name__ == "__main__":
    main()
