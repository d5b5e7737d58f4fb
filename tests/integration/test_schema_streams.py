"""A real run's streams keep the published contracts: every outbox entry the Outbox writes is a job
worker/schemas/job-v1.schema.json accepts (fields `job`, `mid` and `c` only, as asyncapi.yaml says), and
every event the run publishes (accepted, rejected, failed, requeued, cancelled, the reports'
delivered, undeliverable, expired, rejected, unknown_message, and expired no_report) validates
against event-v1.schema.json with an event_id of its own; a real Redis and sandbox.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
from jsonschema import Draft202012Validator

from tests.integration.test_dispatch import Rig, _settings
from worker import schemas
from worker.cancel import CancelConfig, CancelOutcome, cancel
from worker.deadletters import DeadLetters, DeadLettersConfig
from worker.devtools.devstack import wait_until
from worker.devtools.sandbox.config import SandboxConfig
from worker.devtools.sandbox.process import SandboxProcess
from worker.reports import DrainConfig, Drainer, ProcessConfig, Processor, SweepConfig, Sweeper
from worker.store import Store

JOB = Draft202012Validator(schemas.load("job"))
EVENT = Draft202012Validator(schemas.load("event"))
REPORT_KINDS = {"delivered", "undeliverable", "expired", "rejected"}


@pytest.fixture(scope="module")
def sandbox_config() -> SandboxConfig:
    """Reports at once, every final outcome likely among a few dozen messages."""
    return SandboxConfig(report_delay_ms=0, seed=14, outcome_mix={k: 0.25 for k in REPORT_KINDS})


@pytest.fixture
def rig(redis_url: str, sbx: SandboxProcess, store: Store) -> Iterator[Rig]:
    # 30 parts allowed here, 25 at the sandbox: a 26-part text is the provider's send-side rejection.
    rig = Rig(_settings(redis_url, sbx, sms_max_text_parts=30), store)
    yield rig
    rig.provider.close()


def _events(store: Store) -> list[dict[str, Any]]:
    return [orjson.loads(fields[b"event"]) for _, fields in store.r.xrange(store.events)]


def _errors(validator: Draft202012Validator, value: Any) -> list[str]:
    return [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(value)]


def _outbox_entries_fit_the_job_schema(store: Store, lane: str) -> int:
    entries = store.r.xrange(store.outbox(lane))
    for _, fields in entries:
        assert set(fields) <= {b"job", b"mid", b"c"}, fields
        job = orjson.loads(fields[b"job"])
        assert _errors(JOB, job) == [], job
    return len(entries)


def _send_side(rig: Rig) -> dict[str, str]:
    """accepted, rejected (too long for the provider), cancelled, and two failed lives of one message."""
    jobs: list[dict[str, Any]] = [{"to": f"4179{i:07d}", "text": f"hello {i}", "id": f"job-{i}",
                                   "metadata": {"i": i}} for i in range(40)]
    jobs.append({"to": "41790000999", "text": "a" * 3900, "id": "too-long"})
    jobs.append({"to": "+41790000998", "binary": {"hex": "0f c2"}, "validity_period": {"amount": 30},
                 "campaign_reference_id": "c-14", "flash": False})
    queued = rig.outbox.enqueue_many(jobs, "bulk")
    assert _outbox_entries_fit_the_job_schema(rig.store, "bulk") == len(jobs)
    assert cancel(rig.store, CancelConfig(), producer_id="job-0").outcome is CancelOutcome.CANCELLED
    rig.store.r.xadd(rig.store.outbox("bulk"), {"job": b'{"to":"12","text":"bad","id":5,"metadata":"x"}'})
    rig.store.r.xadd(rig.store.outbox("marketing"), {"job": b'{"to":"41790000997","text":"elsewhere"}'})
    rig.dispatcher.run("bulk")
    rig.dispatcher.sweep_unknown_lanes()

    letters = DeadLetters(rig.store, DeadLettersConfig.from_settings(rig.settings))
    dead = {item.reason: item for item in letters.iterate()}
    assert set(dead) == {"invalid_job", "unknown_lane"}
    letters.replay(dead["invalid_job"])  # as `dlq replay --force` does: it fails again
    letters.replay(dead["unknown_lane"], lane="bulk")
    rig.dispatcher.run("bulk")
    return {"cancelled": queued[0].message_id, "invalid": dead["invalid_job"].message_id}


def _reports(rig: Rig, sandbox: SandboxProcess, accepted: int) -> None:
    """Every report drained and processed; one for a message never sent (unknown_message); one
    accepted message the provider has no record of (expired no_report)."""
    body = {"messages": [{"destinations": [{"to": "41790000996", "messageId": "stranger-14"}],
                          "content": {"text": "x"}}]}
    httpx.post(f"{sandbox.url}/sms/3/messages", json=body, headers=sandbox.auth_header, timeout=5).raise_for_status()
    settings = rig.settings
    processor = Processor(ProcessConfig.from_settings(settings), rig.store)

    def all_reported() -> bool:
        Drainer(DrainConfig.from_settings(settings), rig.store, rig.provider).drain()
        processor.process()
        return (sum(e["type"] in REPORT_KINDS for e in _events(rig.store)) >= accepted
                and sandbox.stats()["reports"]["fetched"] >= accepted + 1)

    wait_until(all_reported, 20, "a report for every accepted message, and the stranger's")
    processor.retry_parked(now_ms=int(time.time() * 1000) + int(settings.sms_report_park_timeout_s * 1000) + 1)
    job = orjson.dumps({"to": "41790000995", "text": "x", "id": "silent"})
    rig.store.r.hset(rig.store.msg("silent-14"), mapping={"state": "ACCEPTED", "lane": "bulk", "job": job})
    rig.store.r.zadd(rig.store.awaiting, {"silent-14": 1})  # its report deadline is long past
    Sweeper(SweepConfig.from_settings(settings), rig.store, processor, provider=rig.provider).sweep()


def test_every_event_of_a_run_fits_the_schema_with_an_id_of_its_own(rig: Rig, sandbox: SandboxProcess) -> None:
    mids = _send_side(rig)
    accepted = sum(e["type"] == "accepted" for e in _events(rig.store))
    assert accepted == 41  # 40 jobs + the binary one + the replayed unknown_lane one - the cancelled one
    _reports(rig, sandbox, accepted)

    found = _events(rig.store)
    for event in found:
        assert _errors(EVENT, event) == [], event
    ids = [e["event_id"] for e in found]
    assert len(ids) == len(set(ids)), "an event_id was published twice"
    types = {e["type"] for e in found}
    assert {"accepted", "rejected", "failed", "requeued", "cancelled", "unknown_message", "expired"} <= types
    assert len(types & REPORT_KINDS) >= 3  # a quarter each of 41 reports: all four, all but surely
    lives = [e for e in found if e["message_id"] == mids["invalid"]]
    assert [e["type"] for e in lives] == ["failed", "requeued", "failed"]
    assert lives[0]["event_id"] != lives[2]["event_id"]
    assert (lives[0]["id"], lives[0]["metadata"], lives[0]["to"]) == (None, None, "12")  # 5 and "x": not echoed
    [cancelled] = [e for e in found if e["message_id"] == mids["cancelled"]]
    assert cancelled["type"] == "cancelled" and cancelled["id"] == "job-0"
    assert any(e["type"] == "expired" and e["reason"] == "no_report" for e in found)
    assert sandbox.stats()["messages_accepted"] == accepted + 1  # and the stranger, posted directly
