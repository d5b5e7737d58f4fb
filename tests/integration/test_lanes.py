"""Lanes nobody configured, and pauses that outlived their cause: nothing sits silently for ever."""

from __future__ import annotations

from collections.abc import Iterator

import orjson
import pytest

from tests.integration.test_dispatch import Rig, _jobs, _settings
from worker.devtools.sandbox.process import SandboxProcess
from worker.store import Store


@pytest.fixture
def rig(redis_url: str, sbx: SandboxProcess, store: Store) -> Iterator[Rig]:
    rig = Rig(_settings(redis_url, sbx), store)
    yield rig
    rig.provider.close()


def test_jobs_on_an_unconfigured_lane_are_dead_lettered_with_a_failed_event(
    rig: Rig, sandbox: SandboxProcess
) -> None:
    """A plain XADD to sms:outbox:marketing (no such lane) ends as dead letters `unknown_lane` with
    `failed` events; the configured lanes' jobs are left alone and nothing is sent."""
    store = rig.store
    for i in range(3):
        job = {"to": f"4179000000{i}", "text": "hi", "id": f"m{i}"}
        store.r.xadd(store.outbox("marketing"), {"job": orjson.dumps(job)})
    store.r.xadd(store.outbox("marketing"), {"job": b"not json"})
    rig.outbox.enqueue_many(_jobs(2), "bulk")
    assert store.outbox_lanes() == ["bulk", "marketing"]
    assert rig.dispatcher.sweep_unknown_lanes() == {"marketing": 4}
    assert int(store.r.xlen(store.outbox("marketing"))) == 0
    assert int(store.r.xlen(store.outbox("bulk"))) == 2
    events = [orjson.loads(f[b"event"]) for _, f in store.r.xrange(store.events)]
    assert [(e["type"], e["reason"], e["lane"]) for e in events] == [("failed", "unknown_lane", "marketing")] * 4
    assert sorted(e["id"] for e in events if e["id"]) == ["m0", "m1", "m2"]
    dead = [orjson.loads(f[b"entry"]) for _, f in store.r.xrange(store.dlq)]
    assert {d["reason"] for d in dead} == {"unknown_lane"} and len(dead) == 4
    assert "not configured" in dead[0]["detail"]
    assert rig.dispatcher.sweep_unknown_lanes() == {}
    assert sandbox.stats()["messages_accepted"] == 0


def test_an_auth_pause_is_lifted_by_the_next_accepted_request(rig: Rig) -> None:
    """A lane paused for a 401 (the key was wrong, now fixed) resumes as soon as a request with the
    key is accepted on another lane, not after SMS_AUTH_PAUSE_S."""
    rig.store.pause("otp", "auth", 3600)
    rig.outbox.enqueue_many(_jobs(5), "bulk")
    rig.dispatcher.run("bulk")
    assert set(rig.types().values()) == {"accepted"}
    assert rig.store.paused("otp") is None


def test_a_pause_for_another_reason_is_not_lifted(rig: Rig) -> None:
    rig.store.pause("otp", "provider_unavailable", 3600)
    rig.outbox.enqueue_many(_jobs(1), "bulk")
    rig.dispatcher.run("bulk")
    assert rig.store.paused("otp") == "provider_unavailable"
