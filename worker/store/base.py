"""The connection to Redis and the Lua scripts of worker/lua: what every part of the store shares."""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from importlib import resources
from typing import Any

import redis
from redis.commands.core import Script

from worker.store import resp
from worker.store.keys import Keys

# Messages per script call: a 1000-message settle in one call held Redis for 20-100 ms, and every
# otp send waited behind it; 100 keeps each call near 2 ms.
SCRIPT_CHUNK = 100


def connect(url: str, **kwargs: Any) -> redis.Redis:
    """One client (and its connection pool) per process, created at boot."""
    return redis.Redis.from_url(
        url,
        socket_connect_timeout=5,
        socket_timeout=30,
        health_check_interval=30,
        retry_on_timeout=False,
        **kwargs,
    )


def consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def is_nogroup(error: BaseException | None) -> bool:
    """Redis's answer for a stream or consumer group that does not exist (any more)."""
    return isinstance(error, redis.ResponseError) and str(error).startswith("NOGROUP")


def load_script(name: str) -> str:
    """The source of worker/lua/<name>.lua, with each `--#include <lib>` line replaced by
    worker/lua/lib/<lib>.lua (Redis scripts cannot load one another: the ledger every state change
    writes is one file included where it is used)."""
    lua = resources.files("worker") / "lua"
    lines = []
    for line in (lua / f"{name}.lua").read_text().splitlines(keepends=True):
        if line.startswith("--#include "):
            line = (lua / "lib" / f"{line.split()[1]}.lua").read_text()
        lines.append(line)
    return "".join(lines)


class StoreBase(Keys):
    """One Redis database: its client, key names and scripts."""

    def __init__(self, client: redis.Redis, prefix: str = "sms", message_id_prefix: str = "sw") -> None:
        super().__init__(prefix, message_id_prefix)
        # redis-py types replies as unions of str/bytes/None/awaitables; this client always
        # answers bytes (decode_responses off), so its replies are treated as untyped here.
        self.r: Any = client
        self._scripts: dict[str, Script] = {}

    def script(self, name: str) -> Script:
        script = self._scripts.get(name)
        if script is None:
            script = self._scripts[name] = self.r.register_script(load_script(name))
        return script

    def run(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """EVALSHA a script from worker/lua (loaded on first use, and again after a Redis restart)."""
        return self.run_many(name, [(keys, args)])[0]

    def run_many(self, name: str, calls: Sequence[tuple[Sequence[str], Sequence[Any]]]) -> list[Any]:
        """Several calls of one script in one round trip. Redis runs each call atomically but may
        serve other clients between them, so a big batch cut into calls does not stall an otp send."""
        script = self.script(name)
        commands = [(b"EVALSHA", script.sha, len(keys), *keys, *args) for keys, args in calls]
        replies = self.send_calls(commands)
        missing = [i for i, reply in enumerate(replies) if resp.is_noscript(reply)]
        if missing:
            # Redis forgot its scripts (a restart, SCRIPT FLUSH): the calls that answered NOSCRIPT did
            # not run, but the others did (another client may load the script between two of our
            # calls), so only the refused ones are sent again. Sending all again ran the others twice:
            # a submit chunk found its own messages SUBMITTING, waited out their send window and
            # reconciled them (seen as 900 of a fresh Redis's first 1,000 SMS delayed 3.5 minutes).
            with resp.redis_errors():
                self.r.script_load(script.script)
            for i, reply in zip(missing, self.send_calls([commands[i] for i in missing]), strict=True):
                replies[i] = reply
        return resp.check(replies)

    def send_calls(self, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        """Script calls in one round trip, each reply in its place (an error reply as a value)."""
        return resp.pipeline(self.r, commands, checked=False)

    def pipeline(self, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        """Many commands in one round trip (the hand-packed path, see resp.py)."""
        return resp.pipeline(self.r, commands)

    def ping(self) -> None:
        with resp.redis_errors():
            self.r.ping()

    def close(self) -> None:
        self.r.close()
