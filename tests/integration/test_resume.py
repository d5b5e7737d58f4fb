"""`sms-worker resume`: lift a lane's pause (auth, provider_unavailable) at once after fixing its
cause, say what was lifted, and wake the lane's dispatcher (against a real Redis)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.support.cli import cli_runner
from worker.store import Store
from worker.triggers import lane_queue

Cli = Callable[..., tuple[int, str, str]]


@pytest.fixture
def cli(redis_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Cli:
    return cli_runner(monkeypatch, capsys, redis_url)


def test_resume_lifts_one_lane_and_wakes_it(cli: Cli, store: Store) -> None:
    """The pause is gone at once, the output names the reason lifted, and a dispatch message for
    the lane is queued (so its backlog starts now, not at the next clock tick)."""
    store.pause("bulk", "auth", 30)
    store.pause("otp", "auth", 30)
    code, out, err = cli("resume", "--lane", "bulk")
    assert code == 0, err
    assert "bulk: lifted the pause (auth" in out
    assert store.paused("bulk") is None and store.paused("otp") == "auth"
    assert int(store.r.llen(f"sms:dramatiq:{lane_queue('bulk')}")) == 1


def test_resume_all_says_what_it_lifted_and_what_was_not_paused(cli: Cli, store: Store) -> None:
    """--all lifts every paused lane and lists the ones that were not paused."""
    store.pause("otp", "provider_unavailable", 10)
    code, out, err = cli("resume", "--all")
    assert code == 0, err
    assert "otp: lifted the pause (provider_unavailable" in out
    assert "bulk: not paused" in out
    assert store.paused("otp") is None


def test_resume_refuses_unclear_requests(cli: Cli, store: Store) -> None:
    """An unknown lane, --lane with --all, or neither, are one-line usage errors (exit 2)."""
    code, _, err = cli("resume", "--lane", "bluk")
    assert code == 2 and "unknown lane 'bluk'" in err and "otp, bulk" in err
    code, _, err = cli("resume", "--lane", "otp", "--all")
    assert code == 2 and "not both" in err
    code, _, err = cli("resume")
    assert code == 2 and "--lane" in err and "--all" in err
