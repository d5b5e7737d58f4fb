"""`sms-worker trace` on a running system: real Redis, the sandbox over HTTP, a worker process and a
clock. Messages go through the real send path (a sandbox fault makes a first attempt fail), the
reports drain, cancel and the schedule; the command is run as operators run it (`main`, settings
from the environment) and its output is read back."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest

from tests.support.sandbox import NO_FAULTS
from tests.support.system import System, running
from worker.cancel import CancelConfig, cancel
from worker.cli import main
from worker.devtools.devstack import wait_until
from worker.logs import mask_phone

# Reports ~0.3 s after a send, all delivered; logs calls unlimited (reconciliation checks them).
SANDBOX = ("--report-delay-ms", "300", "--outcome-mix", "delivered=1", "--logs-rate-per-min", "100000",
           "--seed", "7")


@pytest.fixture(scope="module")
def system() -> Iterator[System]:
    with running(sandbox_flags=SANDBOX, workers=1) as running_system:
        yield running_system


@pytest.fixture
def sys_(system: System) -> Iterator[System]:
    system.configure(**NO_FAULTS)
    yield system
    system.configure(**NO_FAULTS)


def _trace(system: System, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
           *args: str) -> tuple[int, str, str]:
    """`sms-worker trace ARGS` with the system's settings in the environment: (exit code, stdout, stderr)."""
    for name, value in system.stack.env.items():
        if name.startswith(("SMS_", "ICOMM_", "REDIS_", "LOG_")):
            monkeypatch.setenv(name, value)
    capsys.readouterr()
    code = main(["trace", *args])
    out, err = capsys.readouterr()
    return code, out, err


def _record(system: System, message_id: str) -> dict[str, str]:
    raw = system.client.hgetall(system.store.msg(message_id))
    return {k.decode(): v.decode() for k, v in raw.items()}


def _steps(doc: dict[str, Any]) -> list[str]:
    return [step["step"] for step in doc["timeline"]]


def _in_order(items: list[str], wanted: list[str]) -> bool:
    """Whether `wanted` appears in `items` in this order (other items may come between)."""
    rest = iter(items)
    return all(any(item == w for item in rest) for w in wanted)


