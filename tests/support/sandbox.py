"""The tests' side of the sandbox: the one API key, a no-faults configuration, the admin client.

Every test stack, in-process rig and benchmark talks to the sandbox's admin endpoints through
`SandboxAdmin` (GET /_sandbox/stats, GET|POST /_sandbox/config, POST /_sandbox/reset), whether the
sandbox runs under `DevStack` (a URL only) or as a `SandboxProcess` (which has the same calls).
"""

from __future__ import annotations

from typing import Any

from worker.devtools.sandbox.admin import SandboxAdmin

__all__ = ["API_KEY", "NO_FAULTS", "SandboxAdmin"]

# One distinctive key for every sandbox the tests start, so a grep of logs or of Redis finds it if
# anything ever writes it down (test_security looks for exactly that).
API_KEY = "test-api-key-5f0c9d2b7a41e386"

# Every fault knob off: a test that injects faults starts from here, whatever the previous test set.
NO_FAULTS: dict[str, Any] = {
    "latency_ms": 0, "error_5xx_rate": 0, "rate_429": 0, "accept_then_timeout_rate": 0, "drop_rate": 0,
    "down": False, "forbidden_keys": [], "request_rate_limit": 0,
}
