"""The producer client is light: importing it, and building and using one, loads nothing a producer does not need."""

from __future__ import annotations

import json
import subprocess
import sys

# What a producer service must never load by using the client: the worker's actors, its dispatcher,
# provider client and composition root, the metrics and web stack, the dev tools.
HEAVY = ("worker.actors", "worker.broker", "worker.runtime", "worker.dispatch", "worker.provider", "worker.reports",
         "worker.metrics", "worker.web", "worker.devtools", "worker.cli", "starlette", "uvicorn", "httpx",
         "prometheus_client", "rich")

# Imports the client, then builds both flavours (nothing connects until a call), and prints which
# of the modules named on the command line are loaded.
_PROBE = """
import asyncio, json, sys
from worker.client import AsyncClient, Client
EXTRA
after_import = sorted(m for m in sys.modules if any(m == h or m.startswith(h + ".") for h in sys.argv[1:]))
sync = Client("redis://127.0.0.1:9/0")
sync.close()
async def build():
    client = AsyncClient("redis://127.0.0.1:9/0")
    await client.close()
asyncio.run(build())
after_build = sorted(m for m in sys.modules if any(m == h or m.startswith(h + ".") for h in sys.argv[1:]))
print(json.dumps({"import": after_import, "build": after_build}))
"""


def _probe(extra: str = "") -> dict[str, list[str]]:
    done = subprocess.run([sys.executable, "-c", _PROBE.replace("EXTRA", extra), *HEAVY], capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    seen: dict[str, list[str]] = json.loads(done.stdout.splitlines()[-1])
    return seen


def test_the_client_loads_no_worker_machinery() -> None:
    """A fresh interpreter, so no other test's imports count."""
    seen = _probe()
    assert seen == {"import": [], "build": []}, f"the client loaded worker machinery: {seen}"


def test_the_probe_sees_a_heavy_import() -> None:
    """The probe itself works: a module that pulls in the runtime shows up."""
    seen = _probe("import worker.runtime")
    assert "worker.runtime" in seen["import"] and "httpx" in seen["build"]
