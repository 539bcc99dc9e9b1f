"""What the broker hop costs a routed call, under load from `wrk`.

Starts a private stack (every service, on free ports, under a temporary folder) and its own
gateway process, in which this bench mounts one extra route, `/bench/users`: it reads what
identity's `list_users` reads, through the same store (users and roles, held in memory and
read again from MongoDB after a change or their TTL), directly in the gateway process. Then
`wrk` drives, at 1 and 64 connections:

- `GET /ping`: answered from memory (the HTTP floor);
- `GET /users`: HTTP -> gateway -> RPC -> identity -> reply (the routed call);
- `GET /bench/users`: the same reads in-process (the baseline without the broker hop).

Every case runs `--rounds` times, the cases interleaved, and the medians are shown (this
machine is noisy: one run of a case can be 20% off the next). It prints req/s, p50 and p99 of
each, and the ratios routed / baseline. `wrk` is installed
(Debian's package) when missing.

    .venv/bin/python bench/gateway.py [--seconds 8] [--users 5] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


@dataclass
class Figures:
    per_second: float
    p50_ms: float
    p99_ms: float


def ensure_wrk() -> str:
    found = shutil.which("wrk")
    if found:
        return found
    print("installing wrk (Debian's package)...", flush=True)
    subprocess.run(
        ["apt-get", "install", "-y", "wrk"],
        check=True,
        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        stdout=subprocess.DEVNULL,
    )
    return shutil.which("wrk") or "wrk"


def _ms(value: str, unit: str) -> float:
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def drive(wrk: str, url: str, headers: dict[str, str], *, connections: int, seconds: int) -> Figures:
    command = [wrk, "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", url]
    for name, value in headers.items():
        command += ["-H", f"{name}: {value}"]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    if "Non-2xx" in output:
        raise SystemExit(f"{url} answered errors under load:\n{output}")
    latency = {
        percent: _ms(value, unit)
        for percent, value, unit in re.findall(r"^\s+(50|99)(?:\.000)?%\s+([\d.]+)(us|ms|s)\s*$", output, re.M)
    }
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))
    return Figures(per_second=rate, p50_ms=latency["50"], p99_ms=latency["99"])


def serve_gateway() -> None:
    """The gateway as `services.gateway` runs it, plus the in-process baseline route."""
    import uvicorn
    from fastapi import Depends

    from services.gateway.app import create_app
    from services.gateway.envelope import respond
    from services.gateway.security import current_principal
    from services.identity import domain
    from services.identity.store import IdentityStore
    from shared.contracts.identity import SERVICE, Principal, UserList
    from shared.db import mongo_client
    from shared.logging import configure_logging
    from shared.outbox import Outbox
    from shared.settings import get_settings

    settings = get_settings()
    configure_logging("gateway", fmt=settings.log_format, level=settings.log_level)
    app = create_app(settings)
    # the baseline route only reads: its store has no event to relay (and, as identity's, it
    # keeps users and roles in memory: no change is made while the bench runs)
    store = IdentityStore(mongo_client(settings)[settings.database_name(SERVICE)], Outbox(publisher=None))

    @app.get("/bench/users", include_in_schema=False)
    async def users_in_process(principal: Principal = Depends(current_principal)):
        users = domain.visible_users(principal, await store.find_users(None))
        roles = await store.find_roles()
        return respond(200, UserList(users=[domain.user_view(user, roles) for user in users]))

    uvicorn.run(
        app,
        host="127.0.0.1",
        port=settings.gateway_port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level="warning",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=8, help="how long wrk drives each case")
    parser.add_argument("--users", type=int, default=5, help="users in identity besides the admin")
    parser.add_argument("--rounds", type=int, default=3, help="runs of every case (medians are shown)")
    parser.add_argument("--serve-gateway", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_gateway:
        serve_gateway()
        return

    from deploy.local.stack import LocalStack, free_port

    wrk = ensure_wrk()
    with tempfile.TemporaryDirectory(prefix="esd-bench-") as var:
        stack = LocalStack(
            Path(var),
            gateway_port=free_port(),
            mongo_port=free_port(),
            s3_port=free_port(),
            env={"ESD_BROKER_PREFIX": f"bench-{uuid.uuid4().hex[:6]}.", "ESD_LOG_LEVEL": "WARNING"},
            include_gateway=False,
            quiet=True,
        )
        stack.up()
        with open(Path(var) / "bench-gateway.log", "wb") as gateway_log:
            gateway = subprocess.Popen(
                [sys.executable, __file__, "--serve-gateway"],
                cwd=REPO,
                env=stack.env,
                stdout=subprocess.DEVNULL,
                stderr=gateway_log,
            )
            try:
                run(wrk, stack, args.seconds, args.users, args.rounds)
            except SystemExit:
                gateway_log.flush()
                print((Path(var) / "bench-gateway.log").read_text()[-4000:], file=sys.stderr)
                raise
            finally:
                gateway.terminate()
                gateway.wait(10)
                stack.down()


def run(wrk: str, stack, seconds: int, users: int, rounds: int) -> None:
    url = stack.gateway_url
    headers = {"x-api-key": stack.api_key, "username": stack.admin_username}
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{url}/ping", headers=headers, timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit("the bench's gateway did not come up")
        time.sleep(0.2)
    for n in range(users):
        httpx.post(
            f"{url}/users",
            headers=headers,
            json={"username": f"bench{n}", "password": "x", "roles": ["byoc"]},
            timeout=10,
        ).raise_for_status()
    cases = (
        ("GET /ping", "/ping"),
        ("GET /users (routed)", "/users"),
        ("GET /bench/users (in-process)", "/bench/users"),
    )
    for _, path in cases:  # warm up: connections, the principal cache, the services' pools
        drive(wrk, url + path, headers, connections=8, seconds=1)
    print(
        f"whole stack local, {users + 1} users, wrk {seconds} s per case, {rounds} rounds "
        f"(the cases interleaved; medians shown), {os.cpu_count()} cores\n"
    )
    print(f"{'route':<32}{'conn':>5}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}")
    for connections in (1, 64):
        runs: dict[str, list[Figures]] = {name: [] for name, _ in cases}
        for _ in range(rounds):  # interleaved: a noisy spell of the machine hits every case alike
            for name, path in cases:
                runs[name].append(drive(wrk, url + path, headers, connections=connections, seconds=seconds))
        figures = {name: _median(found) for name, found in runs.items()}
        for name, _ in cases:
            f = figures[name]
            print(f"{name:<32}{connections:>5}{f.per_second:>9.0f}{f.p50_ms:>9.2f}{f.p99_ms:>9.2f}")
        ping, routed, baseline = (figures[name] for name, _ in cases)
        print(
            f"  routed / in-process: {routed.per_second / baseline.per_second:.2f}x req/s; "
            f"routed p50 - /ping p50: {routed.p50_ms - ping.p50_ms:.2f} ms; "
            f"in-process p50 - /ping p50: {baseline.p50_ms - ping.p50_ms:.2f} ms"
        )
        print(f"  routed req/s by round: {', '.join(f'{f.per_second:.0f}' for f in runs[cases[1][0]])}\n")


def _median(found: list[Figures]) -> Figures:
    return Figures(
        per_second=statistics.median(f.per_second for f in found),
        p50_ms=statistics.median(f.p50_ms for f in found),
        p99_ms=statistics.median(f.p99_ms for f in found),
    )


if __name__ == "__main__":
    main()
