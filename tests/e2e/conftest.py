"""A whole stack, started by the same code as `make up`, on free ports under a temp folder."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import boto3
import httpx
import pytest
from botocore.config import Config

from deploy.local.stack import LocalStack, free_port


def make_stack(var_dir, **env: str) -> LocalStack:
    return LocalStack(
        var_dir,
        gateway_port=free_port(),
        mongo_port=free_port(),
        s3_port=free_port(),
        env={
            "ESD_BROKER_PREFIX": f"e2e-{uuid.uuid4().hex[:8]}.",
            # the tests serve model files from a local HTTP server
            "ESD_CHECKPOINT_ALLOW_PRIVATE_URLS": "true",
            "ESD_WEBHOOK_ALLOW_PRIVATE_URLS": "true",
            # a failing webhook is given up (dead-lettered) after a few seconds of retries
            "ESD_WEBHOOK_RETRY_FOR": "4",
            # idle autoscaled pools give their workers back quickly, so tests see scale to zero
            "ESD_POOL_SCALE_DOWN_AFTER": "3",
            **env,
        },
        quiet=True,
    )


@pytest.fixture(scope="session", autouse=True)
def _needs_rabbitmq(rabbitmq) -> None:
    """Every test here talks to the real broker."""


@pytest.fixture(scope="session")
def stack(tmp_path_factory) -> Iterator[LocalStack]:
    running = make_stack(tmp_path_factory.mktemp("stack"))
    running.up()
    yield running
    running.down()


class Api:
    """An ESD client: the key always, the acting user when given."""

    def __init__(self, stack: LocalStack) -> None:
        self.http = httpx.Client(base_url=stack.gateway_url, timeout=30)
        self.key = stack.api_key

    def __call__(self, method: str, path: str, *, user: str | None = "admin", json=None, **kwargs) -> httpx.Response:
        headers = {"x-api-key": self.key, **kwargs.pop("headers", {})}
        if user is not None:
            headers["username"] = user
        return self.http.request(method, path, headers=headers, json=json, **kwargs)


@pytest.fixture(scope="session")
def api(stack) -> Api:
    return Api(stack)


@pytest.fixture(scope="session")
def storage(stack):
    """Direct access to the stack's object storage, to check what landed there."""
    return boto3.client(
        "s3",
        endpoint_url=stack.s3_endpoint_url,
        aws_access_key_id=stack.s3_access_key,
        aws_secret_access_key=stack.s3_secret_key,
        region_name="us-east-1",
        config=Config(signature_version="s3v4", s3={"addressing_style": "path"}),
    )
