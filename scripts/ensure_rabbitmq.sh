#!/usr/bin/env bash
# Makes sure RabbitMQ runs for the tests: installs and starts it when local and missing, with
# the same code as `make up` (deploy/local).
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m deploy.local rabbitmq
