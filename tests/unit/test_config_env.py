"""The env file (`.env`, `--env-file FILE`) and variables that are no setting (a misspelt one is
warned about, naming the setting it most likely meant), through load_settings and the real entry
point (`python -m worker.cli` in a subprocess, real redis-server where Redis is involved)."""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.unit.test_cli_errors import API_KEY, ROOT, base_env, closed_port, one_line, run
from worker.cli import _with_shared_options, build_parser
from worker.errors import ConfigError
from worker.settings import (
    ENV_FILE_VARIABLE,
    NOT_SETTINGS,
    NOT_SETTINGS_PREFIXES,
    Settings,
    load_settings,
    unknown_variables,
)

EXAMPLE_ENV = ROOT / "config" / "example.env"
SETTINGS = {name.upper() for name in Settings.model_fields}
# The commands that read the settings, each with the least it needs to get that far.
SETTINGS_COMMANDS: list[tuple[str, ...]] = [
    ("worker",), ("clock",), ("web",), ("enqueue", "--to", "41793026727", "--text", "hi"), ("dlq", "list"),
    ("status",), ("logs", "--message-id", "m1"), ("reconcile", "--message-id", "m1"), ("check",),
]


@pytest.fixture
def here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory of its own, and no env file named by the environment."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(ENV_FILE_VARIABLE, "unset-below")
    monkeypatch.delenv(ENV_FILE_VARIABLE)
    return tmp_path


# --- .env and --env-file --------------------------------------------------------------------------------
def test_example_env_copied_to_dot_env_loads_as_it_is(here: Path) -> None:
    """"Copy to .env": the file as shipped, its empty values included (empty means unset)."""
    (here / ".env").write_text(EXAMPLE_ENV.read_text())
    settings = load_settings()
    assert settings.sms_send_window_s is None and settings.sms_default_sender is None
    assert settings.sms_lanes["otp"].concurrency == 2 and settings.sms_lanes["bulk"].concurrency == 8
    assert unknown_variables() == []


