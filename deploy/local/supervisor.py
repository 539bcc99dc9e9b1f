"""`python -m deploy.local.supervisor --var-dir DIR NAME...`: keeps the local stack's own
processes (the gateway and the services) running once `make up` has started them.

It is a process of its own (so the stack outlives the shell that ran `make up`), started last by
`up()` and stopped first by `down()`. It finds each process by its pid file, as the stack does;
one that is gone (killed, crashed) is started again with the stack's settings after a pause that
doubles with every restart in a row (1 s, 2 s, 4 s... up to 30 s), back to 1 s once it has run
for 30 s, so a process that cannot start does not spin. What it sees and does goes to its log
and to `run/supervisor.json`, which `make status` shows. The servers (RabbitMQ, nx-27017,
SeaweedFS) are not restarted: they keep data, and their outages are something the platform
must ride out (tests/faults).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from deploy.local.process import free_port, platform_process

REPO_ROOT = Path(__file__).resolve().parents[2]
FIRST_PAUSE = 1.0
LONGEST_PAUSE = 30.0
STEADY_AFTER = 30.0  # seconds up after which a process's next restart waits FIRST_PAUSE again
TICK = 0.5


def state_file(var_dir: Path) -> Path:
    return var_dir / "run" / "supervisor.json"


def read_state(var_dir: Path) -> dict[str, dict]:
    """What the supervisor last wrote, by process name ({} when it never ran)."""
    try:
        return json.loads(state_file(var_dir).read_text())
    except (OSError, ValueError):
        return {}


@dataclass
class Watched:
    """One supervised process: how often it was restarted and when it goes next."""

    restarts: int = 0
    pause: float = FIRST_PAUSE
    up_since: float | None = None  # wall clock, when it was seen (or started) running
    down_since: float | None = None  # wall clock, when it was seen gone
    restart_at: float | None = None


class Supervisor:
    def __init__(self, var_dir: Path, names: Sequence[str], env: Mapping[str, str]) -> None:
        self.var_dir = Path(var_dir).resolve()
        self.env = dict(env)
        self.processes = {name: platform_process(name, self.var_dir) for name in names}
        self.watched = {name: Watched() for name in names}
        self.stopping = False

    def say(self, event: str, **fields) -> None:
        # one JSON object per line, as the other processes' logs
        print(json.dumps({"event": event, "timestamp": time.time(), **fields}), flush=True)

    def tick(self) -> bool:
        """One look at every process; True when the state changed."""
        now = time.time()
        changed = False
        for name, process in self.processes.items():
            watched = self.watched[name]
            if process.running_pid() is not None:
                if watched.up_since is None:
                    watched.up_since, watched.down_since, watched.restart_at = now, None, None
                    changed = True
                elif now - watched.up_since >= STEADY_AFTER and watched.pause != FIRST_PAUSE:
                    watched.pause = FIRST_PAUSE
                    changed = True
                continue
            if watched.restart_at is None:
                watched.up_since, watched.down_since = None, now
                watched.restart_at = now + watched.pause
                self.say("supervisor.process_gone", process=name, restart_in=watched.pause)
                watched.pause = min(watched.pause * 2, LONGEST_PAUSE)
                changed = True
            elif now >= watched.restart_at:
                # a fresh metrics port: the old one may still be held by the dead process's socket
                pid = process.start({**self.env, "ESD_METRICS_PORT": str(free_port())}, cwd=REPO_ROOT)
                watched.restarts += 1
                watched.up_since, watched.down_since, watched.restart_at = now, None, None
                self.say("supervisor.restarted", process=name, pid=pid, restarts=watched.restarts)
                changed = True
        return changed

    def write_state(self) -> None:
        path = state_file(self.var_dir)
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps({name: asdict(watched) for name, watched in self.watched.items()}))
        temporary.replace(path)

    def run(self) -> None:
        def stop(*_) -> None:
            self.stopping = True

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        self.say("supervisor.started", processes=list(self.processes), pid=os.getpid())
        self.write_state()
        while not self.stopping:
            if self.tick():
                self.write_state()
            time.sleep(TICK)
        self.say("supervisor.stopped")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.local.supervisor", description=__doc__.splitlines()[0])
    parser.add_argument("--var-dir", type=Path, required=True)
    parser.add_argument("names", nargs="+", help="the processes to keep running")
    args = parser.parse_args(argv)
    Supervisor(args.var_dir, args.names, os.environ).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
