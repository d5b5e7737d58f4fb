"""`sms-worker` run in-process by the tests, as an operator would run it from a shell without a terminal."""

from __future__ import annotations

import io
from collections.abc import Callable

import pytest

from worker.cli import main


def run_cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], redis_url: str, *args: str,
            ci: bool = False) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `sms-worker ARGS` against `redis_url`, with no standard input
    (a confirmation question is refused) and, with `ci`, CI=true (no progress bars)."""
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("SMS_REDIS_ALLOW_VOLATILE", "true")
    if ci:
        monkeypatch.setenv("CI", "true")
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    try:
        code = main(list(args))
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def cli_runner(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], redis_url: str,
               **env: str) -> Callable[..., tuple[int, str, str]]:
    """`run(*args)` -> (exit status, stdout, stderr) of `sms-worker ARGS` against `redis_url` with the
    variables `env`. Standard input is set once to no terminal, so a test may make it one (patching
    isatty and input) for the commands that ask a question."""
    monkeypatch.setenv("REDIS_URL", redis_url)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr("sys.stdin", io.StringIO(""))

    def run(*args: str) -> tuple[int, str, str]:
        code = main(list(args))
        out, err = capsys.readouterr()
        return code, out, err

    return run
