"""The store layer: the only code that talks to Redis. One module per domain, one `Store` for all.

    keys.py        every key name (the one catalogue)
    resp.py        the hand-packed RESP path for the calls that carry work per message
    base.py        the client, the Lua scripts, `connect`
    outbox.py      outbox streams: enqueue, claim, recover
    messages.py    message hashes: producer ids, submit, absent verdicts, settle
    lanes.py       dispatcher slots, kicks, pauses, leases
    limiter.py     the rate limiter's buckets
    streams.py     consumer groups on other streams (the events relay)
    reports.py     report pages, parked reports, counters, the logs lookup
    deadletters.py the dead-letter stream
    schedule.py    the lanes' schedules (send_at), moving due jobs, the atomic cancel
    ops.py         status snapshots, heartbeats, the instance marker
    policy.py      the lanes' counted traffic guards as submit.lua takes them; the day's spend
    lookup.py      where one message is (its hash, or its outbox entry): the clients' `status`
    trace.py       the reads of `sms-worker trace`: a record, the entries its trail names, the --to scans
    suppression.py the suppression list (opt-outs): one set of numbers in normal form
    campaigns.py   campaign counters: list, read and prune them; a campaign's cancellable jobs
    aio.py         `AsyncStore`, the asyncio producer client's store (not joined into `Store`)

`Store` joins the domains the way redis-py's `Redis` joins its command groups (one class per group,
one object for the caller). redis-py's errors become StoreError at this boundary (`redis_errors`);
no module outside this package imports redis for commands (tests/unit/test_layout.py checks it).
"""

from __future__ import annotations

from worker.store.base import SCRIPT_CHUNK, connect, consumer_name
from worker.store.campaigns import CampaignOps
from worker.store.deadletters import DeadLetterOps
from worker.store.lanes import LaneOps
from worker.store.limiter import LimiterOps
from worker.store.messages import (
    FENCE_MARGIN_MS,
    GUARD_ANSWERS,
    AbsentVerdict,
    MessageOps,
    Outcome,
    SubmitAnswer,
    Submitted,
    Verdict,
)
from worker.store.ops import OperationsOps
from worker.store.outbox import DISPATCH_GROUP, ENQUEUE_CHUNK, Claim, ClaimKind, Entry, OutboxOps, campaign_spec
from worker.store.policy import PolicyOps
from worker.store.reports import ReportOps
from worker.store.resp import redis_errors
from worker.store.schedule import CancelAnswer, CancelOutcome, ScheduleOps, cancel_steps
from worker.store.streams import StreamOps
from worker.store.suppression import SuppressionOps
from worker.store.trace import TraceOps

__all__ = [
    "DISPATCH_GROUP", "ENQUEUE_CHUNK", "FENCE_MARGIN_MS", "GUARD_ANSWERS", "SCRIPT_CHUNK", "AbsentVerdict",
    "CancelAnswer", "CancelOutcome", "Claim", "ClaimKind", "Entry", "Outcome", "ScheduleOps", "Store", "SubmitAnswer",
    "Submitted", "Verdict", "campaign_spec", "cancel_steps", "connect", "consumer_name", "redis_errors",
]


class Store(OutboxOps, MessageOps, ScheduleOps, LaneOps, LimiterOps, StreamOps, ReportOps, DeadLetterOps,
            OperationsOps, TraceOps, CampaignOps, SuppressionOps, PolicyOps):
    """Typed operations over one Redis database, each one round trip."""
