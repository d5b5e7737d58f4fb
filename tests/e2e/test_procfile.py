"""The Procfile as an operator runs it: `honcho -f Procfile start` sends SMS, serves /healthz, stops on SIGTERM."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import httpx
import orjson

from tests.support.sandbox import API_KEY, SandboxAdmin
from tests.support.system import BASE_ENV
from worker.devtools.devstack import DevStack, free_port, wait_until
from worker.producer import producer
from worker.settings import settings_from_env
from worker.store import DISPATCH_GROUP

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent  # where `sms-worker` and `honcho` are installed
JOBS = 200
# The e2e tests' short timeouts. The shutdown timeout stays below honcho's own 5 s between the
# first child exiting and SIGKILL for the rest, so a clean stop is observable.
ENV = {**BASE_ENV, "SMS_SHUTDOWN_TIMEOUT_S": "4"}


@contextmanager
def honcho(env: dict[str, str], log: IO[bytes], procfile: str = "Procfile",
           env_files: list[str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """`honcho -f <procfile> -e <env files> start` from the repository root in its own session; killed if
    a test leaves it running. Without `env_files`, an empty one: not the developer's .env, only what
    the test passes in `env`."""
    if env_files is None:
        empty_env_file = Path(log.name).with_name("empty.env")
        empty_env_file.write_text("")
        env_files = [str(empty_env_file)]
    proc = subprocess.Popen(
        [str(VENV_BIN / "honcho"), "-f", procfile, "-e", ",".join(env_files), "--no-colour", "start"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            # honcho starts each Procfile line in a session of its own: kill them one by one.
            _kill(_descendants(proc.pid))
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def _kill(pids: set[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _accepted(client: Any, events_key: str) -> int:
    return sum(1 for _, fields in client.xrange(events_key) if orjson.loads(fields[b"event"])["type"] == "accepted")


def _descendants(pid: int) -> set[int]:
    """Every process below `pid` (Linux /proc): honcho runs each Procfile line as `sh -c`, so the
    shell it watches is not the process doing the work, and the work may outlive the shell."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry.name))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _pending(client: Any, stream: str) -> int:
    if not client.exists(stream):
        return 0
    return int(client.xpending(stream, DISPATCH_GROUP)["pending"])


def test_procfile_runs_under_honcho_and_stops_cleanly_on_sigterm() -> None:
    """Under honcho the clock-triggered workers send 200 SMS, web answers /healthz, SIGTERM stops all in 30 s."""
    with DevStack(env=ENV) as stack:
        stack.start_redis()
        stack.start_sandbox(API_KEY, "--report-delay-ms", "600000", "--seed", "5")
        web_port = free_port()
        env = {
            **stack.env,
            "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "PORT": str(web_port),
            "WORKER_PROCESSES": "1",
        }
        settings = settings_from_env(env)
        # No wake-up: only the clock's dispatch tick can start these sends, so all three Procfile
        # processes have to work for the test to pass.
        wired = producer(settings, wake=False)
        store, outbox = wired.store, wired.outbox
        client = store.r  # to assert on the streams
        log_path = stack.log_dir / "honcho.log"
        processes: set[int] = set()
        try:
            with log_path.open("wb") as log, honcho(env, log) as proc:
                queued = outbox.enqueue_many(
                    [{"to": f"4179{i:07d}", "text": f"procfile {i}"} for i in range(JOBS)], "bulk"
                )
                assert all(r.queued for r in queued)
                healthz = f"http://127.0.0.1:{web_port}/healthz"
                wait_until(lambda: _accepted(client, store.events) >= JOBS, 60, f"{JOBS} accepted events",
                           interval_s=0.2)
                wait_until(lambda: _healthy(healthz), 30, "the web process's /healthz", interval_s=0.2)
                assert proc.poll() is None, "honcho stopped early"
                processes = _descendants(proc.pid)

                stopping_since = time.monotonic()
                os.kill(proc.pid, signal.SIGTERM)
                code = proc.wait(30)
                wait_until(lambda: not any(_running(p) for p in processes),
                           max(0.1, 30 - (time.monotonic() - stopping_since)), "every Procfile process to exit",
                           interval_s=0.1)
                stopped_in_s = time.monotonic() - stopping_since
            output = log_path.read_text(errors="replace")
            accepted = _accepted(client, store.events)
            left = {lane: (int(client.xlen(store.outbox(lane))), _pending(client, store.outbox(lane)))
                    for lane in settings.sms_lanes}
            with SandboxAdmin(env["ICOMM_BASE_URL"]) as sandbox:
                stats = sandbox.stats()
        except BaseException:
            print(log_path.read_text(errors="replace")[-8000:] if log_path.exists() else "(no honcho log)")
            print(stack.logs())
            raise
        finally:
            wired.close()
            _kill({p for p in processes if _running(p)})  # survivors of a failed stop; none when it passes
    assert len(processes) >= 6  # three `sh -c` and at least web, clock and the Dramatiq parent
    assert stopped_in_s < 30
    assert code == 143, output[-4000:]  # honcho's exit code after a SIGTERM it handled
    for name in ("web", "worker", "clock"):
        assert f"{name}.1 started" in output
    assert "SIGKILL" not in output, output[-4000:]  # every process stopped on SIGTERM within the grace
    assert accepted == JOBS
    assert stats["messages_accepted"] == JOBS and stats["duplicates"] == 0
    assert left == {lane: (0, 0) for lane in settings.sms_lanes}
