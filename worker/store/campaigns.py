"""Campaign counters: listing and reading them, and finding a campaign's jobs that may still be cancelled.

The counters are written by the scripts that change message states (worker/lua/lib/ledger.lua)
and by the producer's enqueue (worker/store/outbox.py); nothing here writes them. Readers prune
`{p}:campaigns` members whose hash has expired.

`campaign_job_ids` finds the jobs a campaign cancel may still stop: members of the lanes'
schedules whose message hash names the campaign, and outbox entries no dispatcher has been handed
yet (after the dispatch group's last-delivered id) that name it (field `c`, or the job's
campaign_reference_id for a plain XADD). `cancel_each` then cancels them one message at a time
through the same steps and script as any cancel (worker.store.schedule.cancel_steps, cancel.lua),
many messages' steps sent together per round trip: each decision stays atomic against the
dispatcher's submit.lua.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
import redis

from worker.campaigns import Campaign
from worker.store import resp
from worker.store.base import StoreBase, is_nogroup
from worker.store.keys import Keys
from worker.store.outbox import DISPATCH_GROUP
from worker.store.schedule import CancelAnswer, cancel_steps

# Reads per round trip, and how many schedule members or outbox entries one search reads at most
# per lane (a search must not walk a backlog of millions unbounded).
PAGE = 1000
SEARCH_MAX = 1_000_000
# Messages whose cancel steps go together, one command each per round trip.
CANCEL_BATCH = 200


@dataclass(frozen=True, slots=True)
class CampaignJobs:
    """A campaign's jobs that may still be cancelled: (lane, message id) pairs."""

    scheduled: list[tuple[str, str]] = field(default_factory=list)
    queued: list[tuple[str, str]] = field(default_factory=list)
    truncated: bool = False  # a lane held more than SEARCH_MAX members or entries: search again after

    @property
    def message_ids(self) -> list[str]:
        return [mid for _, mid in self.scheduled] + [mid for _, mid in self.queued]


def _pairs(reply: Any) -> dict[bytes, bytes]:
    """HGETALL's reply as a dict: a RESP3 map already, or RESP2's flat list of fields and values."""
    if isinstance(reply, dict):
        return reply
    return {reply[i]: reply[i + 1] for i in range(0, len(reply), 2)}


def _names(job: bytes, campaign: str) -> bool:
    """Whether a job's JSON has campaign_reference_id == `campaign` (parsed only when it may)."""
    if b'"campaign_reference_id"' not in job:
        return False
    try:
        parsed = orjson.loads(job)
    except orjson.JSONDecodeError:
        return False
    return isinstance(parsed, dict) and parsed.get("campaign_reference_id") == campaign


def campaign_steps(keys: Keys, campaign_id: str) -> Generator[tuple[Any, ...], Any, Campaign | None]:
    """One campaign's counters as sans-I/O steps, for another client (the asyncio one)."""
    fields = yield ("HGETALL", keys.campaign(campaign_id))
    if not fields:
        return None
    return Campaign.from_fields(campaign_id, _pairs(fields))


