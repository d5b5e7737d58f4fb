"""Faults on the delivery-report path, through the real processes: every report reaches one final event.

- a drain leader paused (SIGSTOP) with a page in hand, past its lease, then resumed (SIGCONT);
- Redis out of memory (`maxmemory` + `noeviction`) for a while just as a drained page is to be stored;
- Redis restarted empty (no persistence) while the system runs: reports of messages sent after it;
- poison bodies posted to the webhook (too deep, too big, not JSON, wrong shapes, an unknown status
  group) mixed with the normal flow.

The first two need a page to be on its way at a chosen moment: the workers reach the sandbox through
HoldingProxy, a loopback proxy that can hold back one reports answer the sandbox has already given
out (so the page exists only in the proxy and then in the worker, as with a real pause). A sandbox
knob delaying GET /sms/3/reports would do the same without the proxy.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import orjson

from tests.reliability.harness import (
    API_KEY,
    BASE_ENV,
    BATCH,
    FINAL,
    SANDBOX_FLAGS,
    SEND_OUTCOMES,
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
from worker.devtools.devstack import DevStack
from worker.errors import StoreError

DRAIN_LEASE = "reports-drain"
_HOP_REQUEST = frozenset({"host", "content-length", "connection", "keep-alive", "accept-encoding", "transfer-encoding"})
_HOP_RESPONSE = frozenset({"content-length", "content-encoding", "connection", "keep-alive", "transfer-encoding"})


# --- a proxy that can hold back one reports page ------------------------------------------------------


class HoldingProxy:
    """Forwards every request to the sandbox. Once armed, it holds back the next reports answer that
    carries reports (the sandbox has handed them out already) until released."""

    def __init__(self, upstream: str) -> None:
        self.client = httpx.Client(base_url=upstream, timeout=30, trust_env=False)
        self.armed = threading.Event()
        self.held = threading.Event()
        self.release = threading.Event()
        self.pages = 0  # reports answers with reports, handed to the workers
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                proxy.forward(self)

            do_POST = do_GET

            def log_message(self, *args: Any) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, name="holding-proxy", daemon=True).start()

    def forward(self, handler: BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("content-length") or 0)
        body = handler.rfile.read(length) if length else None
        headers = {k: v for k, v in handler.headers.items() if k.lower() not in _HOP_REQUEST}
        try:
            answer = self.client.request(handler.command, handler.path, content=body, headers=headers)
        except httpx.HTTPError:
            handler.send_error(502)
            return
        content = answer.content
        if handler.path.startswith("/sms/3/reports") and b'"messageId"' in content:
            with self._lock:
                self.pages += 1
                hold = self.armed.is_set()
                self.armed.clear()
            if hold:
                self.held.set()
                self.release.wait(60)
        handler.send_response(answer.status_code)
        for name, value in answer.headers.items():
            if name.lower() not in _HOP_RESPONSE:
                handler.send_header(name, value)
        handler.send_header("Content-Length", str(len(content)))
        handler.end_headers()
        handler.wfile.write(content)

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
        self.client.close()


@contextmanager
def running_behind_proxy(size: Size, log_dir: Path, env: dict[str, str] | None = None) -> Iterator[
        tuple[System, HoldingProxy]]:
    """harness.running with the workers talking to the sandbox through a HoldingProxy, and no clock
    (a test starts it when the scene is set)."""
    with DevStack(env={**BASE_ENV, **(env or {})}, log_dir=log_dir) as stack:
        stack.start_redis()
        sandbox_url = stack.start_sandbox(API_KEY, *SANDBOX_FLAGS, "--seed", str(size.seed))
        proxy = HoldingProxy(sandbox_url)
        stack.env["ICOMM_BASE_URL"] = proxy.url
        system = System(stack, sandbox_url)
        for _ in range(2):
            system.start_worker()
        try:
            yield system, proxy
        finally:
            system.close()
            proxy.close()
            system.kill_all_but_redis()


# --- helpers --------------------------------------------------------------------------------------------


def _log_events(system: System, event: str) -> list[dict[str, Any]]:
    """The worker processes' log lines of `event`, parsed."""
    found = []
    for path in system.stack.log_dir.glob("worker-*.log"):
        for line in path.read_text(errors="replace").splitlines():
            if f'"{event}"' in line:
                with contextlib.suppress(orjson.JSONDecodeError):
                    data = orjson.loads(line)
                    if isinstance(data, dict) and data.get("event") == event:
                        found.append(data)
    return found


def _reports_waiting(system: System, n: int, timeout_s: float) -> None:
    """Wait until the `n` messages were sent and their reports wait, unfetched, at the sandbox."""
    ok = poll(lambda: system.outbox_left() == 0 and system.stats()["reports"]["unfetched"] >= n, timeout_s, 0.1)
    assert ok, f"the scene was not set: {system.stats()['reports']}, outbox {system.outbox_left()}"


