"""`sms-worker status` for people: aligned, with units, "none" for what is not set, no Python reprs,
and every outbox stream that exists, configured lane or not (`--json` stays for scripts)."""

from __future__ import annotations

import io
import re

import orjson
import pytest

from worker.cli import main
from worker.settings import Settings
from worker.status import StatusConfig, collect, render
from worker.store import Store


def _status(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], redis_url: str,
            *args: str) -> str:
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("SMS_REDIS_ALLOW_VOLATILE", "true")
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    assert main(["status", *args]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    return out


def _populate(store: Store) -> None:
    store.r.xadd(store.outbox("bulk"), {"job": b'{"to":"41790000001","text":"hi"}'})
    store.r.xadd(store.outbox("marketing"), {"job": b'{"to":"41790000001","text":"hi"}'})
    store.pause("otp", "auth", 25)
    store.r.hset(store.heartbeats, "host-1", 1)
    store.r.hset(store.last_drain,
                 mapping={"at": "2026-11-27T10:00:02.120Z", "pages": 1, "reports": 3, "outcome": "drained"})


def test_status_has_no_python_reprs(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                    redis_url: str, store: Store) -> None:
    """No dict/list reprs, no None: the limiter, the last drain and the workers read as sentences."""
    _populate(store)
    out = _status(monkeypatch, capsys, redis_url)
    assert not re.search(r"[{}\[\]]|None|'", out), out
    assert "rate limiter:" in out and "messages/s none (no limit)" in out
    assert "last drain:" in out and "2026-11-27T10:00:02.120Z" in out and "3 reports" in out
    assert "host-1" in out and "STALE" in out
    assert re.search(r"otp .* auth, lifts in 2\d(\.\d)? s", out), out


def test_status_columns_are_aligned(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                    redis_url: str, store: Store) -> None:
    """Every lane row puts its numbers under the header's columns (right-aligned)."""
    _populate(store)
    for _ in range(1234):
        store.r.xadd(store.outbox("otp"), {"job": b"{}"})
    lines = _status(monkeypatch, capsys, redis_url).splitlines()
    header = lines[0]
    rows = lines[1 : lines.index("")]
    assert len(rows) == 3
    for name in ("depth", "waiting", "in flight"):
        end = header.index(name) + len(name)
        for row in rows:
            assert row[end - 1] != " " and (len(row) == end or row[end] == " "), (name, row)
    assert any(row.startswith("otp") and " 1,234 " in row for row in rows), rows


def test_status_shows_every_outbox_stream(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                          redis_url: str, store: Store) -> None:
    """A stream nobody configured (a plain XADD to sms:outbox:marketing) is listed and marked."""
    _populate(store)
    out = _status(monkeypatch, capsys, redis_url)
    [row] = [line for line in out.splitlines() if line.startswith("marketing")]
    assert "not configured: its jobs are dead-lettered as unknown_lane" in row
    lanes = orjson.loads(_status(monkeypatch, capsys, redis_url, "--json"))["lanes"]
    assert [(lane["lane"], lane["configured"], lane["depth"]) for lane in lanes] == [
        ("otp", True, 0), ("bulk", True, 1), ("marketing", False, 1)]
    paused = next(lane for lane in lanes if lane["lane"] == "otp")
    assert paused["paused"] == "auth" and 20 < paused["paused_for_s"] <= 25


def test_the_metrics_snapshot_keeps_to_configured_lanes(redis_url: str, store: Store) -> None:
    """collect() without all_outboxes (the metrics scrape) does not SCAN the keyspace for streams."""
    _populate(store)
    config = StatusConfig.from_settings(Settings(redis_url=redis_url))
    assert [lane.lane for lane in collect(config, store).lanes] == ["otp", "bulk"]
    assert [lane.lane for lane in collect(config, store, all_outboxes=True).lanes] == ["otp", "bulk", "marketing"]
    assert "marketing" in render(collect(config, store, all_outboxes=True))
