"""Entry points: build the sandbox ASGI app and serve it with uvicorn (uvloop + httptools) on loopback."""

from __future__ import annotations

import ipaddress
import logging
import os

import uvicorn

from worker.devtools.sandbox.app import ASGIApp, SandboxApp
from worker.devtools.sandbox.config import SandboxConfig
from worker.devtools.sandbox.process import SandboxProcess

__all__ = ["ASGIApp", "SandboxApp", "SandboxProcess", "build_app", "run"]

# The drop fault ends a response early on purpose; uvicorn reports that as an error each time.
_DELIBERATE_DROP = "ASGI callable returned without completing response."


class _HideDeliberateDrops(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != _DELIBERATE_DROP


def _require_loopback(host: str) -> None:
    # The admin endpoints have no auth, so the sandbox must never listen beyond this machine.
    if host == "localhost":
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(f"the sandbox only binds loopback addresses, not {host!r}")


def _configure_logging(api_key: str) -> None:
    """The sandbox's own warnings (failed webhook pushes, dropped reports) as the worker's structured
    lines: JSON unless LOG_FORMAT=console, phone numbers masked and the API key redacted."""
    from worker.logs import configure

    fmt = "console" if os.environ.get("LOG_FORMAT", "").strip().lower() == "console" else "json"
    configure(fmt=fmt, level="WARNING", secrets=[api_key])


def build_app(api_key: str, config: SandboxConfig | None = None) -> ASGIApp:
    """The sandbox as an ASGI app accepting `Authorization: App <api_key>`."""
    if not api_key:
        raise ValueError("api_key must not be empty")
    return SandboxApp(api_key, config or SandboxConfig())


def run(
    port: int, api_key: str, host: str = "127.0.0.1", config: SandboxConfig | None = None, *,
    allow_remote: bool = False,
) -> None:
    """Serve the sandbox until SIGINT/SIGTERM; a non-loopback host needs `allow_remote` (a container
    network with no published port, as in deploy/compose.yaml)."""
    if not allow_remote:
        _require_loopback(host)
    if not api_key:
        raise ValueError("api_key must not be empty")
    _configure_logging(api_key)
    server_config = uvicorn.Config(
        SandboxApp(api_key, config or SandboxConfig(), manage_gc=True),
        host=host,
        port=port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        access_log=False,
        log_level="warning",
        # The timeout fault holds responses for up to timeout_delay_ms; do not wait for them on exit.
        timeout_graceful_shutdown=1,
        # Longer than httpx's 5 s keepalive_expiry, so a client always drops an idle connection before
        # the sandbox does: with both at 5 s, a request written on a connection the server is closing
        # that instant is reset (seen in CI as ECONNRESET on an admin GET; on a POST it is ambiguous).
        timeout_keep_alive=30,
    )
    logging.getLogger("uvicorn.error").addFilter(_HideDeliberateDrops())
    uvicorn.Server(server_config).run()
