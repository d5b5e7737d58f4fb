"""The sandbox's admin endpoints as a client: stats, configuration, reset.

One client for every caller: `SandboxProcess` (a sandbox it started), the tests' stacks and the
benchmarks (a sandbox at a URL).
"""

from __future__ import annotations

import socket
from types import TracebackType
from typing import Any, Self

import httpx


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on loopback a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


class SandboxError(RuntimeError):
    """The sandbox process did not start, or an admin call failed."""


class SandboxAdmin:
    """GET /_sandbox/stats, GET|POST /_sandbox/config, POST /_sandbox/reset over one HTTP client;
    a context manager that closes it."""

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
        if response.status_code != 200:
            raise SandboxError(f"{method} {path} -> {response.status_code}: {response.text}")
        data: dict[str, Any] = response.json()
        return data
