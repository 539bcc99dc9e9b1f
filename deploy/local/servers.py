"""The servers that the local stack runs beside its own processes: RabbitMQ (the system package,
installed and started when missing), nx-27017 (MongoDB wire protocol on SQLite) and SeaweedFS's
S3 server. Tests use `EmbeddedMongo` on its own for a database on a free port."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from urllib.parse import urlparse

from deploy.local.process import (
    ManagedProcess,
    StackError,
    free_port,
    free_port_block,
    log_tail,
    port_open,
    wait_until,
)

Say = Callable[[str], None]

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}
# rabbitmq-server and rabbitmqctl live in /usr/sbin, which a non-login PATH may lack
SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])


def _bin(name: str) -> Path:
    """A program installed in this interpreter's environment (the project's venv)."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise StackError(f"{path} is missing: run `make install`")
    return path


def _free(port: int) -> None:
    if port_open("127.0.0.1", port):
        raise StackError(f"port {port} on 127.0.0.1 is already in use")


def _quiet(_: str) -> None:
    pass


class EmbeddedMongo:
    """nx-27017 with its data under `<var>/mongo`, on 127.0.0.1."""

    def __init__(self, var_dir: Path, port: int | None = None, say: Say = _quiet) -> None:
        self.var_dir = Path(var_dir).resolve()
        self.port = port or free_port()
        self.say = say
        self.process = ManagedProcess(
            "nx-27017",
            self.var_dir,
            [
                str(_bin("nx-27017")),
                "--data-dir",
                str(self.var_dir / "mongo"),
                "--host",
                "127.0.0.1",
                "-p",
                str(self.port),
                "--pid-file",
                str(self.var_dir / "run" / "nx-27017.pid"),
                # it also logs to stderr, which goes to the log: one copy is enough
                "--log-file",
                os.devnull,
            ],
            marker=str(_bin("nx-27017")),
            writes_pid_file=True,
        )

    @property
    def url(self) -> str:
        return f"mongodb://127.0.0.1:{self.port}"

    def start(self, env: Mapping[str, str] | None = None) -> None:
        if (pid := self.process.running_pid()) is not None:
            self.say(f"nx-27017 already runs (pid {pid})")
        else:
            _free(self.port)
            (self.var_dir / "mongo").mkdir(parents=True, exist_ok=True)
            pid = self.process.start(os.environ if env is None else env)
            self.say(f"started nx-27017 on port {self.port} (pid {pid})")
        wait_until(self._ping, f"nx-27017 at {self.url}", 30, self.process)

    def _ping(self) -> bool:
        from pymongo import MongoClient

        with MongoClient(self.url, serverSelectionTimeoutMS=500) as client:
            client.admin.command("ping")
        return True

    def stop(self) -> None:
        self.process.stop(signal.SIGTERM)


