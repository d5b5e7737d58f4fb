"""What the commands share: the settings main() loaded, the Store and Triggers they connect, JSON
output and the operator's confirmation."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import orjson

from worker.errors import SmsWorkerError
from worker.settings import Settings, load_settings

if TYPE_CHECKING:  # imported by the commands that connect: `--help` and the sandbox need neither
    from worker.store import Store
    from worker.triggers import Triggers


# The settings main() loaded (and configured logging from) for the running command.
loaded: Settings | None = None


def settings() -> Settings:
    return loaded if loaded is not None else load_settings()


def store(settings: Settings) -> Store:
    from worker.producer import connect_store

    return connect_store(settings)


def triggers(settings: Settings, store: Store) -> Triggers:
    from worker.producer import connect_triggers

    return connect_triggers(settings, store)


def print_json(value: Any) -> None:
    sys.stdout.write(orjson.dumps(value, option=orjson.OPT_INDENT_2, default=str).decode() + "\n")


def confirm(question: str, yes: bool, refusal: str) -> bool:
    """--yes, or a person at a terminal answering y; with neither, refuse (SmsWorkerError)."""
    if yes:
        return True
    if not sys.stdin.isatty():
        raise SmsWorkerError(f"{refusal}: give --yes (stdin is not a terminal, so there is no one to ask)")
    sys.stdout.write(f"{question} [y/N] ")
    sys.stdout.flush()
    return sys.stdin.readline().strip().lower() in ("y", "yes")
