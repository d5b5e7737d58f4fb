"""Delivery reports as deployed: Redis, the sandbox, 2 workers, clocks and the web process, all real processes."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import orjson

from tests.support.system import API_KEY, System, running
from worker.devtools.devstack import wait_until

FINAL = frozenset({"delivered", "undeliverable", "expired", "rejected"})
ENV = {"ICOMM_SEND_RETRY_ATTEMPTS": "3", "SMS_WEBHOOK_AUTH": "basic"}
SANDBOX = ("--report-delay-ms", "300", "--seed", "11")


def send_direct(system: System, n: int) -> list[str]:
    """SMS sent straight to the sandbox without a webhook (their reports come by drain), recorded as
    accepted the way the dispatcher records them."""
    mids = [f"direct-{i}" for i in range(n)]
    messages = [{"destinations": [{"to": f"4178{i:07d}", "messageId": mid}], "content": {"text": "direct"}}
                for i, mid in enumerate(mids)]
    for i, mid in enumerate(mids):
        job = orjson.dumps({"to": f"4178{i:07d}", "text": "direct", "id": f"direct-{i}", "metadata": {"i": i}})
        system.client.hset(system.store.msg(mid), mapping={"state": "ACCEPTED", "lane": "bulk", "job": job})
    response = httpx.post(f"{system.sandbox_url}/sms/3/messages", json={"messages": messages},
                          headers={"Authorization": f"App {API_KEY}"}, timeout=10)
    response.raise_for_status()
    return mids


def wait_for_every_report(system: System, timeout_s: float, sent: int) -> dict[str, Any]:
    """Until the sandbox has accepted all `sent` messages, generated and handed out every report and
    each has its final event. (Without `sent`, a moment when every report so far was in, while a
    slow batch was still on its way, passed for the end: seen on a loaded machine, 2,200 of 2,500.)"""

    def done() -> bool:
        stats = system.stats()
        reports = stats["reports"]
        handed_out = reports["fetched"] + reports["pushed"]
        finals = sum(1 for e in system.events() if e["type"] in FINAL)
        return bool(stats["messages_accepted"] >= sent and reports["pending"] == 0
                    and reports["generated"] == stats["messages_accepted"]
                    and handed_out == reports["generated"] and finals >= reports["generated"])

    try:
        wait_until(done, timeout_s, "every report to reach its final event", interval_s=0.25)
    except TimeoutError:
        print(system.stats())
        print(system.stack.logs())
        raise
    return system.stats()


@contextmanager
def reporting(workers: int = 2, clocks: int = 2) -> Iterator[System]:
    """A system with the webhook configured and reports generated 300 ms after each send."""
    with running(ENV, SANDBOX, workers=workers, clocks=clocks, web=True) as system:
        yield system


def _jobs(n: int, start: int = 0) -> list[dict[str, Any]]:
    return [{"to": f"4179{start + i:07d}", "text": f"hello {start + i}", "id": f"order-{start + i}",
             "metadata": {"n": start + i}} for i in range(n)]


def _assert_exactly_once(events: list[dict[str, Any]], expected_ids: set[str], generated: int) -> None:
    finals = [e for e in events if e["type"] in FINAL]
    assert len({e["event_id"] for e in events}) == len(events), "an event_id appeared twice"
    per_message = Counter(e["message_id"] for e in finals)
    assert set(per_message) == expected_ids
    assert set(per_message.values()) == {1}, "a message got two final events"
    assert len(finals) == generated


def test_every_report_by_webhook_or_drain_reaches_exactly_one_final_event() -> None:
    """2,000 SMS with the webhook and 500 without, two clocks: each report the sandbox generated -> one final event."""
    with reporting() as system:
        queued = system.outbox.enqueue_many(_jobs(1800), "bulk") + system.outbox.enqueue_many(
            _jobs(200, start=1800), "otp")
        direct = send_direct(system, 500)
        stats = wait_for_every_report(system, 35, sent=2500)
        events = system.events()
        dead = system.client.xlen(system.store.dlq)
        leaders = [p.name for p in system.stack.procs
                   if p.name.startswith("clock") and '"leader": true' in p.log_path.read_text()]

    reports = stats["reports"]
    assert stats["messages_accepted"] == 2500 and stats["duplicates"] == 0
    assert reports["pushed"] == 2000 and reports["fetched"] == 500  # both paths were used
    assert stats["webhooks"]["dropped"] == 0 and stats["webhooks"]["refused"] == 0
    _assert_exactly_once(events, {r.message_id for r in queued} | set(direct), reports["generated"])
    by_id = {e["message_id"]: e for e in events if e["type"] in FINAL}
    sample = by_id[queued[7].message_id]
    assert sample["id"] == "order-7" and sample["metadata"] == {"n": 7} and sample["price"]["currency"] == "EUR"
    assert Counter(e["type"] for e in by_id.values())["delivered"] > 2000
    assert dead == 0
    assert len(leaders) == 1, f"two clocks led at once: {leaders}"  # so only one sent the drains


# Run in a child process with the stack's environment: drain the reports endpoint (the pages go to the
# raw stream), read the pages as a processor, and die by SIGKILL at the moment it would apply them.
DOOMED = """
import os, signal
from worker.provider import Provider, ProviderConfig
from worker.reports import DrainConfig, Drainer, ProcessConfig, Processor
from worker.settings import load_settings
from worker.producer import connect_store

settings = load_settings()
store = connect_store(settings)
with Provider(ProviderConfig.from_settings(settings)) as provider:
    print(Drainer(DrainConfig.from_settings(settings), store, provider).drain(), flush=True)
processor = Processor(ProcessConfig.from_settings(settings), store, consumer="doomed")
processor.state.apply = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)
processor.process()
"""


def test_a_worker_killed_right_after_the_reports_get_loses_none() -> None:
    """A process SIGKILLed after its GET and read, before applying: the workers recover every page, once."""
    with reporting(clocks=0) as system:
        # Only reports for the drain: webhook traffic would wake the workers' processors, which
        # could then take the doomed process's pages before it reads them (seen under load).
        direct = send_direct(system, 1500)  # by drain: nobody drains until the doomed process does
        wait_until(lambda: system.stats()["reports"]["unfetched"] == 1500, 20, "1,500 reports to fetch")

        doomed = subprocess.run([sys.executable, "-c", DOOMED], env=system.stack.env, capture_output=True,
                                timeout=60, check=False)

        assert doomed.returncode == -signal.SIGKILL, doomed.stderr.decode()[-2000:]
        assert "outcome='drained', pages=2, reports=1500" in doomed.stdout.decode()
        assert system.stats()["reports"]["unfetched"] == 0  # gone from the provider for good
        pending = system.client.xpending(f"{system.store.reports_raw}", "reports")
        assert pending["pending"] == 2 and {c["name"] for c in pending["consumers"]} == {b"doomed"}
        system.stack.start_clock()  # wakes the processors; they take the pages over once stale
        stats = wait_for_every_report(system, 40, sent=1500)
        events = system.events()

    _assert_exactly_once(events, set(direct), stats["reports"]["generated"])
