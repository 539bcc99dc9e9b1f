"""Integration tests: each service over the real RabbitMQ, MongoDB wire server and S3."""

import pytest


@pytest.fixture(scope="session", autouse=True)
def _needs_rabbitmq(rabbitmq) -> None:
    """Every test here talks to the real broker."""
