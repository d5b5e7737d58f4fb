"""A whole local system as child processes: private Redis, sandbox, workers, clock, web.

Used by `sms-worker demo`, the end-to-end tests and the benchmarks, so all three run the real
processes exactly as the Procfile does, on free loopback ports, and stop them all afterwards.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO

import redis

from worker.devtools.sandbox.admin import free_port as free_port  # re-exported: the stack's callers pick ports too


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str, interval_s: float = 0.02) -> None:
    """Poll `condition` until true; TimeoutError naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(interval_s)


class Proc:
    """One child process with its output in a log file."""

    def __init__(self, name: str, argv: list[str], env: Mapping[str, str], log_dir: Path) -> None:
        self.name = name
        self.argv = argv
        self.env = dict(env)
        self.log_path = log_dir / f"{name}.log"
        self._log: IO[bytes] | None = None
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> Proc:
        self._log = self.log_path.open("ab")
        self.popen = subprocess.Popen(
            self.argv, env=self.env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def signal(self, sig: int) -> None:
        """SIGKILL the whole process group (dramatiq forks worker processes); other signals go to
        the leader only, as an orchestrator sends them to PID 1: dramatiq forwards SIGTERM to its
        children and treats a second SIGTERM as "kill now"."""
        if self.alive():
            assert self.popen is not None
            with contextlib.suppress(ProcessLookupError):
                if sig == signal.SIGKILL:
                    os.killpg(self.popen.pid, sig)
                else:
                    os.kill(self.popen.pid, sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.wait(10)

    def stop(self, timeout_s: float = 20.0) -> int | None:
        self.signal(signal.SIGTERM)
        code = self.wait(timeout_s)
        if code is None:
            self.kill()
        if self._log:
            self._log.close()
            self._log = None
        return code

    def wait(self, timeout_s: float) -> int | None:
        if self.popen is None:
            return None
        try:
            return self.popen.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class DevStack:
    """Start the pieces one by one; `stop()` (or the context manager) ends them in reverse order."""

    def __init__(self, env: Mapping[str, str] | None = None, log_dir: Path | None = None) -> None:
        self.log_dir = log_dir or Path(tempfile.mkdtemp(prefix="sms-stack-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, **(env or {})}
        self.env.setdefault("LOG_FORMAT", "json")
        self.procs: list[Proc] = []
        self.redis_port: int | None = None
        self.sandbox_port: int | None = None

    def __enter__(self) -> DevStack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def spawn(self, name: str, argv: list[str], extra_env: Mapping[str, str] | None = None) -> Proc:
        """Start `argv` as one more process of the stack, named `name` (its log is `<log_dir>/<name>.log`),
        with the stack's environment plus `extra_env`; `stop()` ends it with the others. The start_*
        methods use it for the Procfile's processes; a caller uses it for a process of its own."""
        proc = Proc(name, argv, {**self.env, **(extra_env or {})}, self.log_dir).start()
        self.procs.append(proc)
        return proc

    # --- pieces ------------------------------------------------------------------------------------
    def start_redis(self, *, appendonly: bool = False, port: int | None = None) -> str:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (Debian: apt-get install redis-server)")
        self.redis_port = port or self.redis_port or free_port()
        data = self.log_dir / "redis-data"
        data.mkdir(exist_ok=True)
        argv = [binary, "--port", str(self.redis_port), "--bind", "127.0.0.1", "--dir", str(data),
                "--save", "", "--daemonize", "no", "--loglevel", "warning"]
        if appendonly:
            argv += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            argv += ["--appendonly", "no"]
            # Deliberately volatile: a throwaway stack (demo, e2e tests, benchmarks) whose data lives in
            # a temporary directory that dies with it. Persistence would only cost speed (the
            # benchmarks measure the worker, not fsync) and protect nothing, so the stack says what an
            # operator would say, SMS_REDIS_ALLOW_VOLATILE=true: `sms-worker check` passes and the
            # processes log the risk as accepted. Crash tests pass appendonly=True instead; a test that
            # wants the check to fail sets the variable to false in the stack's env.
            self.env.setdefault("SMS_REDIS_ALLOW_VOLATILE", "true")
        proc = self.spawn("redis", argv)
        client = redis.Redis(port=self.redis_port, socket_connect_timeout=0.2)

        def ready() -> bool:
            if not proc.alive():
                raise RuntimeError(f"redis-server exited:\n{proc.tail()}")
            try:
                return bool(client.ping())
            except redis.ConnectionError:
                return False

        wait_until(ready, 10, "redis-server to answer")
        client.close()
        url = f"redis://127.0.0.1:{self.redis_port}/0"
        self.env["REDIS_URL"] = url
        return url

    def start_sandbox(self, api_key: str, *flags: str) -> str:
        self.sandbox_port = free_port()
        argv = [sys.executable, "-m", "worker.devtools.sandbox", "--port", str(self.sandbox_port), "--api-key", api_key]
        proc = self.spawn("sandbox", [*argv, *flags])
        url = f"http://127.0.0.1:{self.sandbox_port}"
        self._wait_http(proc, f"{url}/_sandbox/stats", "the sandbox")
        self.env["ICOMM_BASE_URL"] = url
        self.env["ICOMM_API_KEY"] = api_key
        return url

    def start_worker(self, name: str = "worker", *, threads: int = 8, env: Mapping[str, str] | None = None,
                     lanes: str | None = None, skip_lanes: str | None = None) -> Proc:
        argv = [sys.executable, "-m", "worker.cli", "worker", "--processes", "1", "--threads", str(threads)]
        argv += ["--lanes", lanes] if lanes else []
        argv += ["--skip-lanes", skip_lanes] if skip_lanes else []
        return self.spawn(name, argv, env)

    def start_clock(self, name: str = "clock") -> Proc:
        return self.spawn(name, [sys.executable, "-m", "worker.cli", "clock"])

    def start_web(self, port: int, name: str = "web") -> Proc:
        """The web process, once its /readyz answers 200."""
        proc = self.spawn(name, [sys.executable, "-m", "worker.cli", "web", "--port", str(port)])
        self._wait_http(proc, f"http://127.0.0.1:{port}/readyz", "the web process")
        return proc

    def _wait_http(self, proc: Proc, url: str, what: str, timeout_s: float = 15) -> None:
        import httpx

        def ready() -> bool:
            if not proc.alive():
                raise RuntimeError(f"{what} exited:\n{proc.tail()}")
            try:
                return httpx.get(url, timeout=0.5).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, timeout_s, f"{what} to answer")

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
        self.procs.clear()

    def logs(self) -> str:
        return "\n".join(f"--- {p.name} ---\n{p.tail()}" for p in self.procs)
