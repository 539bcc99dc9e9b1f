"""Background processes of the local stack, tracked by pid files under `<var>/run/`.

A pid file alone is not trusted: a process counts as ours only while it is alive, its command
line holds the program we launched, and its environment carries `ESD_VAR_DIR=<var dir>`, so a
recycled pid or another stack's process is never mistaken for ours nor signalled.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

VAR_DIR_ENV = "ESD_VAR_DIR"


class StackError(RuntimeError):
    """Something of the stack could not be started or is not answering."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    with socket.socket() as sock:
        sock.settimeout(timeout)
        return sock.connect_ex((host, port)) == 0


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_port_block(count: int) -> int:
    """The first of `count` consecutive free ports. Searched below the kernel's ephemeral range
    (32768 and up), where outgoing connections would otherwise take them away later."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20000, 32000 - count)
        if all(_port_free(port) for port in range(base, base + count)):
            return base
    raise StackError(f"found no {count} consecutive free ports")


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    if stat.rsplit(")", 1)[1].split()[0] != "Z":
        return True
    try:
        # a zombie that is our own child: reap it
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    return False


class ManagedProcess:
    """One program of the stack: its pid file, its log, and how to start and stop it."""

    def __init__(
        self,
        name: str,
        var_dir: Path,
        argv: Sequence[str],
        *,
        marker: str,
        writes_pid_file: bool = False,
    ) -> None:
        self.name = name
        self.var_dir = var_dir
        self.argv = list(argv)
        # what the command line of a running instance contains (it is launched with ports
        # that may differ from this instance's argv)
        self.marker = marker
        self.writes_pid_file = writes_pid_file
        self.popen: subprocess.Popen | None = None

    @property
    def pid_file(self) -> Path:
        return self.var_dir / "run" / f"{self.name}.pid"

    @property
    def log_file(self) -> Path:
        return self.var_dir / "log" / f"{self.name}.log"

    def _ours(self, pid: int) -> bool:
        if not _alive(pid):
            return False
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            return False
        tag = f"{VAR_DIR_ENV}={self.var_dir}".encode()
        return self.marker.encode() in cmdline and tag in environ

    def running_pid(self) -> int | None:
        """The pid of our running instance, or None (a stale pid file is removed)."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        if self._ours(pid):
            return pid
        self.pid_file.unlink(missing_ok=True)
        return None

    def start(self, env: Mapping[str, str], cwd: Path | None = None) -> int:
        self.pid_file.parent.mkdir(parents=True, exist_ok=True)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with self.log_file.open("ab") as log:
            self.popen = subprocess.Popen(
                self.argv,
                cwd=cwd,
                env={**env, VAR_DIR_ENV: str(self.var_dir)},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        if not self.writes_pid_file:
            self.pid_file.write_text(f"{self.popen.pid}\n")
        return self.popen.pid

    def check_started(self) -> None:
        """Raises with the end of its log if the process started by `start` has exited."""
        if self.popen is not None and self.popen.poll() is not None:
            raise StackError(
                f"{self.name} exited with code {self.popen.returncode}; "
                f"last lines of {self.log_file}:\n{log_tail(self.log_file)}"
            )

    def send(self, sig: signal.Signals) -> int | None:
        pid = self.running_pid()
        if pid is not None:
            os.kill(pid, sig)
        return pid

    def stop(self, sig: signal.Signals = signal.SIGTERM, grace: float = 15.0) -> None:
        stop_all([self], sig, grace)


def platform_process(name: str, var_dir: Path) -> ManagedProcess:
    """The gateway or a service (`python -m services.<name>`) of the stack under `var_dir`."""
    module = f"services.{name}"
    return ManagedProcess(name, var_dir, [sys.executable, "-m", module], marker=module)


def stop_all(processes: Sequence[ManagedProcess], sig: signal.Signals, grace: float) -> None:
    """Signals them all, waits up to `grace` seconds, kills what is left, removes pid files."""
    pids = {process: pid for process in processes if (pid := process.send(sig)) is not None}
    deadline = time.monotonic() + grace
    while pids and time.monotonic() < deadline:
        pids = {process: pid for process, pid in pids.items() if _alive(pid)}
        time.sleep(0.1)
    for pid in pids.values():
        os.kill(pid, signal.SIGKILL)
    for pid in pids.values():
        while _alive(pid):
            time.sleep(0.05)
    for process in processes:
        process.pid_file.unlink(missing_ok=True)
        process.popen = None


def wait_until(check: Callable[[], bool], what: str, timeout: float, process: ManagedProcess | None = None) -> None:
    """Polls `check()` until it is true; fails at once if `process` has exited."""
    deadline = time.monotonic() + timeout
    while True:
        if process is not None:
            process.check_started()
        try:
            if check():
                return
        except Exception:
            if time.monotonic() >= deadline:
                raise
        if time.monotonic() >= deadline:
            raise StackError(f"{what} did not answer within {timeout:g} s")
        time.sleep(0.2)