class EmbeddedS3:
    """One `weed server` (master, volume, filer and S3) with its data under `<var>/s3`.

    Every port is set, as SeaweedFS otherwise opens several default ones (8080, 8181, 9101...):
    the S3 port, and seven consecutive internal ones from `port_base` (a free block when None).
    """

    INTERNAL_PORTS = 7

    def __init__(
        self,
        var_dir: Path,
        port: int,
        *,
        access_key: str,
        secret_key: str,
        bucket: str,
        port_base: int | None = None,
        say: Say = _quiet,
    ) -> None:
        self.var_dir = Path(var_dir).resolve()
        self.port = port
        self.access_key = access_key
        self.secret_key = secret_key
        self.bucket = bucket
        self.port_base = port_base
        self.say = say
        self.process = ManagedProcess("weed", self.var_dir, [], marker=str(_bin("weed")))

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _argv(self, base: int) -> list[str]:
        return [
            str(_bin("weed")),
            "server",
            f"-dir={self.var_dir / 's3'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={base}",
            f"-master.port.grpc={base + 1}",
            f"-volume.port={base + 2}",
            f"-volume.port.grpc={base + 3}",
            "-filer",
            f"-filer.port={base + 4}",
            f"-filer.port.grpc={base + 5}",
            "-s3",
            f"-s3.port={self.port}",
            f"-s3.port.grpc={base + 6}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.config={self.var_dir / 's3.json'}",
            "-metricsPort=0",
            "-master.telemetry=false",
            "-volume.max=0",
            "-master.volumeSizeLimitMB=64",
        ]

    def start(self, env: Mapping[str, str] | None = None) -> None:
        if (pid := self.process.running_pid()) is not None:
            self.say(f"SeaweedFS already runs (pid {pid})")
        else:
            base = self.port_base or free_port_block(self.INTERNAL_PORTS)
            for port in (self.port, *range(base, base + self.INTERNAL_PORTS)):
                _free(port)
            (self.var_dir / "s3").mkdir(parents=True, exist_ok=True)
            identity = {
                "name": "esd",
                "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
            config = self.var_dir / "s3.json"
            config.write_text(json.dumps({"identities": [identity]}))
            config.chmod(0o600)
            self.process.argv = self._argv(base)
            pid = self.process.start(os.environ if env is None else env)
            self.say(f"started SeaweedFS S3 on port {self.port}, internal ports {base}-{base + 6} (pid {pid})")
        wait_until(lambda: port_open("127.0.0.1", self.port), f"SeaweedFS S3 at {self.endpoint_url}", 60, self.process)
        # it takes a few seconds after opening the port before it accepts writes
        wait_until(self._ensure_bucket, f"creating bucket {self.bucket!r}", 60, self.process)

    def _ensure_bucket(self) -> bool:
        import boto3
        from botocore.config import Config
        from botocore.exceptions import ClientError

        client = boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
            config=Config(signature_version="s3v4", s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
        )
        try:
            client.head_bucket(Bucket=self.bucket)
        except ClientError as error:
            if error.response["Error"]["Code"] not in ("404", "NoSuchBucket"):
                raise
            client.create_bucket(Bucket=self.bucket)
        return True

    def stop(self) -> None:
        pid = self.process.running_pid()
        if pid is None:
            return
        ports = re.findall(rb"port(?:\.grpc)?=(\d+)", Path(f"/proc/{pid}/cmdline").read_bytes())
        # it ignores SIGTERM
        self.process.stop(signal.SIGKILL, grace=5)
        # and, killed, leaves its unix sockets (/tmp/seaweedfs-<part>-<port>.sock) behind
        for port in ports:
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port.decode()}.sock"):
                sock.unlink(missing_ok=True)


def amqp_address(amqp_url: str) -> tuple[str, int]:
    """Host and port of an AMQP URL."""
    parsed = urlparse(amqp_url)
    return parsed.hostname or "127.0.0.1", parsed.port or 5672


