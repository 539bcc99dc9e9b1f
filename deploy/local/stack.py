"""The whole system on one machine, with real servers and no Docker: what `make up`, `make down`
and `make status` run, and what the end-to-end tests start on free ports under a temp folder.

`up()` brings up RabbitMQ (when local and not running), nx-27017 (unless MONGO_URL is set),
SeaweedFS's S3 (unless S3_ENDPOINT_URL is set), then every service and the gateway, and waits
until each answers. Every step is idempotent. `down()` stops exactly what `up()` started; the
data under the var folder stays.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import httpx

from deploy.local import supervisor
from deploy.local.process import (
    ManagedProcess,
    StackError,
    free_port,
    platform_process,
    port_open,
    stop_all,
    wait_until,
)
from deploy.local.servers import EmbeddedMongo, EmbeddedS3, amqp_address, ensure_rabbitmq, stop_rabbitmq
from services.webhooks.domain import new_secret as new_webhook_secret
from shared.rpc import CheckHealth, RpcClient, health_check
from shared.settings import Settings

__all__ = ["EmbeddedMongo", "EmbeddedS3", "LocalStack", "StackError", "free_port"]

REPO_ROOT = Path(__file__).resolve().parents[2]
SERVICES = ("identity", "checkpoint", "inference", "training", "webhooks")
DEFAULT_AMQP_URL = Settings.model_fields["amqp_url"].default


def _read_env_file(path: Path) -> dict[str, str]:
    if not path.exists():
        return {}
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
    return {key.strip(): value.strip() for key, value in pairs}


def _supervision(watched: dict | None) -> str:
    """What the supervisor says of a process, for `make status`."""
    if not watched:
        return ""
    now = time.time()
    parts = []
    if watched["restarts"]:
        parts.append(f"restarted {watched['restarts']} times")
    if watched["restart_at"] is not None:
        parts.append(f"restarting in {max(0.0, watched['restart_at'] - now):.0f} s")
    elif watched["up_since"] is not None:
        parts.append(f"up {now - watched['up_since']:.0f} s")
    return f" ({', '.join(parts)})" if parts else ""


class LocalStack:
    """One deployment under `var_dir`: `run/` pid files, `log/` logs, `mongo/` and `s3/` data,
    `secrets.env` (mode 0600) with the generated keys and passwords."""

    def __init__(
        self,
        var_dir: Path,
        *,
        gateway_port: int | None = None,
        mongo_port: int = 27017,
        s3_port: int = 8333,
        s3_port_base: int | None = None,
        env: Mapping[str, str] | None = None,
        services: Sequence[str] | None = None,
        include_gateway: bool = True,
        quiet: bool = False,
    ) -> None:
        self.var_dir = Path(var_dir).resolve()
        self.base_env = {**os.environ, **(env or {})}
        self.gateway_port = gateway_port or int(self.base_env.get("ESD_GATEWAY_PORT", "8080"))
        self.mongo_port = mongo_port
        self.s3_port = s3_port
        self.s3_port_base = s3_port_base
        self.include_gateway = include_gateway
        self.quiet = quiet
        if services is None:
            services = [name for name in SERVICES if (REPO_ROOT / "services" / name / "__main__.py").exists()]
        self.services = list(services)
        self.amqp_url = self.base_env.get("ESD_AMQP_URL", DEFAULT_AMQP_URL)
        self.admin_username = self.base_env.get("ESD_ADMIN_USERNAME", "admin")
        self.mongo_external = self.base_env.get("ESD_MONGO_URL") or self.base_env.get("MONGO_URL")
        self.s3_external = self.base_env.get("ESD_S3_ENDPOINT_URL") or self.base_env.get("S3_ENDPOINT_URL")
        self.processes = {
            name: platform_process(name, self.var_dir)
            for name in [*self.services, *(["gateway"] if include_gateway else [])]
        }
        # keeps them running once started (restarts with backoff): deploy/local/supervisor.py
        self.supervisor = ManagedProcess(
            "supervisor",
            self.var_dir,
            [sys.executable, "-m", "deploy.local.supervisor", "--var-dir", str(self.var_dir), *self.processes],
            marker="deploy.local.supervisor",
        )
        # the attributes below are set by up()
        self.env: dict[str, str] = {}
        self.api_key = ""
        self.admin_password = ""
        self.webhook_secret = ""
        self.mongo_url = ""
        self.s3_endpoint_url = ""
        self.s3_access_key = ""
        self.s3_secret_key = ""

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}"

    @property
    def secrets_file(self) -> Path:
        return self.var_dir / "secrets.env"

    @property
    def rabbitmq_marker(self) -> Path:
        return self.var_dir / "run" / "rabbitmq.started"

    def say(self, message: str) -> None:
        if not self.quiet:
            print(message, flush=True)

    def _mongo(self) -> EmbeddedMongo:
        return EmbeddedMongo(self.var_dir, self.mongo_port, say=self.say)

    def _s3(self) -> EmbeddedS3:
        return EmbeddedS3(
            self.var_dir,
            self.s3_port,
            access_key=self.s3_access_key,
            secret_key=self.s3_secret_key,
            bucket=self.base_env.get("ESD_S3_BUCKET", "esd"),
            port_base=self.s3_port_base,
            say=self.say,
        )

    # --- up -------------------------------------------------------------------------------

    def up(self) -> None:
        """Starts what is not running and waits until everything answers. On failure it stops
        the stack again, so that nothing is left half-started."""
        for folder in ("run", "log"):
            (self.var_dir / folder).mkdir(parents=True, exist_ok=True)
        try:
            self._up()
        except BaseException:
            self.say("start failed: stopping the stack")
            self.down()
            raise

    def _up(self) -> None:
        if ensure_rabbitmq(self.amqp_url, self.var_dir / "log" / "rabbitmq.log", self.say):
            self.rabbitmq_marker.touch()
        self._load_secrets()
        if self.mongo_external:
            self.mongo_url = self.mongo_external
        else:
            mongo = self._mongo()
            mongo.start(self.base_env)
            self.mongo_url = mongo.url
        if self.s3_external:
            self.s3_endpoint_url = self.s3_external
        else:
            s3 = self._s3()
            s3.start(self.base_env)
            self.s3_endpoint_url = s3.endpoint_url
        self.env = self._child_env()
        for name, process in self.processes.items():
            if (pid := process.running_pid()) is not None:
                self.say(f"{name} already runs (pid {pid})")
                continue
            if name == "gateway" and port_open("127.0.0.1", self.gateway_port):
                raise StackError(f"port {self.gateway_port} on 127.0.0.1 is already in use")
            # every process serves its metrics on a port of its own (their pools' workers too)
            self.metrics_target(name).unlink(missing_ok=True)
            pid = process.start({**self.env, "ESD_METRICS_PORT": str(free_port())}, cwd=REPO_ROOT)
            self.say(f"started {name} (pid {pid})")
        asyncio.run(self._wait_healthy(self.services))
        if self.include_gateway:
            wait_until(self._gateway_pings, f"the gateway at {self.gateway_url}", 60, self.processes["gateway"])
        self.supervise()
        self._summary()

    def supervise(self) -> None:
        """Starts the supervisor unless it runs: from now on what stops is started again."""
        if (pid := self.supervisor.running_pid()) is None:
            pid = self.supervisor.start(self.env, cwd=REPO_ROOT)
            self.say(f"started the supervisor (pid {pid})")

    def _load_secrets(self) -> None:
        """Generated once into secrets.env; a value set in the environment wins."""
        stored = _read_env_file(self.secrets_file)

        def value(key: str, new=lambda: secrets.token_hex(16)) -> str:
            return self.base_env.get(key) or stored.get(key) or new()

        values = {
            "ESD_API_KEY": value("ESD_API_KEY"),
            "ESD_ADMIN_PASSWORD": value("ESD_ADMIN_PASSWORD"),
            # Standard Webhooks' secret form: a receiver verifies signatures with it
            "ESD_WEBHOOK_SECRET": value("ESD_WEBHOOK_SECRET", new_webhook_secret),
            "ESD_TOKEN_KEY": value("ESD_TOKEN_KEY", lambda: secrets.token_hex(32)),  # keys the tokens' digests
        }
        if self.s3_external:
            # an outside S3 comes with its own credentials, or none (the default AWS chain)
            self.s3_access_key = self.base_env.get("ESD_S3_ACCESS_KEY", "")
            self.s3_secret_key = self.base_env.get("ESD_S3_SECRET_KEY", "")
        else:
            values["ESD_S3_ACCESS_KEY"] = value("ESD_S3_ACCESS_KEY")
            values["ESD_S3_SECRET_KEY"] = value("ESD_S3_SECRET_KEY")
            self.s3_access_key = values["ESD_S3_ACCESS_KEY"]
            self.s3_secret_key = values["ESD_S3_SECRET_KEY"]
        self.api_key = values["ESD_API_KEY"]
        self.admin_password = values["ESD_ADMIN_PASSWORD"]
        self.webhook_secret = values["ESD_WEBHOOK_SECRET"]
        self.token_key = values["ESD_TOKEN_KEY"]
        merged = {**stored, **values}
        if merged != stored:
            self.secrets_file.parent.mkdir(parents=True, exist_ok=True)
            self.secrets_file.touch(mode=0o600)
            self.secrets_file.chmod(0o600)
            self.secrets_file.write_text("".join(f"{key}={val}\n" for key, val in merged.items()))

    def _child_env(self) -> dict[str, str]:
        env = {
            **self.base_env,
            "ESD_AMQP_URL": self.amqp_url,
            "ESD_MONGO_URL": self.mongo_url,
            "ESD_S3_ENDPOINT_URL": self.s3_endpoint_url,
            "ESD_API_KEY": self.api_key,
            "ESD_ADMIN_USERNAME": self.admin_username,
            "ESD_ADMIN_PASSWORD": self.admin_password,
            "ESD_WEBHOOK_SECRET": self.webhook_secret,
            "ESD_TOKEN_KEY": self.token_key,
            "ESD_GATEWAY_PORT": str(self.gateway_port),
            "ESD_VAR_DIR": str(self.var_dir),
            "ESD_LOG_FORMAT": "json",
            "PYTHONUNBUFFERED": "1",
        }
        if self.s3_access_key:
            env["ESD_S3_ACCESS_KEY"] = self.s3_access_key
            env["ESD_S3_SECRET_KEY"] = self.s3_secret_key
        return env

    async def _wait_healthy(self, services: Sequence[str]) -> None:
        rpc = RpcClient(self.amqp_url, self.env.get("ESD_BROKER_PREFIX", ""), timeout=2)
        try:
            for service in services:
                process = self.processes[service]
                loop = asyncio.get_running_loop()
                deadline = loop.time() + 60
                while True:
                    process.check_started()
                    try:
                        await rpc.call(health_check(service), CheckHealth())
                        break
                    except Exception:
                        if loop.time() >= deadline:
                            raise StackError(
                                f"{service} did not answer its health check within 60 s; see {process.log_file}"
                            ) from None
                        await asyncio.sleep(0.2)
                self.say(f"{service} is healthy")
        finally:
            await rpc.close()

    def _gateway_pings(self) -> bool:
        response = httpx.get(f"{self.gateway_url}/ping", headers={"x-api-key": self.api_key}, timeout=2)
        return response.status_code == 200

    @property
    def metrics_dir(self) -> Path:
        """Where each process says where its metrics are (Prometheus's file_sd format)."""
        return self.var_dir / "metrics"

    def metrics_target(self, process: str) -> Path:
        return self.metrics_dir / f"{process}.json"

    def metrics_urls(self) -> dict[str, str]:
        """The /metrics URL of each process running now (workers included), by process name.
        A process killed with SIGKILL leaves its target behind: one whose port no longer answers
        is left out."""
        urls = {}
        for path in sorted(self.metrics_dir.glob("*.json")):
            try:
                groups = json.loads(path.read_text())
            except (OSError, ValueError):  # being written, or gone
                continue
            for group in groups:
                for target in group["targets"]:
                    host, _, port = target.rpartition(":")
                    if port_open(host, int(port)):
                        urls[group["labels"]["process"]] = f"http://{target}/metrics"
        return urls

    def _summary(self) -> None:
        metrics = "".join(f"    {name:<10} {url}\n" for name, url in self.metrics_urls().items())
        self.say(
            "\nThe ESD platform is up.\n"
            f"  gateway:   {self.gateway_url}\n"
            f"  console:   {self.gateway_url}/console/   (sign in with the API key and a user)\n"
            f"  API key:   {self.api_key}   (send it as the x-api-key header)\n"
            f"  admin:     {self.admin_username} / {self.admin_password}\n"
            f"  logs:      {self.var_dir / 'log'}\n"
            f"  secrets:   {self.secrets_file}\n"
            f"  metrics:   Prometheus targets in {self.metrics_dir}/*.json (file_sd_configs; workers add theirs)\n"
            f"{metrics}"
            "Stop it with `make down`."
        )

    # --- down and status ------------------------------------------------------------------

    def down(self) -> None:
        """Stops what `up()` started (found by pid files); the data stays."""
        # first, or it would start again what is stopped below
        if (pid := self.supervisor.running_pid()) is not None:
            self.say(f"stopping the supervisor (pid {pid})")
            self.supervisor.stop()
        gateway = [process for name, process in self.processes.items() if name == "gateway"]
        services = [process for name, process in self.processes.items() if name != "gateway"]
        for group in (gateway, services):
            for process in group:
                if (pid := process.running_pid()) is not None:
                    self.say(f"stopping {process.name} (pid {pid})")
            stop_all(group, signal.SIGTERM, grace=15)
        if not self.mongo_external:
            mongo = self._mongo()
            if (pid := mongo.process.running_pid()) is not None:
                self.say(f"stopping nx-27017 (pid {pid})")
            mongo.stop()
        if not self.s3_external:
            s3 = self._s3()
            if (pid := s3.process.running_pid()) is not None:
                self.say(f"stopping SeaweedFS (pid {pid})")
            s3.stop()
        if self.rabbitmq_marker.exists():
            stop_rabbitmq(self.amqp_url, self.say)
            self.rabbitmq_marker.unlink()
        for target in self.metrics_dir.glob("*.json"):  # a killed process leaves its own behind
            target.unlink(missing_ok=True)
        self.say("stopped; the data stays under " + str(self.var_dir))

    def status(self) -> dict[str, int | None]:
        """Prints and returns the pid of each of the stack's processes (None: not running)."""
        processes: list[ManagedProcess] = list(self.processes.values())
        if not self.mongo_external:
            processes.insert(0, self._mongo().process)
        if not self.s3_external:
            processes.insert(1, self._s3().process)
        pids = {process.name: process.running_pid() for process in processes}
        watched = supervisor.read_state(self.var_dir)
        for name, pid in pids.items():
            self.say(
                f"  {name:<10} {'running, pid ' + str(pid) if pid else 'stopped'}{_supervision(watched.get(name))}"
            )
        supervising = self.supervisor.running_pid()
        self.say(
            f"  {'supervisor':<10} "
            + (f"running, pid {supervising} (restarts what stops)" if supervising else "stopped: nothing restarts")
        )
        rabbit = "started by `make up`" if self.rabbitmq_marker.exists() else "not started by `make up`"
        host, port = amqp_address(self.amqp_url)
        answers = "answers" if port_open(host, port) else "does not answer"
        self.say(f"  {'rabbitmq':<10} {answers} on {host}:{port} ({rabbit})")
        if pids.get("gateway"):
            self.say(f"gateway: {self.gateway_url}")
        for name, url in self.metrics_urls().items():
            self.say(f"  metrics of {name}: {url}")
        return pids
