"""`./scripts/demo` as a newcomer runs it: numbers explained in plain words, what to try next, and
`--keep` leaving a stack they can poke at with the commands it prints, and stop with the one it prints."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from hashlib import sha256
from pathlib import Path
from typing import Any

import httpx
import orjson
import redis

from worker.devtools.devstack import wait_until

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
MESSAGES = 60
FINAL = {"delivered", "undeliverable", "expired", "rejected", "failed"}
STACK_FILE = "stack.json"  # what --keep writes next to the logs: each process's name, pid and start time


def _alive(pid: int, start: str | None) -> bool:
    """Running (not a zombie) and still the process the demo started (same start time, field 22)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[0] != "Z" and (start is None or fields[19] == start)


def _demo(*args: str) -> subprocess.CompletedProcess[str]:
    # scripts/demo installs only when pyproject.toml changed since the last install; a test never
    # reaches the network, so it insists on an installed venv (./scripts/test makes one).
    stamp = VENV_BIN.parent / f".installed-{sha256((ROOT / 'pyproject.toml').read_bytes()).hexdigest()[:16]}"
    assert stamp.exists(), "the venv is older than pyproject.toml: run ./scripts/test (it reinstalls) first"
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "ICOMM_BASE_URL", "ICOMM_API_KEY")}
    return subprocess.run([str(ROOT / "scripts" / "demo"), *args], cwd=ROOT, env={**env, "COLUMNS": "200"},
                          capture_output=True, text=True, timeout=90)


def _shell(env_file: str, command: str) -> subprocess.CompletedProcess[str]:
    """A printed command, run the way the demo says: in a shell that sourced its env file."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SMS_", "ICOMM_", "REDIS_"))}
    return subprocess.run(["bash", "-c", f". {env_file} && {command}"], env=env, capture_output=True, text=True,
                          timeout=60)


def test_fault_words_are_plain() -> None:
    from worker.devtools.demo import describe_faults

    text = describe_faults({"429": 3, "429_retry_after": 1, "5xx_502": 2, "5xx_503": 1, "timeout": 1}, 0)
    assert "too many requests" in text and "server error" in text and "too late" in text
    assert "3 times" in text and "once" in text
    assert not re.search(r"\b(5xx_\d+|429_retry_after|timeout \d)", text), text
    assert "No SMS was sent twice" in text


def test_demo_keep_explains_the_numbers_and_leaves_a_stack_to_poke_at() -> None:
    """`./scripts/demo --messages 60 --keep`: the outcome mix and the faults said in plain words, the
    printed commands work against the stack it left (status, enqueue, sandbox stats), its stop command
    ends every process, and the output ends with what to try next."""
    done = _demo("--messages", str(MESSAGES), "--keep")
    out = done.stdout
    env_match = re.search(r"^\s*\. (\S+/demo\.env)\s", out, re.M)
    directory = Path(env_match.group(1)).parent if env_match else None
    procs = []
    try:
        assert done.returncode == 0, out + done.stderr[-4000:]
        assert directory is not None, out
        procs = json.loads((directory / STACK_FILE).read_text())["processes"]
        assert {p["name"] for p in procs} >= {"redis", "sandbox", "worker-1", "worker-2", "clock", "web"}
        assert all(_alive(p["pid"], p["start"]) for p in procs), "--keep left a process dead"

        # The numbers, in plain words: the failures are the sandbox's simulated outcome mix.
        flat = " ".join(out.split())  # as read, whatever the terminal's width
        assert "simulated outcome mix, not errors of the worker" in flat
        assert "at random" in flat and "90% delivered" in flat
        assert "broken jobs" in flat and "No SMS was sent twice" in flat
        assert "faults injected" not in flat and "5xx_" not in flat  # the old caption's jargon
        tail = out[out.rindex("Try next"):]  # the last thing it says: what to try next
        assert "Everything is still running" not in tail and "./scripts/demo --messages" in tail

        # The printed commands work, in a shell that sourced the printed env file.
        status = _shell(str(directory / "demo.env"), "sms-worker status")
        assert status.returncode == 0, status.stderr
        assert re.search(r"accepted, awaiting a final report:\s+0\b", status.stdout), status.stdout
        enqueue_line = next(line for line in out.splitlines() if "sms-worker enqueue" in line)
        queued = _shell(str(directory / "demo.env"), enqueue_line.split("#")[0].strip())
        assert queued.returncode == 0 and "queued" in queued.stdout, queued.stdout + queued.stderr
        message_id = re.search(r"queued: (\S+)", queued.stdout).group(1)  # type: ignore[union-attr]
        redis_port = re.search(r"redis-cli -p (\d+) ", out).group(1)  # type: ignore[union-attr]
        client: Any = redis.Redis(port=int(redis_port), socket_connect_timeout=1)
        try:
            def final() -> bool:
                events = [orjson.loads(fields[b"event"]) for _, fields in client.xrange("sms:events")]
                return any(e["message_id"] == message_id and e["type"] in FINAL for e in events)

            wait_until(final, 20, "the enqueued SMS's final status", interval_s=0.2)
        finally:
            client.close()
        stats_url = re.search(r"curl -s (\S+/_sandbox/stats)", out).group(1)  # type: ignore[union-attr]
        stats = httpx.get(stats_url, timeout=5).json()
        assert stats["messages_accepted"] == MESSAGES + 1 and stats["duplicates"] == 0

        # The printed stop command ends them all.
        stop_line = next(line for line in out.splitlines() if line.split("#")[0].strip().endswith("/stop"))
        stopped = subprocess.run(["sh", "-c", stop_line.split("#")[0].strip()], capture_output=True, text=True,
                                 timeout=60)
        assert stopped.returncode == 0, stopped.stderr
        assert not any(_alive(p["pid"], p["start"]) for p in procs)
    except BaseException:
        print(out, done.stderr[-4000:])
        raise
    finally:
        for p in procs:  # whatever the stop left, by the pids this test's demo started
            if _alive(p["pid"], p["start"]):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p["pid"], signal.SIGKILL)


def test_demo_without_keep_stops_everything() -> None:
    """Without --keep the demo stops its whole stack before it exits (its Redis names the stack's dir)."""
    done = _demo("--messages", "20", "--keep-logs")
    assert done.returncode == 0, done.stdout + done.stderr[-4000:]
    match = re.search(r"process logs: (\S+)", done.stderr)
    assert match, done.stderr[-2000:]
    left = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if match.group(1).encode() in (entry / "cmdline").read_bytes():
                    left.append(int(entry.name))
    assert left == []
    assert "Try next" in done.stdout and "./scripts/demo --keep" in done.stdout