def _drain_leader(system: System) -> tuple[int, int]:
    """(pid of the process holding the drain lease, its fencing token)."""
    holder = system.client.get(system.store.lease_key(DRAIN_LEASE))
    token = system.client.get(system.store.fence_key(DRAIN_LEASE))
    assert holder and token, "nobody holds the drain lease while a page is on its way"
    # The holder id is `{hostname}-{pid}:{random}` (worker.store.consumer_name).
    return int(holder.decode().split(":", 1)[0].rsplit("-", 1)[1]), int(token)


def _finals(events: list[dict[str, Any]]) -> Counter[str]:
    """Final report events per message id (send-side events have no done_at)."""
    return Counter(e["message_id"] for e in events if e["type"] in FINAL and e.get("done_at") is not None)


# --- the trials -----------------------------------------------------------------------------------------


def test_a_drain_leader_paused_past_its_lease_loses_no_report(size: Size, record: Row, tmp_path: Path) -> None:
    """SIGSTOP the worker holding the drain lease while the page it was just handed is on its way,
    for longer than the lease (another worker takes the drain over), then SIGCONT: it stores the page
    (processing is idempotent) instead of parking it where nothing reads it, and stops draining."""
    record.suite = "report drain leader paused"
    n = size.crash_sms
    with running_behind_proxy(size, tmp_path) as (system, proxy):
        queued = system.outbox.enqueue_many(jobs(n, prefix="paused"), "bulk")
        _reports_waiting(system, n, size.wait_s(n, 1000))
        proxy.armed.set()
        system.stack.start_clock()
        assert proxy.held.wait(30), "no drain fetched a page"
        pid, token = _drain_leader(system)
        os.kill(pid, signal.SIGSTOP)
        try:
            proxy.release.set()  # the page goes to a process that cannot read it now
            fence = system.store.fence_key(DRAIN_LEASE)
            taken_over = poll(lambda: int(system.client.get(fence) or 0) > token, 30, 0.05)
        finally:
            os.kill(pid, signal.SIGCONT)
        record.fault("SIGSTOP of the drain leader past its lease")
        took = wait_settled(system, 30 + n / 100)
        verdict = verify(system, [r.message_id for r in queued])
        lease_lost = _log_events(system, "reports_drain_lease_lost")
        fenced_dead = [d for d in system.dead_letters() if d.get("reason") == "drain_fenced"]
    record.add(verdict)
    record.note = f"the paused leader's page: {lease_lost[0]['reports'] if lease_lost else '?'} reports"
    assert taken_over, "no other worker took the drain over while the leader was paused"
    assert not fenced_dead, f"{len(fenced_dead)} drained pages parked as drain_fenced dead letters: {verdict.summary()}"
    assert took is not None, f"the run did not settle: {verdict.summary()}"
    assert_promises(verdict)
    assert lease_lost and all(e.get("level") == "error" for e in lease_lost), "the resumed leader did not say so"
    assert verdict.dead_letters == 0, verdict.summary()


def test_redis_out_of_memory_while_a_page_is_stored_loses_no_report(size: Size, record: Row, tmp_path: Path) -> None:
    """Redis reaches maxmemory (noeviction) just as a drained page is to be stored, and stays full
    for longer than any quick retry: the page waits in the worker's memory, nothing more is fetched
    meanwhile, and it is stored once the limit is lifted."""
    record.suite = "redis out of memory during a drain"
    n = size.crash_sms
    full_for_s = 5.0 if size.mode == "short" else 40.0  # under Dramatiq's 60 s time limit of an actor
    with running_behind_proxy(size, tmp_path) as (system, proxy):
        queued = system.outbox.enqueue_many(jobs(n, prefix="oom"), "bulk")
        _reports_waiting(system, n, size.wait_s(n, 1000))
        proxy.armed.set()
        system.stack.start_clock()
        assert proxy.held.wait(30), "no drain fetched a page"
        system.client.config_set("maxmemory-policy", "noeviction")
        system.client.config_set("maxmemory", 1)
        try:
            pages_at_full = proxy.pages
            proxy.release.set()

            def waited_long_enough() -> bool:
                # The worker's own account of how long the page has been refused (before the fix it
                # gave up after ~3 s: reports_page_lost).
                held = [e.get("held_s", 0) for e in _log_events(system, "reports_page_store_retry")]
                return max(held, default=0) >= full_for_s or bool(_log_events(system, "reports_page_lost"))

            poll(waited_long_enough, full_for_s + 30, 0.25)
            pages_while_full = proxy.pages - pages_at_full
        finally:
            system.client.config_set("maxmemory", 0)
        record.fault(f"redis at maxmemory {full_for_s:g} s")
        took = wait_settled(system, 30 + n / 100)
        verdict = verify(system, [r.message_id for r in queued])
        lost = sum(e.get("reports", 0) for e in _log_events(system, "reports_page_lost"))
        stored = _log_events(system, "reports_page_stored")
    record.add(verdict)
    record.note = (f"a page of {stored[0]['reports']} reports waited {stored[0]['held_s']} s in a worker's memory"
                   if stored else f"{lost} reports given up")
    assert lost == 0, f"the drain gave up a page of {lost} reports: {verdict.summary()}"
    assert pages_while_full == 0, f"{pages_while_full} more pages were fetched while one was still unstored"
    assert took is not None, f"the run did not settle: {verdict.summary()}"
    assert_promises(verdict)
    assert stored, "no worker logged reports_page_stored: the page was never refused?"