def test_dot_env_is_read_and_the_environment_wins(here: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (here / ".env").write_text("SMS_DEFAULT_LANE=otp\nSMS_RATE_LIMIT_MPS=42\n# a comment\n")
    settings = load_settings()
    assert settings.sms_default_lane == "otp" and settings.sms_rate_limit_mps == 42
    monkeypatch.setenv("SMS_RATE_LIMIT_MPS", "7")
    assert load_settings().sms_rate_limit_mps == 7


def test_sms_env_file_names_the_file_its_mistakes_are_named(here: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SMS_ENV_FILE is how `--env-file` reaches the processes a command starts (worker, demo)."""
    (here / "prod.env").write_text('SMS_LANES={"otp":\n')
    monkeypatch.setenv(ENV_FILE_VARIABLE, str(here / "prod.env"))
    with pytest.raises(ConfigError, match=r"^SMS_LANES='\{\"otp\":': is not valid JSON"):
        load_settings()
    monkeypatch.setenv(ENV_FILE_VARIABLE, str(here / "missing.env"))
    with pytest.raises(ConfigError, match=r"SMS_ENV_FILE=.*missing\.env: no such file"):
        load_settings()


def test_every_command_takes_env_file_before_or_after_it() -> None:
    parser = _with_shared_options(build_parser())
    assert parser.parse_args(["--env-file", "a.env", "status"]).env_file == "a.env"
    assert parser.parse_args(["status", "--env-file", "b.env"]).env_file == "b.env"
    commands = next(a for a in parser._actions if a.dest == "command").choices
    assert commands and all("--env-file" in sub._option_string_actions for sub in commands.values())


@pytest.mark.parametrize("args", [*SETTINGS_COMMANDS, ("sandbox", "--api-key", "k"), ("demo",)])
@pytest.mark.parametrize("before", [True, False], ids=["before", "after"])
def test_a_missing_env_file_is_one_line_for_every_command(tmp_path: Path, args: tuple[str, ...],
                                                          before: bool) -> None:
    flag = ["--env-file", "missing.env"]
    argv = [*flag, *args] if before else [*args, *flag]
    line = one_line(run(*argv, cwd=tmp_path), 2)
    assert line == "sms-worker: --env-file missing.env: no such file"


@pytest.mark.parametrize("args", SETTINGS_COMMANDS)
def test_env_file_is_what_every_command_reads(tmp_path: Path, args: tuple[str, ...]) -> None:
    (tmp_path / "staging.env").write_text(f"ICOMM_API_KEY={API_KEY}\nSMS_DEFAULT_LANE=nope\n")
    line = one_line(run("--env-file", "staging.env", *args, cwd=tmp_path), 2)
    assert line == "sms-worker: SMS_DEFAULT_LANE='nope' is not one of SMS_LANES (otp, bulk)"


@pytest.mark.parametrize(("content", "said"), [
    (b"SMS_DEFAULT_LANE=caf\xe9\n", "not UTF-8 text"),
    (b'SMS_LANES={"otp":{"batch_size":0}}\n', "SMS_LANES: lane 'otp': batch_size=0"),
])
def test_a_broken_dot_env_is_one_line(tmp_path: Path, content: bytes, said: str) -> None:
    (tmp_path / ".env").write_bytes(content)
    line = one_line(run("status", cwd=tmp_path), 2)
    assert said in line, line


def test_an_env_file_that_is_a_directory_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "conf").mkdir()
    assert one_line(run("--env-file", "conf", "status", cwd=tmp_path), 2) == "sms-worker: --env-file conf: not a file"


def test_dot_env_reaches_redis_and_the_environment_wins_over_it(redis_url: str, tmp_path: Path) -> None:
    """`status` reads REDIS_URL from .env; a REDIS_URL in the environment wins over it."""
    (tmp_path / ".env").write_text(f"REDIS_URL={redis_url}\n")
    env = {k: v for k, v in base_env().items() if k != "REDIS_URL"}
    done = run("status", env=env, cwd=tmp_path)
    assert done.returncode == 0 and "lane" in done.stdout, done.stderr
    port = closed_port()
    refused = run("status", env={**env, "REDIS_URL": f"redis://127.0.0.1:{port}/0"}, cwd=tmp_path)
    assert f"unreachable at 127.0.0.1:{port}:" in one_line(refused, 1)


# --- variables that are no setting --------------------------------------------------------------------------
def test_a_misspelt_variable_is_named_with_the_setting_it_meant(here: Path) -> None:
    (here / ".env").write_text("SMS_DEFALT_LANE=otp\nREDIS_ULR=redis://127.0.0.1:1/0\nPORT=8080\nSMS_LANES={}\n")
    found = unknown_variables({"SMS_RATE_LIMT_MPS": "10", "icomm_apikey": "x", "SMS_QWERTY": "1", "PATH": "/bin",
                               "REDIS_URI": "x", "sms_lanes": "{}"})
    assert [(u.name, u.source, u.closest) for u in found] == [
        ("SMS_RATE_LIMT_MPS", "the environment", "SMS_RATE_LIMIT_MPS"),
        ("icomm_apikey", "the environment", "ICOMM_API_KEY"),
        ("SMS_QWERTY", "the environment", None),
        ("SMS_DEFALT_LANE", ".env", "SMS_DEFAULT_LANE"),
        ("REDIS_ULR", ".env", "REDIS_URL"),  # in our own file, a near miss of an unprefixed setting counts too
    ]
    assert found[0].line() == ("SMS_RATE_LIMT_MPS (in the environment) is not a setting and is ignored; "
                               "did you mean SMS_RATE_LIMIT_MPS?")


def test_the_project_s_own_variables_are_no_warning(here: Path) -> None:
    env = {"SMS_RELIABILITY": "full", "SMS_RELIABILITY_TRIALS": "3", "SMS_RELIABILITY_ENV": "SMS_LEASE_S=90",
           "SMS_WORKER_IMAGE": "icomm-sms-worker:dev", ENV_FILE_VARIABLE: "", "SMS_EVENTS_DRAMATIQ_QUEUE": "q"}
    assert unknown_variables(env) == []


def _mentioned_variables() -> dict[str, set[str]]:
    """Every SMS_*/ICOMM_* name the repository writes, and where (this test's own misspellings aside)."""
    own = {Path(__file__).resolve(), ROOT / "tests" / "unit" / "test_cli_errors.py",
           ROOT / "tests" / "unit" / "test_settings.py", ROOT / "tests" / "unit" / "test_cli_worker.py"}
    found: dict[str, set[str]] = {}
    skip = {".git", ".venv", ".mypy_cache", ".ruff_cache", ".pytest_cache", ".hypothesis", "__pycache__", "results"}
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if d not in skip and not d.endswith(".egg-info")]
        for filename in filenames:
            path = Path(dirpath) / filename
            if path in own:
                continue
            try:
                text = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            for name in re.findall(r"\b(?:SMS|ICOMM)_[A-Z0-9_]*[A-Z0-9]\b", text):
                found.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    return found


def test_every_sms_or_icomm_variable_the_project_uses_is_a_setting_or_allowed() -> None:
    """The allow-list (worker.settings.NOT_SETTINGS) is complete: nothing the project itself sets is warned about."""
    strays = {name: where for name, where in _mentioned_variables().items()
              if name not in SETTINGS and name not in NOT_SETTINGS and not name.startswith(NOT_SETTINGS_PREFIXES)}
    assert strays == {}


def test_a_cli_command_warns_once_at_start_up(redis_url: str, tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("SMS_DEFALT_LANE=otp\n")
    done = run("status", env=base_env(REDIS_URL=redis_url, SMS_RATE_LIMT_MPS="10", LOG_FORMAT="console"),
               cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    warnings = [line for line in done.stderr.splitlines() if "unknown_variable" in line]
    assert len(warnings) == 2 and "unknown_variable" not in done.stdout, done.stderr
    assert "did you mean SMS_RATE_LIMIT_MPS?" in warnings[0] and "did you mean SMS_DEFAULT_LANE?" in warnings[1]


def test_a_worker_process_warns_at_start_up(redis_url: str, tmp_path: Path) -> None:
    """`sms-worker --env-file F worker`: the Dramatiq worker processes read F too (SMS_ENV_FILE) and warn."""
    (tmp_path / "w.env").write_text(f"REDIS_URL={redis_url}\nICOMM_API_KEY={API_KEY}\nSMS_RATE_LIMT_MPS=10\n")
    argv = [sys.executable, "-m", "worker.cli", "--env-file", "w.env", "worker", "--processes", "1", "--threads", "2"]
    env = {k: v for k, v in base_env().items() if k != "REDIS_URL"}
    proc = subprocess.Popen(argv, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    seen = b""
    try:
        assert proc.stderr is not None
        deadline = time.monotonic() + 60
        while not any(b"unknown_variable" in line for line in seen.split(b"\n")[:-1]):  # a whole line
            left = deadline - time.monotonic()
            ready, _, _ = select.select([proc.stderr], [], [], max(left, 0))
            chunk = os.read(proc.stderr.fileno(), 65536) if ready else b""
            assert chunk and left > 0, f"no warning from the worker processes: {seen.decode()[-2000:]}"
            seen += chunk
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
        if proc.stderr is not None:
            proc.stderr.close()
    line = next(line for line in seen.decode().splitlines() if "SMS_RATE_LIMT_MPS" in line)
    assert '"event": "unknown_variable"' in line and '"did_you_mean": "SMS_RATE_LIMIT_MPS"' in line, line
    assert str(tmp_path / "w.env") in line, "the worker processes read the file --env-file named"
