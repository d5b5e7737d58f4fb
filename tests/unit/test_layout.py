"""The layout's rules, checked: which parts of the code may load, or touch, which other parts."""

from __future__ import annotations

import json
import subprocess
import sys

# What the worker, clock and web processes (and the CLI that starts them) import first.
PRODUCT_MODULES = ("worker.broker", "worker.actors", "worker.web", "worker.runtime", "worker.cli")

# Imports each module named on the command line in turn, then prints, per module, the
# worker.devtools modules loaded by the time it was imported.
_PROBE = """
import importlib, json, sys
seen = {}
for name in sys.argv[1:]:
    importlib.import_module(name)
    seen[name] = sorted(m for m in sys.modules if m == "worker.devtools" or m.startswith("worker.devtools."))
print(json.dumps(seen))
"""


def test_product_runtime_never_imports_dev_tools() -> None:
    """The sandbox, the development stack and the demo are dev tools: importing the product's
    modules loads none of them (a fresh interpreter, so no other test's imports count)."""
    done = subprocess.run([sys.executable, "-c", _PROBE, *PRODUCT_MODULES], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.splitlines()[-1])
    assert seen == {name: [] for name in PRODUCT_MODULES}, f"dev tools loaded by the product's imports: {seen}"