def test_redis_restarted_empty_does_not_stop_report_processing(size: Size, record: Row, tmp_path: Path) -> None:
    """Redis restarted without persistence while the system runs: the processors' consumer group is
    gone with everything else. Reports of messages sent after the restart are all processed (before:
    every read failed with NOGROUP, 0 of N)."""
    record.suite = "redis restarted empty: reports"
    n = size.restart_sms
    # One worker process: its processor has certainly read the group before the restart (with two,
    # Dramatiq's idle backoff may leave all report work to one of them).
    with running(seed=size.seed, log_dir=tmp_path, workers=1) as system:
        before = system.outbox.enqueue_many(jobs(100, prefix="before"), "bulk")
        assert poll(lambda: len(_finals(system.events())) >= len(before), 60, 0.25), "the first reports never came"

        [server] = [p for p in system.stack.procs if p.name == "redis" and p.alive()]
        server.stop()
        system.stack.start_redis(port=system.stack.redis_port)  # no AOF, no RDB: empty
        record.fault("redis restarted empty")
        assert poll(lambda: int(system.client.dbsize()) < 50, 10, 0.1), "Redis came back with its data"

        mids = []
        for start in range(0, n, 500):
            chunk = jobs(min(500, n - start), start, prefix="after")
            deadline = time.monotonic() + 30
            while True:
                try:
                    mids += [r.message_id for r in system.outbox.enqueue_many(chunk, "bulk")]
                    break
                except StoreError:  # a connection that died with the old server; producer ids make a retry safe
                    assert time.monotonic() < deadline, "could not enqueue after the restart"
                    time.sleep(0.05)

        def all_reported() -> bool:
            finals = _finals(system.events())
            return sum(1 for mid in mids if finals[mid]) >= len(mids)

        done = poll(all_reported, 30 + n / 50, 0.5)
        events = system.events()
        finals = _finals(events)
        sends = Counter(e["message_id"] for e in events if e["type"] in SEND_OUTCOMES and e.get("done_at") is None)
        stats = system.stats(per_message=True)
        lost_state = [e for e in _log_events(system, "redis_state_lost") if "reports" in str(e.get("missing"))]
    processed = sum(1 for mid in mids if finals[mid])
    record.jobs = len(mids)
    record.reports = sum(1 for mid in mids if mid in stats["accepted_per_message_id"])
    record.report_events = sum(finals[mid] for mid in mids)
    record.events = len(events)
    record.lost = sum(1 for mid in mids if not sends[mid] and not finals[mid])
    record.duplicated = sum(1 for mid in mids if stats["accepted_per_message_id"].get(mid, 0) > 1)
    record.note = f"{processed} of {len(mids)} reports of messages sent after the restart processed"
    assert done, f"only {processed} of {len(mids)} reports sent after the restart were processed"
    assert all(finals[mid] == 1 for mid in mids), "a report gave more than one final event"
    assert all(sends[mid] <= 1 for mid in mids), "a message got two send outcomes"
    assert record.duplicated == 0
    assert lost_state and all(e.get("level") == "error" for e in lost_state), "the lost consumer group was not reported"


