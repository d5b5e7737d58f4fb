"""Only the store package talks to Redis: no other product module imports redis-py or hiredis,
reaches for a client (`store.r`), pipelines or scripts by hand, or builds a key name.

Dev tools (worker/devtools) are outside the product and may do as they like; Dramatiq's own
RedisBroker (the task queue, not our data) is built in runtime.py through `dramatiq.brokers.redis`.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

WORKER = Path(__file__).resolve().parents[2] / "worker"
EXEMPT = ("store", "devtools")
CLIENT_ATTRIBUTES = {"r", "connection_pool", "pipeline", "execute_command", "register_script", "evalsha"}
# What a key name built by hand looks like: a namespace part between colons in an f-string.
KEY_PARTS = re.compile(r":(outbox|msg|idem|events|dlq|awaiting|rl|dispatchers|kick|pause|fence|lease|reports|"
                       r"heartbeats|instance|suppressed|campaign|campaigns|policy)(:|$)")


def violations(source: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [f"line {node.lineno}: import {a.name}" for a in node.names
                      if a.name.split(".")[0] in ("redis", "hiredis")]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ("redis", "hiredis"):
            found.append(f"line {node.lineno}: from {node.module} import ...")
        elif isinstance(node, ast.Attribute) and node.attr in CLIENT_ATTRIBUTES:
            found.append(f"line {node.lineno}: .{node.attr}")
        elif isinstance(node, ast.JoinedStr):
            text = "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
            if KEY_PARTS.search(text):
                found.append(f"line {node.lineno}: key name built by hand: {text!r}")
    return found


def product_modules() -> list[Path]:
    return sorted(p for p in WORKER.rglob("*.py") if p.relative_to(WORKER).parts[0] not in EXEMPT)


def test_the_checker_sees_each_kind_of_violation() -> None:
    sample = (
        "import redis\nfrom hiredis import Reader\nstore.r.xlen('x')\npipe = client.pipeline()\n"
        "key = f'{prefix}:reports:raw'\nstore.run('settle', [], [])\n"
    )
    assert len(violations(sample)) == 5  # store.run is the store's own API: allowed
    assert violations("from dramatiq.brokers.redis import RedisBroker\nstore.reports_raw\n") == []


@pytest.mark.parametrize("path", product_modules(), ids=lambda p: str(p.relative_to(WORKER)))
def test_no_raw_redis_outside_the_store(path: Path) -> None:
    assert violations(path.read_text()) == [], f"{path.relative_to(WORKER.parent)} talks to Redis itself"
