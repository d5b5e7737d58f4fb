"""`sms-worker enqueue --send-at`, `sms-worker cancel` and the scheduled columns of `sms-worker status`."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import orjson
import pytest

from tests.support.cli import run_cli
from worker.store import Store


def _run(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], redis_url: str,
         *args: str) -> tuple[int, str, str]:
    return run_cli(monkeypatch, capsys, redis_url, *args)


def _in(seconds: float) -> str:
    return (datetime.now(UTC) + timedelta(seconds=seconds)).isoformat(timespec="seconds")


def test_enqueue_send_at_then_status_then_cancel(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                                 redis_url: str, store: Store) -> None:
    when = _in(3600)
    code, out, _ = _run(monkeypatch, capsys, redis_url, "enqueue", "--to", "41790000001",
                        "--text", "later", "--send-at", when, "--lane", "bulk", "--id", "order-1")
    assert code == 0 and out.startswith(f"scheduled for {when}: sw-bulk-"), out
    mid = out.split(": ", 1)[1].split()[0]

    code, out, _ = _run(monkeypatch, capsys, redis_url, "status")
    header, rows = out.splitlines()[0], out.splitlines()[1:]
    assert "scheduled" in header and "next due" in header
    [bulk] = [row for row in rows if row.startswith("bulk")]
    assert re.search(r" 1 +in (59\.\d|60\.0) min ", bulk), bulk
    lanes = orjson.loads(_run(monkeypatch, capsys, redis_url, "status", "--json")[1])["lanes"]
    assert [(lane["lane"], lane["scheduled"]) for lane in lanes] == [("otp", 0), ("bulk", 1)]

    code, out, _ = _run(monkeypatch, capsys, redis_url, "cancel", "--id", "order-1")
    assert code == 0 and out == f"{mid}: cancelled; it will not be sent\n"
    assert _run(monkeypatch, capsys, redis_url, "cancel", mid)[0] == 0, "cancelled earlier is cancelled"
    code, out, _ = _run(monkeypatch, capsys, redis_url, "cancel", mid, "sw-bulk-1-1", "--json")
    assert code == 1
    assert orjson.loads(out) == [
        {"message_id": mid, "id": None, "outcome": "not_cancellable", "state": "CANCELLED"},
        {"message_id": "sw-bulk-1-1", "id": None, "outcome": "unknown", "state": None}]


def test_a_past_send_at_is_queued_and_a_bad_one_is_one_line(monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str], redis_url: str,
                                                            store: Store) -> None:
    code, out, _ = _run(monkeypatch, capsys, redis_url, "enqueue", "--to", "41790000001", "--text", "now",
                        "--send-at", _in(-60))
    assert code == 0 and out.startswith("queued: "), out
    code, out, err = _run(monkeypatch, capsys, redis_url, "enqueue", "--to", "41790000001", "--text", "x",
                          "--send-at", "2026-12-01T09:00:00")
    assert code != 0 and out == ""
    assert len(err.strip().splitlines()) == 1 and "send_at" in err and "offset" in err, err
    code, _, err = _run(monkeypatch, capsys, redis_url, "cancel")
    assert code == 2 and "MESSAGE_ID or --id" in err
