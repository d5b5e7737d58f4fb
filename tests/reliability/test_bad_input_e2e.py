"""Raw outbox entries of every wrong kind, mixed into a normal run through the real worker processes.

tests/unit/test_bad_input.py checks the parsing of such entries in-process (hypothesis); here they
go through Redis, Dramatiq and the dispatchers: each must end in the dead-letter store with its
reason and a `failed` event, while the worker processes stay up and the normal jobs of both lanes,
queued before, between and after them, are all sent.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import orjson
import pytest

from tests.reliability.harness import (
    LANES,
    Row,
    Size,
    System,
    assert_promises,
    jobs,
    poll,
    running,
    verify,
    wait_settled,
)

PHONE = "41793026727"
# (what is wrong, the entry's fields): written with plain XADD, as a producer in another language would.
BAD_ENTRIES: list[tuple[str, dict[str, Any]]] = [
    ("not JSON", {"job": b"{not json"}),
    ("not UTF-8", {"job": b"\xff\xfe\x00\x81garbage"}),
    ("JSON array", {"job": b'["41793026727", "hello"]'}),
    ("JSON string", {"job": b'"hello"'}),
    ("JSON null", {"job": b"null"}),
    ("JSON number", {"job": b"42"}),
    ("empty object", {"job": b"{}"}),
    ("empty job field", {"job": b""}),
    ("no job field", {"payload": orjson.dumps({"to": PHONE, "text": "hi"})}),
    ("to is a number", {"job": orjson.dumps({"to": int(PHONE), "text": "hi"})}),
    ("text is a list", {"job": orjson.dumps({"to": PHONE, "text": ["hi"]})}),
    ("text is blank", {"job": orjson.dumps({"to": PHONE, "text": "   "})}),
    ("metadata is a string", {"job": orjson.dumps({"to": PHONE, "text": "hi", "metadata": "m"})}),
    ("validity is a string", {"job": orjson.dumps({"to": PHONE, "text": "hi", "validity_period": "soon"})}),
    ("id is a number", {"job": orjson.dumps({"to": PHONE, "text": "hi", "id": 7})}),
    ("not a phone number", {"job": orjson.dumps({"to": "call me", "text": "hi"})}),
    ("text and binary", {"job": orjson.dumps({"to": PHONE, "text": "hi", "binary": {"hex": "0f"}})}),
    ("neither text nor binary", {"job": orjson.dumps({"to": PHONE})}),
    ("huge text (200 kB)", {"job": orjson.dumps({"to": PHONE, "text": "x" * 200_000})}),
    ("huge metadata", {"job": orjson.dumps({"to": PHONE, "text": "hi", "metadata": {"k": "v" * 10_000}})}),
    ("unknown option", {"job": orjson.dumps({"to": PHONE, "text": "hi", "colour": "red"})}),
    ("unknown nested option", {"job": orjson.dumps({"to": PHONE, "text": "hi", "validity_period": {"amount": 5,
                                                                                                  "units": "X"}})}),
    ("wrong format version", {"job": orjson.dumps({"to": PHONE, "text": "hi", "v": 2})}),
    ("JSON nested 5,000 deep", {"job": b'{"to": "41793026727", "text": "hi", "metadata": ' + b'{"a": ' * 5000
                                + b"1" + b"}" * 5001}),
]


# JSON objects that claim to come from the Python API (`src api`, so the worker skips its validation)
# but are not valid jobs: a producer in another language copying the API's entries, or an older API.
SPOOFED: list[tuple[str, dict[str, Any]]] = [
    ("src=api, no text", {"job": orjson.dumps({"to": PHONE}), "src": b"api"}),
    ("src=api, to is a number", {"job": orjson.dumps({"to": int(PHONE), "text": "hi"}), "src": b"api"}),
]
SPOOF_LANE = "spoof"


@dataclass
class Mixed:
    """One stack running both tests of this module at once: bad entries in otp/bulk, spoofed ones in `spoof`."""

    system: System
    good: list[str]
    bad: dict[str, str]
    spoof_good: list[str]
    spoofed: dict[str, str]


def _write(system: System, lane: str, entries: list[tuple[str, dict[str, Any]]]) -> dict[str, str]:
    """XADD every entry to `lane`; returns message id -> what is wrong with it."""
    written = {}
    for what, fields in entries:
        entry_id = system.client.xadd(system.store.outbox(lane), fields).decode()
        written[f"{system.store.lane_prefix(lane)}{entry_id}"] = what
    return written


@pytest.fixture(scope="module")
def mixed(size: Size, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mixed]:
    """Normal jobs before, between and after the bad entries, in every lane."""
    lanes = {**LANES, SPOOF_LANE: {"batch_size": 50, "max_wait_ms": 0, "concurrency": 1}}
    n = size.bad_normal_sms
    third = n // 3
    env = {"SMS_LANES": orjson.dumps(lanes).decode()}
    with running(env, seed=size.seed, log_dir=tmp_path_factory.mktemp("bad-input")) as system:
        outbox = system.outbox
        good = [r.message_id for r in outbox.enqueue_many(jobs(third), "bulk")]
        spoof_good = [r.message_id for r in outbox.enqueue_many(jobs(20, n), SPOOF_LANE)]
        bad = _write(system, "bulk", BAD_ENTRIES) | _write(system, "otp", BAD_ENTRIES)
        spoofed = _write(system, SPOOF_LANE, SPOOFED)
        good += [r.message_id for r in outbox.enqueue_many(jobs(third, third), "otp")]
        spoof_good += [r.message_id for r in outbox.enqueue_many(jobs(20, n + 20), SPOOF_LANE)]
        bad |= _write(system, "bulk", BAD_ENTRIES)
        good += [r.message_id for r in outbox.enqueue_many(jobs(n - 2 * third, 2 * third), "bulk")]
        yield Mixed(system, good, bad, spoof_good, spoofed)


def _check_dead_letters(system: System, bad: dict[str, str]) -> list[str]:
    """Problems with the dead letters and `failed` events of the `bad` entries."""
    dead = {d["message_id"]: d for d in system.dead_letters()}
    failed = {e["message_id"]: e for e in system.events() if e["type"] == "failed"}
    problems = []
    for mid, what in bad.items():
        if mid not in dead:
            problems.append(f"{what}: no dead letter")
        elif dead[mid]["reason"] != "invalid_job" or not dead[mid]["detail"]:
            problems.append(f"{what}: dead letter without its reason: {dead[mid]}")
        if failed.get(mid, {}).get("reason") != "invalid_job":
            problems.append(f"{what}: no `failed` event with reason invalid_job")
    return problems


def test_bad_outbox_entries_are_dead_lettered_and_block_nothing(mixed: Mixed, record: Row) -> None:
    """Each bad entry -> a dead letter with its reason and a `failed` event; workers live, good jobs all go."""
    record.suite = "bad input"
    system, good, bad = mixed.system, mixed.good, mixed.bad
    system.triggers.dispatch("bulk")
    took = wait_settled(system, 90)
    verdict = verify(system, good + list(bad))
    crashed = system.dead_processes()
    alive = len(system.workers())
    exceptions = [line for line in system.worker_log_errors() if f"'{SPOOF_LANE}'" not in line]
    record.add(verdict)
    record.fault("bad outbox entries", len(bad))
    record.note = (f"{len(BAD_ENTRIES)} kinds of bad entry, in both lanes; the reports and dead letters counted "
                   "include the `src=api` lane's of the same run")
    assert took is not None, f"the run did not settle (a lane blocked?): {verdict.summary()}"
    assert not crashed and alive == 2, f"worker processes died: {crashed}"
    assert not exceptions, f"unhandled exceptions in the worker logs: {exceptions[:5]}"
    problems = _check_dead_letters(system, bad)
    assert not problems, problems
    assert verdict.outcomes["failed"] == len(bad), verdict.summary()
    assert verdict.outcomes["accepted"] + len(verdict.no_send_event) == len(good), verdict.summary()
    assert_promises(verdict)


def test_an_entry_claiming_to_come_from_the_api_blocks_nothing(mixed: Mixed, record: Row) -> None:
    """A broken job marked `src api` is dead-lettered like any other; the good jobs of its lane are sent."""
    record.suite = "bad input (entries marked src=api)"
    system = mixed.system
    outbox = system.store.outbox(SPOOF_LANE)
    lease_s = float(system.settings.sms_lease_s)
    # Two recoveries of a stuck batch and then some: a lane that works has long finished by then.
    bound_s = 1 + 2 * lease_s
    sent = poll(lambda: int(system.client.xlen(outbox)) == 0, bound_s, interval_s=0.25)
    mine = set(mixed.spoof_good) | set(mixed.spoofed)
    events = [e for e in system.events() if e["message_id"] in mine]
    accepted = {e["message_id"] for e in events if e["type"] == "accepted"}
    failures = [line for line in system.worker_log_errors() if f"'{SPOOF_LANE}'" in line]
    record.trials = 1
    record.jobs = len(mine)
    record.lost = len(set(mixed.spoof_good) - accepted)  # not sent by the end of the test
    record.events = len(events)
    record.fault("outbox entries marked src=api", len(mixed.spoofed))
    if not sent:
        record.note = (f"batch blocked: {len(accepted)}/{len(mixed.spoof_good)} good jobs sent after {bound_s:g} s, "
                       f"{len(failures)} dispatch messages failed with an unhandled exception (one per recovery)")
    assert sent, (
        f"the batch holding the entry is blocked: {len(accepted)}/{len(mixed.spoof_good)} good jobs sent, "
        f"{len(failures)} dispatch messages failed with an unhandled exception, e.g. {failures[:1]}"
    )
    problems = _check_dead_letters(system, mixed.spoofed)
    assert not problems, problems
    assert accepted == set(mixed.spoof_good), f"{len(set(mixed.spoof_good) - accepted)} good jobs not sent"
