"""`sms-worker`, every command: a user's mistake is one line `sms-worker: ...` on stderr and exit 2
(usage, configuration) or 1, never a traceback; a bug keeps its traceback; Ctrl-C is 130; a closed
stdout ends the command quietly; LOG_LEVEL is honoured. Run through the real entry point
(`python -m worker.cli` in a subprocess), against a real redis-server where Redis is involved."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from tests.unit.test_settings import BAD_VALUES
from worker.cli import main
from worker.devtools.devstack import free_port
from worker.settings import ENV_FILE_VARIABLE, Settings

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = {name.upper() for name in Settings.model_fields}
API_KEY = "cli-errors-key-0123456789"


def base_env(**extra: str) -> dict[str, str]:
    """This machine's environment without any setting (or env file), this tree first on the path."""
    env = {k: v for k, v in os.environ.items() if k.upper() not in SETTINGS and k != ENV_FILE_VARIABLE}
    # Loopback only: nothing may try the real API or a Redis of this machine.
    return {**env, "PYTHONPATH": str(ROOT), "ICOMM_BASE_URL": f"http://127.0.0.1:{closed_port()}",
            "REDIS_URL": f"redis://127.0.0.1:{closed_port()}/0", **extra}


def closed_port() -> int:
    """A loopback port nothing listens on (connections are refused)."""
    return free_port()


def run(*args: str, env: Mapping[str, str] | None = None, cwd: Path | None = None,
        **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "worker.cli", *args], env=dict(env or base_env()), cwd=cwd,
                          capture_output=True, text=True, timeout=60, check=False, **kwargs)  # type: ignore[call-overload]


def one_line(done: subprocess.CompletedProcess[str], code: int) -> str:
    """The single stderr line of a refused command, after checking its exit code and that no traceback came."""
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert done.returncode == code, (done.returncode, done.stderr)
    assert lines[0].startswith("sms-worker: "), lines[0]
    return lines[0]


@pytest.fixture
def cwd(tmp_path: Path) -> Path:
    """A working directory without a .env."""
    return tmp_path