def test_a_failed_first_attempt_then_accepted_and_delivered(
    sys_: System, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    """A 500 makes the first attempt ambiguous; reconciliation finds it absent from the logs and
    resends it; the provider accepts it and the drain brings its delivery report. The trace shows all
    of it in order, with the events it published, and the provider's own log entry."""
    system, number = sys_, "41795550001"
    system.configure(error_5xx_rate=1.0, error_5xx_codes=[500])
    try:
        sent = system.outbox.enqueue({"to": number, "text": "two attempts", "id": "trace-two"}, "bulk")
        wait_until(lambda: "state to=AMBIGUOUS" in _record(system, sent.message_id).get("trail", ""), 10,
                   "the first attempt to fail")
    finally:
        system.configure(error_5xx_rate=0.0)
    wait_until(lambda: _record(system, sent.message_id).get("state") == "DELIVERED", 20, "the delivery report")

    code, out, err = _trace(system, monkeypatch, capsys, sent.message_id)
    assert (code, err) == (0, "")
    assert f"message {sent.message_id}\n  state      DELIVERED (lane bulk, attempts 2)" in out
    assert "claimed, attempt 1 by " in out and "-> AMBIGUOUS (ProviderAmbiguous 500)" in out
    assert "not found in the provider's logs (check 1 by " in out and "resend: attempt 2 by " in out
    assert ": accepted, status " in out, "the accepted event, read from the events stream"
    assert "report -> DELIVERED (DELIVERED_TO_HANDSET) from drain" in out and ": delivered, status " in out
    assert mask_phone(number) in out and number not in out, "the number is masked by default"

    code, out, _ = _trace(system, monkeypatch, capsys, sent.message_id, "--json", "--provider")
    assert code == 0
    doc = orjson.loads(out)
    assert (doc["message_id"], doc["state"], doc["lane"], doc["attempts"], doc["to"]) == (
        sent.message_id, "DELIVERED", "bulk", 2, mask_phone(number))
    assert _in_order(_steps(doc), ["enqueued", "submit", "state", "reconcile", "absent", "resend", "state",
                                   "report"]), _steps(doc)
    states = [s for s in doc["timeline"] if s["step"] in ("state", "report")]
    assert [s["to"] for s in states] == ["AMBIGUOUS", "ACCEPTED", "DELIVERED"]
    assert [s["event"]["data"]["type"] for s in states[1:]] == ["accepted", "delivered"]
    assert states[2]["source"] == "drain" and states[2]["event"]["found"] is True
    assert [s["attempt"] for s in doc["timeline"] if s["step"] in ("submit", "resend")][:2] == [1, 2]
    ms = [s["ms"] for s in doc["timeline"]]
    assert ms[1:] == sorted(ms[1:]), "the trail is in time order"
    assert doc["provider"]["found"] is True
    assert doc["provider"]["entry"]["messageId"] == sent.message_id
    assert doc["provider"]["entry"]["destination"] == mask_phone(number)

    code, out, _ = _trace(system, monkeypatch, capsys, sent.message_id, "--json", "--show-numbers")
    assert orjson.loads(out)["to"] == number


def test_a_cancelled_scheduled_message_and_an_unknown_one(
    sys_: System, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    system = sys_
    send_at = (datetime.now(UTC) + timedelta(minutes=10)).isoformat()
    held = system.outbox.enqueue({"to": "41795550002", "text": "later", "send_at": send_at}, "bulk")
    assert cancel(system.store, CancelConfig.from_settings(system.settings), message_id=held.message_id).cancelled

    code, out, _ = _trace(system, monkeypatch, capsys, held.message_id, "--json")
    assert code == 0
    doc = orjson.loads(out)
    assert doc["state"] == "CANCELLED" and _steps(doc) == ["enqueued", "scheduled", "cancelled"]
    scheduled, cancelled = doc["timeline"][1], doc["timeline"][2]
    assert abs(scheduled["due"] - datetime.fromisoformat(send_at).timestamp() * 1000) < 1000
    assert cancelled["event"]["found"] is True and cancelled["event"]["data"]["type"] == "cancelled"
    code, out, _ = _trace(system, monkeypatch, capsys, held.message_id)
    assert "held in the schedule until " in out and "-> CANCELLED: never sent" in out

    code, out, err = _trace(system, monkeypatch, capsys, "sw-bulk-1764230000000-0")
    assert (code, out) == (1, "")
    assert err == ("sms-worker: trace: sw-bulk-1764230000000-0: unknown message (never queued here, or its "
                   "records have expired: SMS_STATE_TTL_S)\n")


def test_by_producer_id_and_a_message_not_claimed_yet(
    sys_: System, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    system = sys_
    sent = system.outbox.enqueue({"to": "41795550003", "text": "by id", "id": "trace-by-id"}, "bulk")
    wait_until(lambda: _record(system, sent.message_id).get("state") == "ACCEPTED", 10, "the send")
    code, out, _ = _trace(system, monkeypatch, capsys, "--id", "trace-by-id", "--json")
    assert code == 0
    doc = orjson.loads(out)
    assert (doc["message_id"], doc["id"]) == (sent.message_id, "trace-by-id")
    assert _in_order(_steps(doc), ["enqueued", "submit", "state"])
    code, _, err = _trace(system, monkeypatch, capsys, "--id", "never-queued")
    assert code == 1 and "--id never-queued: unknown producer id" in err

    # The provider unreachable: the local trace is still printed, and the exit status says what failed.
    system.configure(down=True)
    code, out, _ = _trace(system, monkeypatch, capsys, "--id", "trace-by-id", "--provider")
    system.configure(down=False)
    assert code == 1 and f"message {sent.message_id}" in out
    assert "provider's log (GET /sms/3/logs)\n  could not be read: " in out

    # A lane no dispatcher serves keeps its entries unclaimed: one written with plain XADD (its
    # message id derived from the entry), one with its own message id (found by the bounded search).
    outbox = system.store.outbox("parked")
    entry = system.client.xadd(outbox, {"job": b'{"to":"41795550004","text":"raw"}'}).decode()
    given = f"sw-parked-{int(time.time() * 1000)}-pabc123"
    system.client.xadd(outbox, {"job": b'{"to":"41795550004","text":"raw"}', "mid": given})
    for message_id in (f"sw-parked-{entry}", given):
        code, out, _ = _trace(system, monkeypatch, capsys, message_id)
        assert code == 0
        assert "state      QUEUED: queued, not claimed yet (lane parked, outbox entry " in out
        code, out, _ = _trace(system, monkeypatch, capsys, message_id, "--json")
        doc = orjson.loads(out)
        assert (doc["state"], doc["recorded"], doc["lane"], _steps(doc)) == ("QUEUED", False, "parked", ["enqueued"])


def test_by_number_since_a_time(
    sys_: System, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    """Six messages sent and one scheduled to one number are found from the events stream, the
    outbox and the schedule; another number's are not."""
    system, number = sys_, "41795550005"
    since = datetime.now(UTC).isoformat()
    sent = system.outbox.enqueue_many([{"to": number, "text": f"n {i}"} for i in range(6)], "bulk")
    other = system.outbox.enqueue({"to": "41795550006", "text": "not this one"}, "bulk")
    later = (datetime.now(UTC) + timedelta(minutes=10)).isoformat()
    held = system.outbox.enqueue({"to": "+" + number, "text": "later", "send_at": later}, "bulk")
    wait_until(lambda: all(_record(system, s.message_id).get("state") in ("ACCEPTED", "DELIVERED") for s in sent),
               10, "the sends")
    mine = {s.message_id for s in sent} | {held.message_id}

    code, out, _ = _trace(system, monkeypatch, capsys, "--to", number, "--since", since, "--json")
    assert code == 0
    doc = orjson.loads(out)
    assert doc["to"] == mask_phone(number) and doc["found"] == 7 and doc["bounded"] == []
    assert {m["message_id"] for m in doc["messages"]} == mine and other.message_id not in out
    assert {m["message_id"]: m["state"] for m in doc["messages"]}[held.message_id] == "SCHEDULED"
    assert number not in out

    code, out, _ = _trace(system, monkeypatch, capsys, "--to", "+" + number, "--since", "10m")
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == f"7 messages to {mask_phone(number)} since " + lines[0].split(" since ")[1]
    assert lines[1] == "" and lines[2].split()[:3] == ["message", "id", "state"]
    listed = [line.split()[0] for line in lines[3:] if line.startswith("  sw-")]
    assert set(listed) == mine and lines[-1].startswith("trace one: sms-worker trace ")

    code, out, _ = _trace(system, monkeypatch, capsys, "--to", number, "--since", "10m", "--limit", "2", "--json")
    doc = orjson.loads(out)
    assert doc["found"] == 7 and len(doc["messages"]) == 2
    code, out, _ = _trace(system, monkeypatch, capsys, "--to", "41795550099", "--since", "10m")
    assert code == 1 and out.startswith("0 messages to ")

    # A scan that reached its bound says so (here: the events stream holds more than 3 since then).
    code, out, _ = _trace(system, monkeypatch, capsys, "--to", number, "--since", since, "--scan-limit", "3")
    assert "the scan of events stopped after 3 entries: later messages may be missing" in out


def test_a_dead_lettered_message_names_its_dead_letter(
    sys_: System, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    """A job the dispatcher refuses (written with plain XADD, as any language may) is dead-lettered;
    its trace shows the dead letter's reason, read by the id its trail names."""
    system = sys_
    entry = system.client.xadd(system.store.outbox("bulk"), {"job": b'{"to":"12","text":"bad number"}'}).decode()
    message_id = f"sw-bulk-{entry}"
    wait_until(lambda: _record(system, message_id).get("state") == "FAILED", 10, "the dead letter")

    code, out, _ = _trace(system, monkeypatch, capsys, message_id, "--json")
    assert code == 0
    failed = orjson.loads(out)["timeline"][-1]
    assert (failed["step"], failed["to"]) == ("state", "FAILED")
    assert failed["event"]["data"]["type"] == "failed" and failed["dlq"]["found"] is True
    assert failed["dlq"]["data"]["reason"] == "invalid_job" and "job" not in failed["dlq"]["data"]
    code, out, _ = _trace(system, monkeypatch, capsys, message_id)
    assert f"dead letter {failed['dlq']['entry_id']}: invalid_job: " in out
