"""`sms-worker worker --lanes/--skip-lanes`: which lanes and Dramatiq queues a worker process takes; and
`sms-worker check` on a Redis that evicts or forgets, on a wrong or missing setting (checked first,
and it stops the check) and on a misspelt variable (against a real redis-server and the sandbox)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from worker.cli.processes import worker_queues as _worker_queues
from worker.devtools.devstack import DevStack
from worker.devtools.sandbox.process import SandboxProcess
from worker.errors import SmsWorkerError
from worker.settings import ENV_FILE_VARIABLE, Settings, load_settings

ROOT = Path(__file__).resolve().parents[2]

SETTINGS = load_settings(
    icomm_api_key="k" * 20,
    sms_lanes={"otp": {"max_wait_ms": 0, "concurrency": 2}, "bulk": {}, "alerts": {"max_wait_ms": 0}},
)


def test_by_default_a_worker_takes_every_queue() -> None:
    assert _worker_queues(SETTINGS, None, None) == (["otp", "bulk", "alerts"], None)


def test_lanes_takes_only_those_lanes_dispatch_queues() -> None:
    assert _worker_queues(SETTINGS, "otp,alerts", None) == (["otp", "alerts"], ["sms-lane-otp", "sms-lane-alerts"])


def test_skip_lanes_takes_the_shared_queue_and_every_other_lane() -> None:
    assert _worker_queues(SETTINGS, None, "otp") == (["bulk", "alerts"], ["sms", "sms-lane-bulk", "sms-lane-alerts"])


@pytest.mark.parametrize(("only", "skip", "message"), [
    ("otp", "bulk", "not both"),
    ("otp,sms", None, "unknown lane(s) sms; SMS_LANES has otp, bulk, alerts"),
    (None, "nope", "unknown lane(s) nope"),
])
def test_mistakes_are_refused_with_a_clear_message(only: str | None, skip: str | None, message: str) -> None:
    with pytest.raises(SmsWorkerError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _worker_queues(SETTINGS, only, skip)


# --- `sms-worker check`: a Redis that evicts or forgets fails it, one line per problem -----------------


@pytest.fixture(scope="module")
def check_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A private redis-server (reconfigured per test) and the sandbox as the API."""
    with DevStack(log_dir=tmp_path_factory.mktemp("check")) as stack, SandboxProcess(api_key="k" * 20) as sandbox:
        stack.start_redis()
        yield {"REDIS_URL": stack.env["REDIS_URL"], "ICOMM_BASE_URL": sandbox.url, "ICOMM_API_KEY": "k" * 20}


def _check(env: dict[str, str], redis_config: dict[str, str], *, cwd: Path | None = None,
           **extra: str) -> subprocess.CompletedProcess[str]:
    client = redis.Redis.from_url(env["REDIS_URL"])
    try:
        for name, value in {"maxmemory-policy": "noeviction", "save": "", **redis_config}.items():
            client.config_set(name, value)
        # With a working directory of its own the check may read that directory's .env; otherwise it
        # keeps the session's empty env file (tests/conftest.py), not a developer's .env.
        clean = {k: v for k, v in os.environ.items()
                 if k.upper() not in {n.upper() for n in Settings.model_fields}
                 and (cwd is None or k != ENV_FILE_VARIABLE)}
        full = {**clean, **env, **extra, "PYTHONPATH": str(ROOT)}
        return subprocess.run([sys.executable, "-m", "worker.cli", "check"], env={k: v for k, v in full.items() if v},
                              capture_output=True, text=True, timeout=60, check=False, cwd=cwd)
    finally:
        client.close()


def test_check_passes_on_a_persistent_noeviction_redis(check_env: dict[str, str]) -> None:
    done = _check(check_env, {"save": "3600 1"})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "persistence rdb" in done.stdout and "icomm API: ok" in done.stdout and done.stderr == ""


def test_check_fails_on_no_persistence_unless_accepted(check_env: dict[str, str]) -> None:
    done = _check(check_env, {})
    assert done.returncode == 1, done.stdout
    [line] = done.stderr.splitlines()
    assert "persistence is off" in line and "CONFIG SET appendonly yes" in line and "SMS_REDIS_ALLOW_VOLATILE" in line
    assert "icomm API: ok" in done.stdout, "the API is still checked"
    accepted = _check(check_env, {}, SMS_REDIS_ALLOW_VOLATILE="true")
    assert accepted.returncode == 0, accepted.stderr
    assert "redis accepted: Redis persistence is off" in accepted.stdout


def test_check_fails_on_eviction_even_when_volatility_is_accepted(check_env: dict[str, str]) -> None:
    done = _check(check_env, {"maxmemory-policy": "allkeys-lru"}, SMS_REDIS_ALLOW_VOLATILE="true")
    assert done.returncode == 1
    [line] = done.stderr.splitlines()
    assert line.startswith("sms-worker: Redis maxmemory-policy is allkeys-lru")
    assert "CONFIG SET maxmemory-policy noeviction" in line and "Traceback" not in done.stderr


def test_check_names_each_problem_on_its_own_line(check_env: dict[str, str]) -> None:
    done = _check(check_env, {"maxmemory-policy": "volatile-lru"})
    assert done.returncode == 1
    lines = done.stderr.splitlines()
    assert len(lines) == 2 and "maxmemory-policy is volatile-lru" in lines[0] and "persistence is off" in lines[1]


# --- `sms-worker check`: the configuration first, and a problem there stops it ------------------------------


def test_check_without_an_api_key_stops_before_redis(check_env: dict[str, str], tmp_path: Path) -> None:
    """No environment but where Redis and the API are: one line, exit 2, and nothing reached or said ok."""
    done = _check(check_env, {"save": "3600 1"}, cwd=tmp_path, ICOMM_API_KEY="")
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.splitlines() == ["sms-worker: ICOMM_API_KEY is not set (example: ICOMM_API_KEY=01234567...)"]
    assert done.stdout == "", "no `configuration: ok`, no `redis: ok` before a configuration problem"


def test_check_with_a_wrong_setting_stops_before_redis(check_env: dict[str, str], tmp_path: Path) -> None:
    done = _check(check_env, {"save": "3600 1"}, cwd=tmp_path, SMS_LANES='{"otp":', SMS_LEASE_S="soon")
    assert done.returncode == 2 and done.stdout == "" and "Traceback" not in done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 2 and lines[0].startswith("sms-worker: SMS_L") and lines[1].startswith("sms-worker: SMS_L")


def test_check_warns_about_each_variable_that_is_no_setting(check_env: dict[str, str], tmp_path: Path) -> None:
    """A misspelt variable is ignored by the settings, so check says so, with the setting it meant; it passes."""
    (tmp_path / ".env").write_text("SMS_DEFALT_LANE=otp\n")
    done = _check(check_env, {"save": "3600 1"}, cwd=tmp_path, SMS_RATE_LIMT_MPS="10")
    assert done.returncode == 0 and done.stderr == "", done.stdout + done.stderr
    warnings = [line for line in done.stdout.splitlines() if line.startswith("configuration warning: ")]
    assert warnings == [
        "configuration warning: SMS_RATE_LIMT_MPS (in the environment) is not a setting and is ignored; "
        "did you mean SMS_RATE_LIMIT_MPS?",
        "configuration warning: SMS_DEFALT_LANE (in .env) is not a setting and is ignored; "
        "did you mean SMS_DEFAULT_LANE?",
    ]
    assert done.stdout.index("configuration: ok") < done.stdout.index("configuration warning") \
        < done.stdout.index("redis: ok")