def ensure_rabbitmq(amqp_url: str, log_file: Path, say: Say = print) -> bool:
    """Makes sure RabbitMQ answers at `amqp_url`: installs and starts the system package when
    the address is local and nothing listens. True when this call started it."""
    host, port = amqp_address(amqp_url)
    if port_open(host, port):
        return False
    if host not in LOCAL_HOSTS:
        raise StackError(f"RabbitMQ at {host}:{port} is not reachable")
    apt_env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if shutil.which("rabbitmq-server", path=SBIN_PATH) is None:
        say("RabbitMQ is not installed: apt-get update && apt-get install -y rabbitmq-server")
        subprocess.run(["apt-get", "update"], check=True, env=apt_env, stdin=subprocess.DEVNULL)
        subprocess.run(
            ["apt-get", "install", "-y", "rabbitmq-server"], check=True, env=apt_env, stdin=subprocess.DEVNULL
        )
        if port_open(host, port):  # the package's own scripts may have started it
            return True
    server = shutil.which("rabbitmq-server", path=SBIN_PATH)
    if server is None:
        raise StackError("rabbitmq-server is still missing after apt-get install")
    say("starting RabbitMQ (rabbitmq-server -detached)")
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("ab") as log:
        # no check: a node the package's install scripts are still starting makes this exit
        # non-zero, and the port below is the judge either way
        subprocess.run(
            [server, "-detached"],
            check=False,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    # `rabbitmq-diagnostics ping` answers before the AMQP listener is open: poll the port
    try:
        wait_until(lambda: port_open(host, port), f"RabbitMQ on port {port}", 120)
    except StackError as error:
        raise StackError(f"{error}; see /var/log/rabbitmq and {log_file}:\n{log_tail(log_file)}") from None
    say(f"RabbitMQ answers on {host}:{port}")
    return True


def stop_rabbitmq(amqp_url: str, say: Say = print) -> None:
    ctl = shutil.which("rabbitmqctl", path=SBIN_PATH)
    if ctl is None:
        raise StackError("rabbitmqctl not found")
    say("stopping RabbitMQ (rabbitmqctl stop)")
    subprocess.run([ctl, "stop"], check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    host, port = amqp_address(amqp_url)
    wait_until(lambda: not port_open(host, port), f"RabbitMQ stopping on port {port}", 60)


class EmbeddedRabbitMQ:
    """A RabbitMQ node of its own (not the machine's): its name, AMQP and distribution ports,
    data and logs under `<var>/rabbitmq`, no plugins. What a test starts when it must stop or
    restart the broker, which it may not do to the machine's shared one."""

    def __init__(self, var_dir: Path, port: int | None = None, say: Say = _quiet) -> None:
        self.var_dir = Path(var_dir).resolve()
        self.port = port or free_port_block(2)
        self.say = say
        self.home = self.var_dir / "rabbitmq"
        self.node = f"esd{self.port}@localhost"
        # the VM's command line names the application it boots (`-s rabbit boot`), not the node
        self.process = ManagedProcess("rabbitmq", self.var_dir, [str(self._server())], marker="rabbit")

    @staticmethod
    def _server() -> Path:
        # the package's own script, not the /usr/sbin wrapper, which switches to the `rabbitmq`
        # user (who could not write under our var folder)
        for path in (Path("/usr/lib/rabbitmq/bin/rabbitmq-server"), shutil.which("rabbitmq-server", path=SBIN_PATH)):
            if path and Path(path).exists():
                return Path(path)
        raise StackError("rabbitmq-server is not installed")

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def _env(self, env: Mapping[str, str]) -> dict[str, str]:
        return {
            **env,
            # an empty environment file: the system's names the machine's node and its port
            "RABBITMQ_CONF_ENV_FILE": str(self.home / "rabbitmq-env.conf"),
            "RABBITMQ_CONFIG_FILE": str(self.home / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.home / "enabled_plugins"),
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.port + 1),
            "RABBITMQ_MNESIA_BASE": str(self.home / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.home / "log"),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            # the script then becomes the Erlang VM (no shell in between): the pid is the node's
            "RUNNING_UNDER_SYSTEMD": "true",
            "ERL_FLAGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        }

    def start(self, env: Mapping[str, str] | None = None) -> None:
        if (pid := self.process.running_pid()) is not None:
            self.say(f"RabbitMQ node {self.node} already runs (pid {pid})")
        else:
            _free(self.port)
            self.home.mkdir(parents=True, exist_ok=True)
            (self.home / "rabbitmq-env.conf").write_text("")
            (self.home / "enabled_plugins").write_text("[].\n")
            (self.home / "rabbitmq.conf").write_text(f"listeners.tcp.local = 127.0.0.1:{self.port}\n")
            pid = self.process.start(self._env(os.environ if env is None else env))
            self.say(f"started RabbitMQ node {self.node} on port {self.port} (pid {pid})")
        # the AMQP listener opens last, once the node has booted
        wait_until(lambda: port_open("127.0.0.1", self.port), f"RabbitMQ on port {self.port}", 120, self.process)

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        """SIGTERM: the node shuts down cleanly (durable queues and persistent messages stay);
        SIGKILL: as a crash."""
        self.process.stop(sig, grace=60)