# --- configuration: every setting's mistake, through main() -------------------------------------------------
@pytest.fixture
def here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """In-process main(): a working directory without a .env, no env file named, nothing reachable."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(ENV_FILE_VARIABLE, "unset-below")
    monkeypatch.delenv(ENV_FILE_VARIABLE)  # restored to unset after the test, whatever main() sets
    monkeypatch.setenv("REDIS_URL", f"redis://127.0.0.1:{closed_port()}/0")
    monkeypatch.setenv("ICOMM_BASE_URL", f"http://127.0.0.1:{closed_port()}")
    return tmp_path


@pytest.mark.parametrize(("variable", "value"), sorted(BAD_VALUES.items()))
def test_a_wrong_setting_is_one_line_naming_it(here: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str], variable: str, value: str) -> None:
    monkeypatch.setenv(variable, value)
    assert main(["status"]) == 2
    out, err = capsys.readouterr()
    [line] = err.splitlines()
    assert line.startswith(f"sms-worker: {variable}") and out == "", err


def test_a_wrong_setting_through_the_real_entry_point(cwd: Path) -> None:
    """The 47-line traceback of a broken SMS_LANES: one line now, two for two mistakes."""
    line = one_line(run("status", env=base_env(SMS_LANES='{"otp":'), cwd=cwd), 2)
    assert line.startswith("sms-worker: SMS_LANES='{\"otp\":': is not valid JSON"), line
    done = run("status", env=base_env(SMS_LANES='{"otp":', SMS_LEASE_S="soon"), cwd=cwd)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 2 and all(line.startswith("sms-worker: SMS_L") for line in lines), lines


# --- usage mistakes --------------------------------------------------------------------------------------
@pytest.mark.parametrize(("args", "said"), [
    ((), "the following arguments are required: COMMAND"),
    (("enqueue", "--lane"), "argument --lane: expected one argument"),
    (("status", "--bogus"), "unrecognized arguments: --bogus"),
    (("sandbox", "--api-key", "k", "--port", "70000"), "a port is 0 to 65535"),
    (("sandbox", "--api-key", "k", "--host", "0.0.0.0"), "loopback addresses, not '0.0.0.0'; --allow-remote"),
    (("sandbox", "--api-key", ""), "--api-key must not be empty"),
    (("sandbox", "--api-key", "k", "--rate-429", "2"), "--rate-429: must be between 0 and 1"),
])
def test_a_usage_mistake_is_one_line_and_exit_2(cwd: Path, args: tuple[str, ...], said: str) -> None:
    line = one_line(run(*args, cwd=cwd), 2)
    assert said in line, line


# --- Redis unreachable: one line, with the hint -------------------------------------------------------------
@pytest.mark.parametrize("args", [
    ("status",), ("status", "--json"), ("dlq", "list"), ("enqueue", "--to", "41793026727", "--text", "hi"),
    ("check",),
])
def test_redis_unreachable_is_one_line_with_a_hint(cwd: Path, args: tuple[str, ...]) -> None:
    port = closed_port()
    done = run(*args, env=base_env(REDIS_URL=f"redis://:pw-not-shown@127.0.0.1:{port}/0", ICOMM_API_KEY=API_KEY),
               cwd=cwd)
    line = one_line(done, 1)
    assert f"Redis is unreachable at 127.0.0.1:{port}: is it running, and is REDIS_URL right?" in line, line
    assert "pw-not-shown" not in line


# --- the user's input: files and values ------------------------------------------------------------------------
@pytest.fixture
def redis_env(redis_url: str) -> dict[str, str]:
    return base_env(REDIS_URL=redis_url)


def one_said_line(done: subprocess.CompletedProcess[str], code: int) -> str:
    """one_line(), blank lines aside: the CSV importer's progress display ends with an empty line
    when stderr is no terminal (worker/cli/enqueue.py, enqueue_csv: rich's Progress)."""
    blank_free = subprocess.CompletedProcess(done.args, done.returncode, done.stdout,
                                             "".join(line + "\n" for line in done.stderr.splitlines() if line))
    return one_line(blank_free, code)


@pytest.mark.parametrize(("content", "extra", "said"), [
    ("to,name\n41790000001,Jos\xe9\n".encode("latin-1"), (), "not UTF-8"),
    (b"to,name\n41790000001,Ana\n", ("--text-template", "Hello {name"), "--text-template"),
    (b"to,name\n41790000001,Ana\n", ("--text-template", "Hello {name!r}"), "--text-template"),
])
def test_a_bad_csv_or_template_is_one_line(redis_env: dict[str, str], cwd: Path, content: bytes,
                                           extra: tuple[str, ...], said: str) -> None:
    (cwd / "people.csv").write_bytes(content)
    template = () if extra else ("--text-template", "Hello {name}")
    done = run("enqueue", "--csv", "people.csv", *template, *extra, env=redis_env, cwd=cwd)
    line = one_said_line(done, 2 if extra else 1)
    assert said in line, line


def test_a_refused_job_is_one_line(redis_env: dict[str, str], cwd: Path) -> None:
    line = one_line(run("enqueue", "--to", "12", "--text", "hi", env=redis_env, cwd=cwd), 1)
    assert "to:" in line, line


def _main_with(body: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """main(args) with the `status` command replaced by `body` (what a command may raise)."""
    code = ("import sys, worker.cli as cli\n"
            f"def fake(args):\n    {body}\n"
            "cli.cmd_status = fake\n"
            f"sys.exit(cli.main({list(args)!r}))\n")
    return subprocess.run([sys.executable, "-c", code], env=base_env(), cwd=cwd, capture_output=True, text=True,
                          timeout=60, check=False)


@pytest.mark.parametrize(("body", "said"), [
    ("b'\\xff'.decode('utf-8')", "not UTF-8 text (invalid start byte: byte 0xff at 0)"),
    ("open('no-such-file.csv')", "no-such-file.csv: No such file or directory"),
    ("'Hello {name'.format(name='x')", "expected '}' before end of string"),
    ("int('many')", "invalid literal for int()"),
])
def test_input_errors_any_command_raises_are_one_line(cwd: Path, body: str, said: str) -> None:
    """The generic guarantee of main(): ValueError, UnicodeDecodeError and OSError from a user's input."""
    line = one_line(_main_with(body, "status", cwd=cwd), 1)
    assert said in line, line


def test_a_bug_keeps_its_traceback(cwd: Path) -> None:
    done = _main_with("raise RuntimeError('a bug')", "status", cwd=cwd)
    assert done.returncode == 1 and "Traceback" in done.stderr and "RuntimeError: a bug" in done.stderr


def test_keyboard_interrupt_exits_130_quietly(cwd: Path) -> None:
    done = _main_with("raise KeyboardInterrupt", "status", cwd=cwd)
    assert done.returncode == 130 and "Traceback" not in done.stderr, done.stderr


@pytest.fixture
def silent_api() -> Iterator[socket.socket]:
    """A loopback "API" that accepts connections and never answers."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(30)
        yield server


def test_ctrl_c_while_waiting_for_the_api_exits_130(cwd: Path, silent_api: socket.socket) -> None:
    env = base_env(ICOMM_API_KEY=API_KEY, ICOMM_BASE_URL=f"http://127.0.0.1:{silent_api.getsockname()[1]}")
    with subprocess.Popen([sys.executable, "-m", "worker.cli", "logs", "--message-id", "m1"], env=env, cwd=cwd,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        conn, _ = silent_api.accept()  # the command is waiting for its answer now
        with conn:
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and "Traceback" not in err, err


# --- a closed stdout (`sms-worker status | head -4`) ---------------------------------------------------------
def _closed_stdout_run(*args: str, env: Mapping[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the command writes a byte: every write fails
    try:
        return subprocess.run([sys.executable, "-m", "worker.cli", *args], env=dict(env), cwd=cwd,
                              stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=60, check=False)
    finally:
        os.close(write_end)


@pytest.mark.parametrize("buffered", [True, False], ids=["buffered", "unbuffered"])
@pytest.mark.parametrize("args", [("status",), ("status", "--json"), ("dlq", "list"), ("--help",),
                                  ("status", "--help")])
def test_a_closed_stdout_ends_the_command_quietly(redis_env: dict[str, str], cwd: Path,
                                                  args: tuple[str, ...], buffered: bool) -> None:
    env = {k: v for k, v in redis_env.items() if k != "PYTHONUNBUFFERED"}
    done = _closed_stdout_run(*args, env=env if buffered else {**env, "PYTHONUNBUFFERED": "1"}, cwd=cwd)
    assert done.stderr == "", done.stderr
    # 141 = 128 + SIGPIPE; argparse itself ignores a failed write of --help and exits 0.
    assert done.returncode in ({0, 141} if "--help" in args else {141}), done.returncode


# --- LOG_LEVEL --------------------------------------------------------------------------------------------------
def _logs_with_retries(level: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """`sms-worker logs` against a refused API port: each retry is a debug line `provider_retry`."""
    env = base_env(ICOMM_API_KEY=API_KEY, LOG_LEVEL=level, LOG_FORMAT="console", ICOMM_SEND_RETRY_ATTEMPTS="3",
                   ICOMM_RETRY_BACKOFF_BASE_S="0.01", ICOMM_RETRY_BACKOFF_MAX_S="0.02")
    return run("logs", "--message-id", "m1", env=env, cwd=cwd)


def test_log_level_warning_hides_debug_lines(cwd: Path) -> None:
    done = _logs_with_retries("WARNING", cwd)
    assert "provider_retry" not in done.stdout + done.stderr and done.stdout == ""
    assert "was not sent" in one_line(done, 1)


def test_log_lines_go_to_stderr_never_into_the_output(cwd: Path) -> None:
    done = _logs_with_retries("DEBUG", cwd)
    assert done.stdout == "" and done.returncode == 1
    assert done.stderr.count("provider_retry") == 2, done.stderr
