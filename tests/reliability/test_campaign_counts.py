"""Campaign counters through SIGKILLed workers: after recovery they equal a recount of the messages, exactly.

One campaign is sent at a limited rate: most of it queued by the producer API (counted at enqueue),
some of it scheduled a few seconds ahead, some written with plain XADD (counted when first recorded),
and one counted entry left behind as a repeat by a producer that "died" before deleting it. Worker
processes are SIGKILLed at the crash suite's moments (claim, mid-POST, after the provider accepted but
before the worker knew, while reports drain) and replaced. When the run has settled, every counter
must equal a recount of the messages' own records, `total` the campaign's messages, `sent` the
messages the provider accepted, and the campaign must be complete; the crash suite's promises (nothing
lost, nothing sent twice, one final event per report) hold as well.
"""

from __future__ import annotations

import random
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson

from tests.integration.test_campaigns import assert_counts_agree
from tests.reliability.harness import BATCH, Row, Size, assert_promises, jobs, poll, running, verify, wait_settled
from tests.reliability.test_worker_crashes import MOMENTS, VALIDITY, kill_at_moments
from worker.devtools.devstack import Proc

CAMPAIGN = "reliability"
SCHEDULED_LEAD_S = 2.0


def _moments(size: Size, rng: random.Random) -> list[str]:
    """Short runs: claim, then the two around a POST; full runs every moment, twice, in a seeded order."""
    if size.mode != "full":
        return ["claim", "mid_post", "after_post"]
    rest = [*MOMENTS[1:], *MOMENTS]
    rng.shuffle(rest)
    return ["claim", *rest]


def test_campaign_counters_equal_the_recount_after_sigkilled_workers(size: Size, record: Row, tmp_path: Path) -> None:
    record.suite = "campaign counters: worker crashes"
    rng = random.Random(f"{size.seed}:campaign-counts")
    n, rate = size.crash_sms, size.crash_rate
    env = {"SMS_RATE_LIMIT_MPS": str(rate), "SMS_RATE_LIMIT_BURST_S": str(BATCH / rate), "SMS_NO_REPORT_GRACE_S": "0"}
    killed: list[Proc] = []
    missed: list[str] = []
    with running(env, seed=size.seed, log_dir=tmp_path) as system:
        store = system.store
        base = [{**job, "validity_period": VALIDITY, "campaign_reference_id": CAMPAIGN}
                for job in jobs(n, prefix="cc")]
        scheduled_n, raw_n = n // 10, n // 20
        due = (datetime.now(UTC) + timedelta(seconds=SCHEDULED_LEAD_S)).isoformat()
        held = system.outbox.enqueue_many([{**job, "send_at": due} for job in base[:scheduled_n]], "bulk")
        raw = [store.r.xadd(store.outbox("bulk"), {"job": orjson.dumps({k: v for k, v in job.items() if k != "id"})})
               for job in base[scheduled_n : scheduled_n + raw_n]]
        queued = system.outbox.enqueue_many(base[scheduled_n + raw_n :], "bulk")
        # A producer that counted an entry and died before deleting it as a repeat of an earlier id.
        with store.r.pipeline() as pipe:
            pipe.xadd(store.outbox("bulk"), {"job": orjson.dumps(base[-1]), "c": CAMPAIGN,
                                             "mid": f"{store.lane_prefix('bulk')}{int(time.time() * 1000)}-pdead0"})
            pipe.hincrby(store.campaign(CAMPAIGN), "total", 1)
            pipe.hincrby(store.campaign(CAMPAIGN), "queued", 1)
            pipe.execute()
        mids = [*((q.lane, q.message_id) for q in (*held, *queued)),
                *(("bulk", store.lane_prefix("bulk") + entry.decode()) for entry in raw)]
        assert len(mids) == n

        kill_at_moments(system, _moments(size, rng), rng, record, killed, missed)

        took = wait_settled(system, size.wait_s(n, rate) + SCHEDULED_LEAD_S)
        complete = poll(lambda: (c := store.campaign_counts(CAMPAIGN)) is not None and c.complete, 30, 0.1)
        verdict = verify(system, [mid for _, mid in mids])
        record.add(verdict)
        crashed = system.dead_processes(killed)
        counted = store.campaign_counts(CAMPAIGN)
        assert took is not None, f"the run did not settle: {verdict.summary()}"
        assert counted is not None
        assert complete, f"campaign not complete after the run settled: {counted}"
        assert_counts_agree(store, CAMPAIGN, mids)
        assert counted.sent == verdict.accepted_at_provider, (counted, verdict.summary())
    record.note = (f"{scheduled_n} scheduled, {raw_n} plain XADD, 1 counted repeat left by a dead producer; "
                   f"counters == recount")
    if missed:
        record.note += f"; moments not reached (killed anyway): {', '.join(missed)}"
    assert not crashed, f"processes died that nobody killed: {crashed}"
    assert_promises(verdict)
    assert verdict.dead_letters == 0, verdict.summary()
    assert not missed, f"the run never reached: {missed}"