def _poison(system: System, real: list[str]) -> list[tuple[str, bytes, int]]:
    """(what, body, expected status) of each poison call; `real` are message ids of the normal flow."""
    report = {"messageId": "poison-1", "to": "41790000001", "doneAt": "2026-11-27T10:00:02.000+0000",
              "status": {"groupId": 3, "groupName": "DELIVERED", "id": 5, "name": "DELIVERED_TO_HANDSET"}}

    def nested(levels: int, opener: bytes = b'{"a": ', closer: bytes = b"}") -> bytes:
        return opener * levels + b"1" + closer * levels

    def with_field(name: str, raw_value: bytes) -> bytes:
        """A body holding `report` plus the field `name`: 3 levels + those of `raw_value`."""
        return b'{"results": [' + orjson.dumps(report)[:-1] + b', "' + name.encode() + b'": ' + raw_value + b"}]}"

    cap = system.settings.sms_webhook_max_body_bytes
    # Not final and not known: must never be guessed into DELIVERED (its groupId is DELIVERED's).
    scheduled = [{**report, "messageId": mid, "status": {"groupId": 3, "groupName": "SCHEDULED", "id": 99,
                                                         "name": "SCHEDULED_ACCEPTED"}} for mid in real]
    return [
        ("price nested 300 deep", with_field("price", nested(300)), 400),
        ("33 levels in all", with_field("price", nested(30)), 400),
        ("lists nested 300 deep", with_field("extra", nested(300, b"[", b"]")), 400),
        ("nested 5,000 deep", with_field("price", nested(5000)), 400),
        ("bigger than the cap", b'{"results": [' + orjson.dumps({**report, "callbackData": "x" * cap}) + b"]}", 413),
        ("not JSON", b"<html><body>502 Bad Gateway</body></html>", 400),
        ("truncated JSON", orjson.dumps({"results": [report]})[:-7], 400),
        ("a list", b"[]", 400),
        ("results not a list", b'{"results": {"messageId": "poison-1"}}', 400),
        # A malformed report in a good envelope is dead-lettered and the call answered 200, so the
        # provider does not retry (and finally drop) the good reports sent with it.
        ("a report that is a string", b'{"results": ["poison-1"]}', 200),
        ("messageId a number", b'{"results": [{"messageId": 7}]}', 200),
        ("price a string", orjson.dumps({"results": [{**report, "price": "free"}]}), 200),
        ("unknown status group, real messages", orjson.dumps({"results": scheduled}), 200),
    ]


def test_poison_webhook_bodies_block_no_report(size: Size, record: Row, tmp_path: Path) -> None:
    """Poison posted to the webhook between the normal flow's reports: each is refused (4xx) or kept
    aside, and every legitimate report is processed, once; no batch waits behind one."""
    record.suite = "poison webhook bodies"
    n = size.bad_normal_sms
    third = n // 3
    # The normal flow lasts ~15 s, longer than CLAIM_IDLE_MS: a poison page a processor failed on is
    # then taken up again by every later run first, which is how one page blocked all of them.
    rate = max(20, n // 15)
    # The secret in the path: the mode in which the sandbox can push the normal flow's reports.
    env = {"SMS_WEBHOOK_AUTH": "path", "SMS_RATE_LIMIT_MPS": str(rate), "SMS_RATE_LIMIT_BURST_S": str(BATCH / rate)}
    answers: Counter[str] = Counter()
    problems = []
    with running(env, seed=size.seed, log_dir=tmp_path, web=True) as system:
        url = f"{system.web_url}{system.settings.sms_webhook_path}/{system.settings.webhook_secret()}"
        headers = {"content-type": "application/json"}
        queued = []
        for i, start in enumerate((0, third, 2 * third)):
            batch = system.outbox.enqueue_many(jobs(third if i < 2 else n - 2 * third, start, prefix="flow"), "bulk")
            queued += batch
            for what, body, expected in _poison(system, [r.message_id for r in batch[:5]]):
                status = system.http.post(url, content=body, headers=headers).status_code
                answers[f"{status}"] += 1
                if status != expected:
                    problems.append(f"{what}: answered {status}, expected {expected}")
        record.fault("poison webhook bodies", sum(answers.values()))
        took = wait_settled(system, size.wait_s(n, rate))
        verdict = verify(system, [r.message_id for r in queued])
        guessed = [e for e in system.events() if (e.get("status") or {}).get("groupName") == "SCHEDULED"]
        reasons = Counter(d.get("reason") for d in system.dead_letters())
        crashes = system.worker_log_errors()
        stuck = int(system.client.xlen(system.store.reports_raw))  # stored, never acknowledged
    record.add(verdict)
    record.note = (f"webhook answers to the poison: {dict(answers)}; dead letters: {dict(reasons)}; "
                   f"raw pages left unprocessed: {stuck}")
    assert took is not None and not stuck, f"{stuck} raw pages stuck, never processed: {verdict.summary()}"
    assert not problems, problems
    assert not guessed, f"{len(guessed)} unknown-status reports were taken for final ones"
    assert_promises(verdict)
    assert reasons == {"report_unknown_status": 15, "report_malformed": 9}, reasons
    assert not crashes, f"unhandled exceptions in the worker logs: {crashes[:3]}"
