"""SandboxProcess: the sandbox as a child process on a free loopback port, for tests and benchmarks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from types import TracebackType
from typing import IO, Any, Self

import httpx

from worker.devtools.sandbox.admin import SandboxAdmin, SandboxError, free_port
from worker.devtools.sandbox.config import SandboxConfig, config_to_args

_HOST = "127.0.0.1"


class SandboxProcess:
    """Runs `python -m worker.devtools.sandbox` on a free loopback port; a context manager.

    >>> with SandboxProcess(api_key="k", config=SandboxConfig(report_delay_ms=50)) as sandbox:
    ...     sandbox.configure(rate_429=0.5)
    ...     sandbox.stats()["messages_accepted"]
    """

    def __init__(
        self,
        api_key: str = "sandbox-key",
        config: SandboxConfig | None = None,
        extra_args: Sequence[str] = (),
        port: int | None = None,
        startup_timeout_s: float = 20.0,
        stop_timeout_s: float = 5.0,
    ) -> None:
        self.api_key = api_key
        self._config = config or SandboxConfig()
        self._extra_args = list(extra_args)
        self._requested_port = port
        self._startup_timeout_s = startup_timeout_s
        self._stop_timeout_s = stop_timeout_s
        self._proc: subprocess.Popen[bytes] | None = None
        self._output: IO[bytes] | None = None
        self._admin: SandboxAdmin | None = None
        self.port = 0

    @property
    def url(self) -> str:
        """Base URL, e.g. http://127.0.0.1:43121."""
        return f"http://{_HOST}:{self.port}"

    @property
    def pid(self) -> int | None:
        """The child's process id while it runs."""
        return self._proc.pid if self._proc is not None else None

    @property
    def auth_header(self) -> dict[str, str]:
        """The Authorization header the sandbox accepts."""
        return {"Authorization": f"App {self.api_key}"}

    # --- lifecycle -------------------------------------------------------------------------

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Start the process and wait until its admin endpoint answers (a few tries on a port race)."""
        attempts = 1 if self._requested_port else 3
        for attempt in range(attempts):
            self.port = self._requested_port or free_port()
            if self._spawn_and_wait():
                return
            output = self._read_output()
            self.stop()
            # Someone took the free port between our probe and the child's bind: try another one.
            if "address already in use" not in output.lower() or attempt == attempts - 1:
                raise SandboxError(f"sandbox did not start on port {self.port}:\n{output[-4000:]}")

    def _spawn_and_wait(self) -> bool:
        argv = [
            sys.executable,
            "-m",
            "worker.devtools.sandbox",
            "--host",
            _HOST,
            "--port",
            str(self.port),
            "--api-key",
            self.api_key,
            *config_to_args(self._config),
            *self._extra_args,
        ]
        self._output = tempfile.TemporaryFile()  # noqa: SIM115 -- lives as long as the child; closed in stop()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self._proc = subprocess.Popen(argv, stdout=self._output, stderr=subprocess.STDOUT, env=env)
        self._admin = SandboxAdmin(self.url, timeout_s=5.0)
        deadline = time.monotonic() + self._startup_timeout_s
        pause = 0.01
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                return False
            try:
                if self._admin.http.get("/_sandbox/stats", timeout=1.0).status_code == 200:
                    return True
            except httpx.TransportError:
                pass
            time.sleep(pause)  # polling interval while the child boots, not a fixed wait
            pause = min(pause * 2, 0.2)
        return False

    def _read_output(self) -> str:
        if self._output is None:
            return ""
        self._output.seek(0)
        return self._output.read().decode(errors="replace")

    def output(self) -> str:
        """Everything the process printed so far."""
        return self._read_output()

    def stop(self) -> None:
        """SIGTERM, wait, then SIGKILL if it lingers."""
        if self._admin is not None:
            self._admin.close()
            self._admin = None
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=self._stop_timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=self._stop_timeout_s)
        if self._output is not None:
            self._output.close()
            self._output = None

    # --- admin calls (worker.devtools.sandbox.admin) -------------------------------------------------

    def admin(self) -> SandboxAdmin:
        """The admin client of the running sandbox."""
        if self._admin is None:
            raise SandboxError("sandbox is not running")
        return self._admin

    def stats(self, per_message: bool = False) -> dict[str, Any]:
        return self.admin().stats(per_message)

    def configure(self, **knobs: Any) -> dict[str, Any]:
        return self.admin().configure(**knobs)

    def config(self) -> dict[str, Any]:
        return self.admin().config()

    def reset(self) -> None:
        self.admin().reset()
