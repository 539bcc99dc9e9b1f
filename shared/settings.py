"""Settings for every process, from environment variables with the one prefix `ESD_`.

`MONGO_URL` and `S3_ENDPOINT_URL` are also read without the prefix, as the deployment docs
name them. Production swaps servers through these settings alone.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

API_VERSION = "1.5.0"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ESD_", extra="ignore")

    # credentials of the deployment
    api_key: SecretStr = SecretStr("")
    admin_username: str = "admin"
    admin_password: SecretStr = SecretStr("")

    # who a request acts as: `esd` (the `username` header beside the API key, as ESD does) or
    # `token` (a user's bearer token from `POST /tokens` on every route but /ping; the mode for
    # key holders who are not all trusted). Tokens live `token_ttl` seconds and are stored as
    # HMAC-SHA256 digests keyed with `token_key` (any secret; empty still hashes).
    auth_mode: Literal["esd", "token"] = "esd"
    token_ttl: float = 12 * 3600.0
    token_key: SecretStr = SecretStr("")
    # failed password checks allowed per user and per client address within a window (seconds)
    # before `POST /tokens` answers 429 for that user or address
    sign_in_failures_per_user: int = 5
    sign_in_failures_per_address: int = 20
    sign_in_window: float = 300.0

    # RabbitMQ; `broker_prefix` namespaces every exchange and queue, so that several
    # deployments (or a test run beside a running stack) can share one broker.
    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/"
    broker_prefix: str = ""
    rpc_timeout: float = 10.0

    # MongoDB: one database per service, named `<mongo_db_prefix><service>`
    mongo_url: str = Field(
        "mongodb://127.0.0.1:27017",
        validation_alias=AliasChoices("ESD_MONGO_URL", "MONGO_URL"),
    )
    mongo_db_prefix: str = "esd_"

    # S3
    s3_endpoint_url: str | None = Field(None, validation_alias=AliasChoices("ESD_S3_ENDPOINT_URL", "S3_ENDPOINT_URL"))
    s3_access_key: SecretStr = SecretStr("")
    s3_secret_key: SecretStr = SecretStr("")
    s3_region: str = "us-east-1"
    s3_bucket: str = "esd"

    # gateway
    gateway_host: str = "127.0.0.1"
    gateway_port: int = 8080
    max_body_bytes: int = 1024 * 1024

    # limits on what users send (README, "Limits"): JSON nesting anywhere (bodies,
    # `payload_string`, `api_param.json`), the size of `api_param.json` (checked before a
    # worker downloads it), the characters of a prompt, the pixels of an image a job decodes
    # (checked from its header, before it is decoded), the bytes of a checkpoint by URL
    max_json_depth: int = 64
    max_payload_bytes: int = 32 * 1024 * 1024
    max_prompt_chars: int = 20_000
    max_image_pixels: int = 25_000_000

    # logging: `auto` is readable on a terminal and JSON elsewhere
    log_format: str = "auto"
    log_level: str = "INFO"

    # checkpoint downloads by URL: internal addresses are refused unless this allows them
    checkpoint_allow_private_urls: bool = False
    checkpoint_download_part_mb: int = 16
    checkpoint_download_timeout: float = 60.0
    checkpoint_max_bytes: int = 32 * 1024**3

    # inference: endpoints whose first worker is not ready in time turn Failed; idle
    # autoscaled pools give workers back after this long; Real-time calls wait this long
    endpoint_start_timeout: float = 180.0
    pool_scale_down_after: float = 60.0
    realtime_timeout: float = 300.0
    worker_device: str = "auto"  # auto | cpu | cuda
    worker_heartbeat_seconds: float = 2.0
    # torch's CPU threads per worker (0: torch's choice); the local pools set it per worker to
    # the host's cores divided among its workers
    worker_threads: int = 0
    # a local pool's worker: the pid of the service that started it. The worker drains and exits
    # once that process is gone, so a killed service leaves no worker consuming outside any pool
    worker_parent_pid: int | None = None
    # inference workers this host runs at most, all local pools together (0: none, a host that
    # runs only the services)
    local_max_workers: int = 8
    # extras: model upscalers run in tiles of this many input pixels a side (0: the whole image
    # at once), overlapping by this many pixels and blended, so large images fit in memory
    upscaler_tile_size: int = 256
    upscaler_tile_overlap: int = 32
    # rembg: a folder of the rembg family's ONNX files (`u2net.onnx`, `isnet-general-use.onnx`)
    # that jobs may use besides their `rembg` checkpoints; nothing is ever downloaded
    rembg_models_dir: Path | None = None

    # an Idempotency-Key of a creating POST is remembered this long (seconds)
    idempotency_key_ttl: float = 86400.0

    # webhooks: signed with this secret (Standard Webhooks: "whsec_" and base64), retried with
    # growing pauses for this long, then dead-lettered; internal addresses refused unless allowed
    webhook_secret: SecretStr = SecretStr("")
    webhook_retry_for: float = 3600.0
    webhook_timeout: float = 10.0
    webhook_allow_private_urls: bool = False

    # training: worker processes this host runs (each trains one LoRA at a time)
    training_workers: int = 1

    # where workers run: `local` (processes on this host), `swarm` (a Docker service per
    # endpoint) or `kubernetes` (a Deployment and a KEDA ScaledObject per endpoint)
    pool_backend: Literal["local", "swarm", "kubernetes"] = "local"
    # instance types with their placement and quota (JSON; see shared/instance_types.py);
    # empty: the one type `local`
    instance_types: str = ""
    instance_types_file: Path | None = None
    # the image swarm and Kubernetes workers run, and how their objects are named
    worker_image: str = "esd-platform:latest"
    pool_name_prefix: str = "esd-"
    # swarm: the network workers join (an overlay of the stack, or `host`)
    swarm_network: str = ""
    # Kubernetes: the namespace of the pools (empty: the inference service's own), and the KEDA
    # TriggerAuthentication holding RabbitMQ's management URL
    kubernetes_namespace: str = ""
    keda_rabbitmq_auth: str = "esd-rabbitmq-management"
    # one inference-service replica at a time runs the autoscaler: it holds a lease in MongoDB,
    # renewed every second; another replica takes over once it lapses
    leader_lease_seconds: float = 6.0
    # Prometheus metrics: the port this process serves `/metrics` on. Unset: none; 0: any free
    # port (said in the process's log and in `<var>/metrics/<process>.json`, Prometheus's
    # file-based discovery format), as the local pools give their workers.
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"

    var_dir: Path = Path("var")

    @field_validator("metrics_port", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if value == "" else value  # `ESD_METRICS_PORT=` turns metrics off

    def database_name(self, service: str) -> str:
        return f"{self.mongo_db_prefix}{service}"


@lru_cache
def get_settings() -> Settings:
    return Settings()
