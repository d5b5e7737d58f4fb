"""The tests' side of the sandbox: the one API key, a no-faults configuration, and one admin client.

Every test stack, in-process rig and benchmark talks to the sandbox's admin endpoints through
`SandboxAdmin` (GET /_sandbox/stats, GET|POST /_sandbox/config, POST /_sandbox/reset), whether the
sandbox runs under `DevStack` (a URL only) or as a `SandboxProcess` (which has the same calls).
"""

from __future__ import annotations

from types import TracebackType
from typing import Any, Self

import httpx

# One distinctive key for every sandbox the tests start, so a grep of logs or of Redis finds it if
# anything ever writes it down (test_security looks for exactly that).
API_KEY = "test-api-key-5f0c9d2b7a41e386"

# Every fault knob off: a test that injects faults starts from here, whatever the previous test set.
NO_FAULTS: dict[str, Any] = {
    "latency_ms": 0, "error_5xx_rate": 0, "rate_429": 0, "accept_then_timeout_rate": 0, "drop_rate": 0,
    "down": False, "forbidden_keys": [], "request_rate_limit": 0,
}


class SandboxAdmin:
    """The sandbox's admin endpoints over one HTTP client; a context manager that closes it."""

    def __init__(self, url: str, timeout_s: float = 30.0) -> None:
        self.url = url
        # trust_env=False: a developer's HTTP(S)_PROXY must not route loopback calls elsewhere.
        self.http = httpx.Client(base_url=url, timeout=timeout_s, trust_env=False)

    def stats(self, per_message: bool = False) -> dict[str, Any]:
        """GET /_sandbox/stats (with `accepted_per_message_id` when `per_message`)."""
        return self._call("GET", "/_sandbox/stats", params={"per_message": "1"} if per_message else None)

    def configure(self, **knobs: Any) -> dict[str, Any]:
        """POST /_sandbox/config; the configuration that results."""
        return self._call("POST", "/_sandbox/config", json=knobs)

    def config(self) -> dict[str, Any]:
        """GET /_sandbox/config."""
        return self._call("GET", "/_sandbox/config")

    def reset(self) -> None:
        """POST /_sandbox/reset: forget every message, report and counter."""
        self._call("POST", "/_sandbox/reset")

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        response = self.http.request(method, path, **kwargs)
        response.raise_for_status()
        data: dict[str, Any] = response.json()
        return data