class CampaignOps(StoreBase):
    # --- reading the counters --------------------------------------------------------------------
    def list_campaigns(self, limit: int = 1000) -> list[Campaign]:
        """The most recently updated campaigns first (at most `limit`), with their counts; members
        whose hash has expired are pruned from {p}:campaigns."""
        with resp.redis_errors():
            ids = [raw.decode() for raw in self.r.zrevrange(self.campaigns, 0, max(0, limit - 1))]
        if not ids:
            return []
        replies = self.pipeline([(b"HGETALL", self.campaign(cid)) for cid in ids])
        found = [Campaign.from_fields(cid, _pairs(flat)) for cid, flat in zip(ids, replies, strict=True) if flat]
        gone = [cid for cid, flat in zip(ids, replies, strict=True) if not flat]
        if gone:
            self._prune(gone)
        return found

    def campaign_counts(self, campaign_id: str) -> Campaign | None:
        """One campaign's counters, None when it has none (never counted here, or expired)."""
        with resp.redis_errors():
            fields = self.r.hgetall(self.campaign(campaign_id))
        return Campaign.from_fields(campaign_id, fields) if fields else None

    def _prune(self, campaign_ids: Sequence[str]) -> None:
        """Drop index members whose hash is gone, unless one is written again meanwhile (WATCH:
        the writers create the hash and index it in one atomic call)."""
        keys = [self.campaign(cid) for cid in campaign_ids]
        with resp.redis_errors(), self.r.pipeline() as pipe:
            try:
                pipe.watch(*keys)
                gone = [cid for cid, key in zip(campaign_ids, keys, strict=True) if not pipe.exists(key)]
                if gone:
                    pipe.multi()
                    pipe.zrem(self.campaigns, *gone)
                    pipe.execute()
            except redis.WatchError:
                pass  # a campaign came back while we looked: the next reader prunes what is still gone

    # --- a campaign's jobs, for cancel -------------------------------------------------------------
    def campaign_job_ids(self, campaign_id: str, lanes: Sequence[str]) -> CampaignJobs:
        """The campaign's scheduled jobs and its queued jobs no dispatcher has claimed, per lane."""
        jobs = CampaignJobs()
        truncated = False
        for lane in dict.fromkeys(lanes):
            truncated = self._scheduled_of(campaign_id, lane, jobs.scheduled) or truncated
            truncated = self._unclaimed_of(campaign_id, lane, jobs.queued) or truncated
        return CampaignJobs(jobs.scheduled, jobs.queued, truncated)

    def _scheduled_of(self, campaign_id: str, lane: str, out: list[tuple[str, str]]) -> bool:
        """Append the lane's scheduled jobs of the campaign to `out`; True if the search was cut.
        ZSCAN returns every member present for the whole scan, while due.lua moves others out."""
        cursor, read, wanted = 0, 0, campaign_id.encode()
        while True:
            with resp.redis_errors():
                cursor, pairs = self.r.zscan(self.scheduled(lane), cursor, count=PAGE)
            mids = [member for member, _ in pairs]
            if mids:
                rows = self.pipeline([(b"HMGET", self.msg(mid.decode()), b"campaign", b"job") for mid in mids])
                for mid, (campaign, job) in zip(mids, rows, strict=True):
                    # A hash recorded before campaigns were counted has no `campaign`: its job says.
                    if campaign == wanted or (campaign is None and job is not None and _names(job, campaign_id)):
                        out.append((lane, mid.decode()))
            read += len(mids)
            if cursor == 0:
                return False
            if read >= SEARCH_MAX:
                return True

    def _unclaimed_of(self, campaign_id: str, lane: str, out: list[tuple[str, str]]) -> bool:
        """Append the lane's outbox entries of the campaign after the dispatch group's
        last-delivered id (never handed to a dispatcher) to `out`; True if the search was cut."""
        outbox, wanted = self.outbox(lane), campaign_id.encode()
        with resp.redis_errors():
            try:
                groups = self.r.xinfo_groups(outbox)
            except redis.ResponseError as error:
                if is_nogroup(error) or "no such key" in str(error).lower():
                    return False  # no outbox: nothing queued
                raise
        last = next((g["last-delivered-id"] for g in groups if g["name"] in (DISPATCH_GROUP, DISPATCH_GROUP.encode())),
                    None)
        start = "(" + last.decode() if last else "-"
        read = 0
        while read < SEARCH_MAX:
            with resp.redis_errors():
                rows = self.r.xrange(outbox, start, "+", count=PAGE)
            for raw_id, fields in rows:
                counted = fields.get(b"c")
                if counted == wanted or (counted is None and _names(fields.get(b"job", b""), campaign_id)):
                    # Its message id, as OutboxOps.entry_message_id derives it: given at enqueue, or the entry's.
                    mid = fields.get(b"mid")
                    out.append((lane, mid.decode() if mid else self.lane_prefix(lane) + raw_id.decode()))
            if len(rows) < PAGE:
                return False
            read += len(rows)
            start = "(" + rows[-1][0].decode()
        return True

    def cancel_each(self, message_ids: Sequence[str], *, events_maxlen: int, state_ttl_s: int,
                    batch: int = CANCEL_BATCH) -> list[CancelAnswer]:
        """Cancel each message (`ScheduleOps.cancel` for many): every message's own cancel steps,
        `batch` messages' next commands per round trip; one answer per message, in order."""
        answers: list[CancelAnswer] = []
        for start in range(0, len(message_ids), batch):
            steps = [cancel_steps(self, message_id=mid, events_maxlen=events_maxlen, state_ttl_s=state_ttl_s)
                     for mid in message_ids[start : start + batch]]
            done: list[CancelAnswer | None] = [None] * len(steps)
            waiting: dict[int, tuple[Any, ...]] = {}
            for i, step in enumerate(steps):
                try:
                    waiting[i] = step.send(None)
                except StopIteration as stop:
                    done[i] = stop.value
            while waiting:
                order = list(waiting)
                replies = self.pipeline([waiting[i] for i in order])
                waiting = {}
                for i, reply in zip(order, replies, strict=True):
                    try:
                        waiting[i] = steps[i].send(reply)
                    except StopIteration as stop:
                        done[i] = stop.value
            answers += [answer for answer in done if answer is not None]
        return answers
