"""A one-node Docker swarm on this machine for the swarm end-to-end tests: installs Debian's
Docker engine when missing, starts `dockerd` on addresses outside the private ranges, makes a
base image without a registry (debootstrap, cached), builds the platform's image
(scripts/build-image.sh, wheels cached), starts a swarm on loopback, and undoes everything it
started (services, swarm, dockerd, its links and mounts), also after a failure.

Nothing here sends traffic beyond loopback: the bridge and swarm address pools are in
198.18.0.0/15 (set aside for benchmarks, RFC 2544), and every service uses the host's network.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

DOCKER = "/usr/bin/docker"  # Debian's client: one earlier in PATH may be another version
DOCKERD = "/usr/sbin/dockerd"
SOCKET = Path("/var/run/docker.sock")
CACHE = Path(os.environ.get("ESD_E2E_CACHE", "/var/cache/esd-e2e"))
BASE_IMAGE = "local/debian:bookworm"
# the workers' wheels are built for Debian 12's Python 3.11, whatever this host runs
BASE_SUITE = "bookworm"
REPO_ROOT = Path(__file__).resolve().parents[2]


class DockerUnavailable(Exception):
    """Docker cannot run on this machine at all (the tests are skipped, saying why)."""


def run(*args: str, timeout: float = 600, check: bool = True, env: dict | None = None, **kwargs):
    return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, check=check, env=env, **kwargs)


def docker(*args: str, timeout: float = 300, check: bool = True, env: dict | None = None, cwd=None):
    return run(DOCKER, *args, timeout=timeout, check=check, env=env, cwd=cwd)


def debian_mirror() -> str:
    """The Debian mirror apt on this machine is configured with."""
    sources = Path("/etc/apt/sources.list.d/debian.sources")
    if sources.exists():
        for match in re.finditer(r"^URIs:\s*(\S+)", sources.read_text(), re.M):
            if "security" not in match.group(1):
                return match.group(1)
    listing = Path("/etc/apt/sources.list")
    if listing.exists():
        for match in re.finditer(r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+\S+\s+main", listing.read_text(), re.M):
            if "security" not in match.group(1):
                return match.group(1)
    return "http://deb.debian.org/debian"


class DockerHost:
    def __init__(self, workdir: Path, say=print) -> None:
        self.workdir = workdir
        self.say = say
        self.dockerd: subprocess.Popen | None = None
        self.swarm_started = False
        self.policy_added = False

    # --- the engine ---

    def install(self) -> None:
        """Debian's docker.io and debootstrap, when missing. The packages' own start of
        dockerd (with its default 172.17.0.0/16 bridge) is held back: this module starts it."""
        if Path(DOCKERD).exists() and Path(DOCKER).exists() and shutil.which("debootstrap"):
            return
        if os.geteuid() != 0:
            raise DockerUnavailable("installing Docker needs root")
        policy = Path("/usr/sbin/policy-rc.d")
        if not policy.exists():
            policy.write_text("#!/bin/sh\nexit 101\n")
            policy.chmod(0o755)
            self.policy_added = True
        try:
            self.say("installing docker.io and debootstrap")
            env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
            update = run("apt-get", "update", check=False, env=env, stdin=subprocess.DEVNULL)
            packages = ("docker.io", "debootstrap", "iptables")
            installed = run(
                "apt-get", "install", "-y", "--no-install-recommends", *packages, check=False, env=env,
                stdin=subprocess.DEVNULL,
            )  # fmt: skip
            if installed.returncode != 0:
                raise DockerUnavailable(
                    f"apt-get could not install Docker: {(update.stderr + installed.stderr)[-800:]}"
                )
        finally:
            if self.policy_added:
                policy.unlink(missing_ok=True)

    def start(self) -> None:
        if self._answers():
            self.say("dockerd already runs: using it")
            return
        if os.geteuid() != 0:
            raise DockerUnavailable("starting dockerd needs root")
        with open(self.workdir / "dockerd.log", "ab") as log:  # the child keeps its own copy
            self.dockerd = subprocess.Popen(
                [
                    DOCKERD,
                    "--bip",
                    "198.18.0.1/24",
                    "--default-address-pool",
                    "base=198.19.0.0/16,size=24",
                    "--pidfile",
                    str(self.workdir / "dockerd.pid"),
                ],  # fmt: skip
                stdout=log,
                stderr=subprocess.STDOUT,
                # services use the local images, never a registry (none is reachable)
                env={**os.environ, "DOCKER_SERVICE_PREFER_OFFLINE_IMAGE": "1"},
                start_new_session=True,
            )
        deadline = time.monotonic() + 60
        while not self._answers():
            if self.dockerd.poll() is not None or time.monotonic() > deadline:
                tail = (self.workdir / "dockerd.log").read_text(errors="replace")[-1500:]
                self._stop_dockerd()
                raise DockerUnavailable(f"dockerd did not start: {tail}")
            time.sleep(0.5)
        self.say(f"started dockerd (pid {self.dockerd.pid})")

    def _answers(self) -> bool:
        return (
            SOCKET.exists()
            and docker("info", "--format", "{{.ServerVersion}}", check=False, timeout=20).returncode == 0
        )

    # --- images ---

    def base_image(self) -> str:
        """A Debian 12 image with Python, made without a registry: debootstrap once (the tarball
        is cached), then `docker import`."""
        if docker("image", "inspect", BASE_IMAGE, check=False).returncode == 0:
            return BASE_IMAGE
        tarball = CACHE / f"debian-{BASE_SUITE}-python.tar"
        if not tarball.exists():
            CACHE.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=CACHE) as root:
                self.say(f"debootstrap {BASE_SUITE} from {debian_mirror()}")
                run(
                    "debootstrap", "--variant=minbase", "--include=python3,python3-venv,ca-certificates",
                    BASE_SUITE, root, debian_mirror(), timeout=900,
                )  # fmt: skip
                partial = tarball.with_suffix(".partial")
                run("tar", "-C", root, "-cf", str(partial), ".")
                partial.rename(tarball)
        with open(tarball, "rb") as data:
            subprocess.run(
                [DOCKER, "import", "-", BASE_IMAGE], stdin=data, check=True, capture_output=True, timeout=300
            )
        return BASE_IMAGE

    def build(self, tag: str) -> None:
        """The platform's image by the script operators use, from cached wheels served on
        loopback (the build reaches no package index)."""
        import sys

        env = {**os.environ, "DOCKER": DOCKER, "PYTHON": sys.executable}
        built = run(
            str(REPO_ROOT / "scripts" / "build-image.sh"),
            "--tag", tag, "--base", self.base_image(), "--wheelhouse", str(CACHE / "wheels"),
            check=False, env=env, timeout=1200, cwd=REPO_ROOT,
        )  # fmt: skip
        (self.workdir / "build.log").write_text(built.stdout + built.stderr)
        if built.returncode != 0:
            raise AssertionError(f"the image did not build: {(built.stdout + built.stderr)[-3000:]}")
        docker("image", "prune", "--force", check=False)  # the layers earlier builds left dangling

    # --- the swarm ---

    def swarm(self) -> None:
        state = docker("info", "--format", "{{.Swarm.LocalNodeState}}").stdout.strip()
        if state == "active":
            return
        docker(
            "swarm", "init", "--advertise-addr", "127.0.0.1", "--listen-addr", "127.0.0.1:2377",
            "--default-addr-pool", "198.18.128.0/17",
        )  # fmt: skip
        self.swarm_started = True

    # --- teardown ---

    def close(self) -> None:
        if self.swarm_started:
            docker("swarm", "leave", "--force", check=False, timeout=120)
        if self.dockerd is not None:
            docker("container", "prune", "--force", check=False, timeout=120)
            self._stop_dockerd()
            for link in ("docker0", "docker_gwbridge"):
                run("ip", "link", "delete", link, check=False)
            for mount in sorted(Path("/run/docker/netns").glob("*")) if Path("/run/docker/netns").exists() else []:
                run("umount", str(mount), check=False)

    def _stop_dockerd(self) -> None:
        process, self.dockerd = self.dockerd, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(30)
        self.say("stopped dockerd")
