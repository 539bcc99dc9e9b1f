"""`python -m deploy.local up|down|status|rabbitmq`: the local stack from the command line.

`rabbitmq` only makes sure RabbitMQ runs (installing and starting it when local and missing),
for `make test`, whose tests start their own servers but need the broker.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from deploy.local import first_image
from deploy.local.process import StackError
from deploy.local.servers import ensure_rabbitmq
from deploy.local.stack import DEFAULT_AMQP_URL, LocalStack


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.local", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["up", "down", "status", "rabbitmq"])
    parser.add_argument(
        "--var-dir",
        type=Path,
        default=Path(os.environ.get("ESD_VAR_DIR", "var")),
        help="where data, logs, pid files and secrets live (default: ./var)",
    )
    parser.add_argument("--no-image", action="store_true", help="with up: skip generating the first image")
    args = parser.parse_args(argv)
    try:
        if args.command == "rabbitmq":
            amqp_url = os.environ.get("ESD_AMQP_URL", DEFAULT_AMQP_URL)
            ensure_rabbitmq(amqp_url, args.var_dir / "log" / "rabbitmq.log")
            return 0
        stack = LocalStack(args.var_dir)
        if args.command == "up":
            stack.up()
            if not args.no_image:
                path = first_image.generate(
                    stack.gateway_url, stack.api_key, stack.admin_username, stack.var_dir, Path("out")
                )
                print(f"\nGenerated an image through the API: {path}")
        elif args.command == "down":
            stack.down()
        else:
            stack.status()
    except (StackError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
