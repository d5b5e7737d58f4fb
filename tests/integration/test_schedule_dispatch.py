"""Scheduled and cancelled jobs through the real dispatcher and the sandbox over HTTP: what is sent,
what is never sent (sandbox counters), and raw outbox entries with a future send_at."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import orjson
import pytest

from tests.integration.test_dispatch import Rig, _settings
from worker.cancel import CancelConfig, cancel
from worker.clock import Clock, ClockConfig
from worker.devtools.devstack import wait_until
from worker.devtools.sandbox.process import SandboxProcess
from worker.models import State
from worker.store import Store

CONFIG = CancelConfig(state_ttl_s=3600, events_maxlen=10_000)


def _at(seconds: float) -> str:
    return (datetime.now(UTC) + timedelta(seconds=seconds)).isoformat()


@pytest.fixture
def rig(redis_url: str, sbx: SandboxProcess, store: Store) -> Iterator[Rig]:
    rig = Rig(_settings(redis_url, sbx), store)
    yield rig
    rig.provider.close()


class _NoWakes:
    def dispatch(self, lane: str, delay_ms: int = 0) -> bool:
        return True

    def send(self, name: str) -> None: ...

    def process_reports(self) -> None: ...


def test_a_scheduled_job_is_sent_when_due_and_a_cancelled_one_never(rig: Rig, sbx: SandboxProcess) -> None:
    store = rig.store
    due = rig.outbox.enqueue({"to": "41790000001", "text": "due", "send_at": _at(0.5)}, "bulk")
    dropped = rig.outbox.enqueue({"to": "41790000002", "text": "dropped", "send_at": _at(0.5)}, "bulk")
    queued = rig.outbox.enqueue({"to": "41790000003", "text": "queued then cancelled"}, "bulk")
    assert cancel(store, CONFIG, message_id=dropped.message_id).cancelled
    assert cancel(store, CONFIG, message_id=queued.message_id).cancelled
    assert rig.dispatcher.run("bulk", budget_s=0.2) == 1, "only the cancelled queued entry is claimed"
    assert sbx.stats()["messages_accepted"] == 0
    assert store.r.xlen(store.outbox("bulk")) == 0, "the cancelled entry is acknowledged and deleted"

    clock = Clock(ClockConfig.from_settings(rig.settings), store, _NoWakes())  # type: ignore[arg-type]
    wait_until(lambda: clock.move_due("bulk") == 1, 5, "the scheduled job to become due")
    assert rig.dispatcher.run("bulk", budget_s=0.2) == 1
    assert sbx.stats()["messages_accepted"] == 1
    assert store.message(due.message_id)["state"] == State.ACCEPTED
    assert store.message(dropped.message_id)["state"] == State.CANCELLED
    assert store.message(queued.message_id)["state"] == State.CANCELLED
    assert rig.types() == {due.message_id: "accepted", dropped.message_id: "cancelled",
                           queued.message_id: "cancelled"}


def test_a_raw_entry_with_a_future_send_at_is_moved_to_the_schedule(rig: Rig, sbx: SandboxProcess) -> None:
    """`XADD ... job {"send_at": ...}` from another language: the dispatcher holds it instead of
    sending it, and it is sent once when due."""
    store = rig.store
    job = {"to": "41790000001", "text": "raw", "id": "raw-1", "send_at": _at(0.6)}
    entry_id = store.r.xadd(store.outbox("bulk"), {"job": orjson.dumps(job)}).decode()
    assert rig.dispatcher.run("bulk", budget_s=0.2) == 1
    mid = store.lane_prefix("bulk") + entry_id
    assert store.message(mid)["state"] == State.SCHEDULED
    assert store.r.xlen(store.outbox("bulk")) == 0 and sbx.stats()["messages_accepted"] == 0
    assert store.scheduled_counts(["bulk"])["bulk"][0] == 1

    wait_until(lambda: store.move_due("bulk", state_ttl_s=3600)[0] == 1, 5, "the raw job to become due")
    assert rig.dispatcher.run("bulk", budget_s=0.2) == 1
    assert sbx.stats()["messages_accepted"] == 1
    assert store.message(mid)["state"] == State.ACCEPTED
    assert [e["id"] for e in rig.events()] == ["raw-1"]


def test_a_raw_entry_beyond_the_horizon_is_dead_lettered(rig: Rig, sbx: SandboxProcess) -> None:
    store = rig.store
    job = {"to": "41790000001", "text": "far", "send_at": _at(400 * 86400)}
    store.r.xadd(store.outbox("bulk"), {"job": orjson.dumps(job)})
    assert rig.dispatcher.run("bulk", budget_s=0.2) == 1
    [event] = rig.events()
    assert event["type"] == "failed" and event["reason"] == "invalid_job"
    assert store.r.xlen(store.dlq) == 1 and sbx.stats()["messages_accepted"] == 0
