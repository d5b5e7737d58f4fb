"""`python -m worker.devtools.sandbox`: run the local icomm SMS API sandbox."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from worker.devtools.sandbox.config import add_arguments, config_from_args
from worker.devtools.sandbox.server import run

__all__ = ["add_arguments", "build_parser", "config_from_args", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The sandbox command line: where to listen, the API key, and one flag per knob."""
    parser = argparse.ArgumentParser(
        prog="python -m worker.devtools.sandbox", description="Local icomm SMS API sandbox (loopback only)."
    )
    parser.add_argument("--port", type=int, default=8089, help="TCP port (default 8089)")
    parser.add_argument("--api-key", required=True, help="the key accepted in 'Authorization: App <key>'")
    parser.add_argument("--host", default="127.0.0.1", help="loopback address to bind (default 127.0.0.1)")
    add_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse flags and serve until interrupted."""
    parser = build_parser()
    namespace = parser.parse_args(argv)
    try:
        config = config_from_args(namespace)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        run(namespace.port, namespace.api_key, namespace.host, config)
    except ValueError as exc:
        parser.error(str(exc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
