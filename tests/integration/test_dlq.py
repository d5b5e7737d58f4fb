"""`sms-worker dlq`: a replay that would only fail again needs --force and says why, report dead
letters are never replayed as jobs, a replay publishes `requeued`, and purging everything asks
first (dead letters made by the real dispatcher and report processor; a real Redis and sandbox)."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from typing import Any

import orjson
import pytest

from tests.integration.test_dispatch import Rig, _settings
from worker.cli import main
from worker.devtools.sandbox.process import SandboxProcess
from worker.reports import ProcessConfig, Processor
from worker.store import Store

Cli = Callable[..., tuple[int, str, str]]


@pytest.fixture
def rig(redis_url: str, sbx: SandboxProcess, store: Store) -> Iterator[Rig]:
    sbx.configure(reject_text_containing="")
    rig = Rig(_settings(redis_url, sbx), store)
    yield rig
    rig.provider.close()


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def cli(redis_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Cli:
    monkeypatch.setenv("REDIS_URL", redis_url)

    def run(*args: str, stdin: io.StringIO | None = None) -> tuple[int, str, str]:
        monkeypatch.setattr("sys.stdin", stdin if stdin is not None else io.StringIO(""))
        code = main(list(args))
        out, err = capsys.readouterr()
        return code, out, err

    return run


def _dead(store: Store) -> list[dict[str, Any]]:
    return [{"dlq_id": i.decode(), **orjson.loads(f[b"entry"])} for i, f in store.r.xrange(store.dlq)]


def _events(store: Store, message_id: str) -> list[dict[str, Any]]:
    found = [orjson.loads(f[b"event"]) for _, f in store.r.xrange(store.events)]
    return [e for e in found if e["message_id"] == message_id]


def _invalid_job(rig: Rig) -> dict[str, Any]:
    rig.store.r.xadd(rig.store.outbox("bulk"), {"job": b'{"to":"12","text":"bad"}'})
    rig.dispatcher.run("bulk")
    [dead] = _dead(rig.store)
    assert dead["reason"] == "invalid_job"
    return dead


def test_replaying_an_invalid_job_says_why_it_fails_and_needs_force(rig: Rig, cli: Cli) -> None:
    """Without --force nothing is queued and the refusal names the validation problem; with --force
    it is queued again (and a `requeued` event says so before the second `failed`)."""
    dead = _invalid_job(rig)
    code, _, err = cli("dlq", "replay", dead["dlq_id"])
    assert code == 1
    assert "invalid_job" in err and "to: must be an international number" in err and "--force" in err
    assert int(rig.store.r.xlen(rig.store.outbox("bulk"))) == 0
    assert [d["dlq_id"] for d in _dead(rig.store)] == [dead["dlq_id"]]

    code, out, err = cli("dlq", "replay", dead["dlq_id"], "--force")
    assert code == 0, err
    assert "replayed 1" in out
    rig.dispatcher.run("bulk")
    types = [e["type"] for e in _events(rig.store, dead["message_id"])]
    assert types == ["failed", "requeued", "failed"]


def test_a_replay_publishes_requeued_and_the_message_carries_on(rig: Rig, cli: Cli, sandbox: SandboxProcess) -> None:
    """An unknown_lane dead letter replayed onto a configured lane: `requeued` (message id, lane,
    the reason it had, its producer id and metadata), then `accepted` under the same message id."""
    job = {"to": "41790000001", "text": "hi", "id": "m-1", "metadata": {"k": 1}}
    rig.store.r.xadd(rig.store.outbox("marketing"), {"job": orjson.dumps(job)})
    rig.dispatcher.sweep_unknown_lanes()
    [dead] = _dead(rig.store)
    assert dead["reason"] == "unknown_lane"

    code, _, err = cli("dlq", "replay", dead["dlq_id"])
    assert code == 1 and "lane 'marketing' is not configured" in err and "--to-lane" in err
    code, _, err = cli("dlq", "replay", dead["dlq_id"], "--to-lane", "bulk")
    assert code == 0, err
    assert _dead(rig.store) == []
    rig.dispatcher.run("bulk")
    events = _events(rig.store, dead["message_id"])
    assert [e["type"] for e in events] == ["failed", "requeued", "accepted"]
    requeued = events[1]
    assert (requeued["lane"], requeued["reason"], requeued["id"], requeued["metadata"]) == (
        "bulk", "unknown_lane", "m-1", {"k": 1})
    assert requeued["event_id"] != events[0]["event_id"] and requeued["event_id"].startswith(dead["message_id"])
    assert events[2]["lane"] == "bulk"
    assert sandbox.stats()["messages_accepted"] == 1


def test_a_replay_under_a_new_message_id_names_it(rig: Rig, cli: Cli) -> None:
    """--new-message-id: `requeued` is published for the old message id and names the new one."""
    job = {"to": "41790000001", "text": "hi"}
    rig.store.r.xadd(rig.store.outbox("marketing"), {"job": orjson.dumps(job)})
    rig.dispatcher.sweep_unknown_lanes()
    [dead] = _dead(rig.store)
    code, _, err = cli("dlq", "replay", dead["dlq_id"], "--to-lane", "bulk", "--new-message-id")
    assert code == 0, err
    [requeued] = [e for e in _events(rig.store, dead["message_id"]) if e["type"] == "requeued"]
    rig.dispatcher.run("bulk")
    [accepted] = [e for e in orjson.loads(b"[" + b",".join(
        f[b"event"] for _, f in rig.store.r.xrange(rig.store.events)) + b"]") if e["type"] == "accepted"]
    assert requeued["requeued_as"] == accepted["message_id"] != dead["message_id"]


def test_a_bad_request_replay_needs_force(rig: Rig, cli: Cli, sandbox: SandboxProcess) -> None:
    """The provider refused this exact content; a replay would send it unchanged: --force needed."""
    sandbox.configure(reject_text_containing="POISON")
    rig.outbox.enqueue_many([{"to": "41790000001", "text": "POISON"}, {"to": "41790000002", "text": "fine"}], "bulk")
    rig.dispatcher.run("bulk")
    [dead] = _dead(rig.store)
    assert dead["reason"] == "bad_request"
    code, _, err = cli("dlq", "replay", "--all", "--reason", "bad_request")
    assert code == 1 and "provider refused" in err and "--force" in err
    assert len(_dead(rig.store)) == 1


def test_a_replay_under_a_new_message_id_keeps_its_producer_id(rig: Rig, cli: Cli, sandbox: SandboxProcess) -> None:
    """A job with a producer id replayed under a new message id is sent: the id moves to the new
    message (else the dispatcher drops the replay as a repeat of the old one), and a second
    enqueue of that id is a duplicate of the new message."""
    sandbox.configure(reject_text_containing="POISON")
    [queued] = rig.outbox.enqueue_many([{"to": "41790000001", "text": "POISON", "id": "order-9"}], "bulk")
    rig.dispatcher.run("bulk")
    [dead] = _dead(rig.store)
    sandbox.configure(reject_text_containing="")  # the cause was fixed at the provider
    code, _, err = cli("dlq", "replay", dead["dlq_id"], "--force", "--new-message-id")
    assert code == 0, err
    rig.dispatcher.run("bulk")
    [requeued] = [e for e in _events(rig.store, queued.message_id) if e["type"] == "requeued"]
    assert [e["type"] for e in _events(rig.store, requeued["requeued_as"])] == ["accepted"]
    assert sandbox.stats()["messages_accepted"] == 1
    again = rig.outbox.enqueue({"to": "41790000001", "text": "POISON", "id": "order-9"}, "bulk")
    assert again.duplicate and again.message_id == requeued["requeued_as"]


def test_a_message_no_longer_failed_is_not_replayed(rig: Rig, cli: Cli) -> None:
    """A dead letter whose message moved on since (state not FAILED) would be sent again: refused."""
    job = {"to": "41790000001", "text": "hi"}
    rig.store.r.xadd(rig.store.outbox("marketing"), {"job": orjson.dumps(job)})
    rig.dispatcher.sweep_unknown_lanes()
    [dead] = _dead(rig.store)
    rig.store.r.hset(rig.store.msg(dead["message_id"]), "state", "ACCEPTED")
    code, _, err = cli("dlq", "replay", dead["dlq_id"], "--to-lane", "bulk")
    assert code == 1 and "is ACCEPTED now" in err


def _report_dead_letter(rig: Rig) -> dict[str, Any]:
    rig.store.r.xadd(rig.store.reports_raw, {"page": b"not json", "src": b"webhook"})
    Processor(ProcessConfig.from_settings(rig.settings), rig.store).process()
    [dead] = [d for d in _dead(rig.store) if d["reason"].startswith("report_")]
    return dead


def test_report_dead_letters_are_not_jobs(rig: Rig, cli: Cli) -> None:
    """A report dead letter is never replayed, even with --force: the refusal says it is a report;
    replay --all replays the jobs beside it and exits 1 for what it left."""
    report = _report_dead_letter(rig)
    code, _, err = cli("dlq", "replay", report["dlq_id"], "--force")
    assert code == 1
    assert f"{report['dlq_id']} ({report['reason']})" in err and "not a job" in err
    job = {"to": "41790000001", "text": "hi"}
    rig.store.r.xadd(rig.store.outbox("marketing"), {"job": orjson.dumps(job)})
    rig.dispatcher.sweep_unknown_lanes()
    code, out, err = cli("dlq", "replay", "--all", "--to-lane", "bulk")
    assert code == 1
    assert "replayed 1" in out and "not a job" in err
    assert [d["dlq_id"] for d in _dead(rig.store)] == [report["dlq_id"]]


def test_purge_all_asks_first(rig: Rig, cli: Cli) -> None:
    """purge --all asks on a terminal; with no terminal it refuses unless --yes; ids purge at once."""
    _invalid_job(rig)
    _report_dead_letter(rig)
    code, _, err = cli("dlq", "purge", "--all")
    assert code == 1 and "--yes" in err and len(_dead(rig.store)) == 2
    code, out, err = cli("dlq", "purge", "--all", stdin=_Terminal("n\n"))
    assert code == 1 and "purge 2 dead letter(s)" in out and len(_dead(rig.store)) == 2
    code, out, err = cli("dlq", "purge", "--all", "--reason", "invalid_job", stdin=_Terminal("y\n"))
    assert code == 0 and "purged 1" in out and len(_dead(rig.store)) == 1
    code, out, err = cli("dlq", "purge", "--all", "--yes")
    assert code == 0 and "purged 1" in out and _dead(rig.store) == []


def test_unknown_ids_and_ambiguous_selections_are_refused(rig: Rig, cli: Cli) -> None:
    """A typo in an id is an error (nothing done), and so are ids together with --all."""
    dead = _invalid_job(rig)
    code, _, err = cli("dlq", "purge", dead["dlq_id"], "no-such-id")
    assert code == 1 and "no-such-id" in err and len(_dead(rig.store)) == 1
    code, _, err = cli("dlq", "purge", dead["dlq_id"], "--all", "--yes")
    assert code == 2 and "not both" in err and len(_dead(rig.store)) == 1
    code, out, err = cli("dlq", "purge", dead["dlq_id"])
    assert code == 0 and "purged 1" in out
