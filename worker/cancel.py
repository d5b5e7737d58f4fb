"""Cancel: the one entry point for cancelling a message before it is sent (CLI, producers, the client).

    answer = cancel(store, CancelConfig.from_settings(settings), message_id="sw-bulk-...")
    answer = cancel(store, config, producer_id="order-42")
    answer.outcome  # CancelOutcome.CANCELLED | NOT_CANCELLABLE (answer.state says where it is) | UNKNOWN

    jobs = campaign_jobs(store, "xmas", lanes)          # a whole campaign's scheduled and unclaimed jobs
    done = cancel_campaign(store, config, "xmas", jobs)

A SCHEDULED message, or a QUEUED one no dispatcher has submitted yet, becomes CANCELLED: it is never
POSTed, and one `cancelled` event is published. A message already SUBMITTING or later is left as it
is and the answer says its state. The decision is one Lua script (worker/lua/cancel.lua) against
the same record submit.lua decides on, so a cancel and a dispatcher racing for one message never
both win. An asyncio client drives the same steps (`worker.store.cancel_steps`) with redis.asyncio.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from worker.campaigns import Campaign
from worker.settings import Settings
from worker.store import CancelAnswer, CancelOutcome, Store, cancel_steps
from worker.store.campaigns import CampaignJobs

__all__ = ["CampaignCancel", "CancelAnswer", "CancelConfig", "CancelOutcome", "campaign_jobs", "cancel",
           "cancel_campaign", "cancel_steps"]


@dataclass(frozen=True, slots=True)
class CancelConfig:
    """The settings a cancel reads: how long the cancelled record is kept, and the events stream's cap."""

    state_ttl_s: int = 3 * 86400
    events_maxlen: int = 1_000_000

    @classmethod
    def from_settings(cls, settings: Settings) -> CancelConfig:
        return cls(state_ttl_s=settings.sms_state_ttl_s, events_maxlen=settings.sms_events_stream_maxlen)


def cancel(store: Store, config: CancelConfig | None = None, *, message_id: str | None = None,
           producer_id: str | None = None) -> CancelAnswer:
    """Cancel one message by its message id or its producer id (exactly one of them)."""
    config = config or CancelConfig()
    return store.cancel(message_id=message_id, producer_id=producer_id, events_maxlen=config.events_maxlen,
                        state_ttl_s=config.state_ttl_s)


@dataclass(frozen=True, slots=True)
class CampaignCancel:
    """What cancelling a campaign did: its jobs found cancellable, each one's answer, its counters after."""

    campaign_id: str
    jobs: CampaignJobs
    answers: list[CancelAnswer]
    counts: Campaign | None  # read after the cancels; None when the campaign has no counters

    @property
    def cancelled(self) -> int:
        """Cancelled by this call."""
        return sum(1 for answer in self.answers if answer.cancelled)

    @property
    def lost_race(self) -> int:
        """Found cancellable, but a dispatcher submitted it first (or it was gone): not cancelled."""
        return len(self.answers) - self.cancelled

    @property
    def past_cancelling(self) -> int:
        """The campaign's messages already being sent, sent or otherwise final (cancelled ones aside)."""
        if self.counts is None:
            return self.lost_race
        return max(0, self.counts.total - self.counts.count("cancelled") - self.counts.waiting)

    @property
    def still_waiting(self) -> int:
        """Scheduled or queued after this call: claimed by a dispatcher meanwhile (it decides), or enqueued since."""
        return 0 if self.counts is None else self.counts.waiting


def campaign_jobs(store: Store, campaign_id: str, lanes: Sequence[str]) -> CampaignJobs:
    """The campaign's scheduled jobs and its queued jobs no dispatcher has claimed, in `lanes` and in
    every outbox stream there is (a producer may write to any lane)."""
    return store.campaign_job_ids(campaign_id, [*lanes, *store.outbox_lanes()])


def cancel_campaign(store: Store, config: CancelConfig | None, campaign_id: str,
                    jobs: CampaignJobs) -> CampaignCancel:
    """Cancel each of `jobs` (from `campaign_jobs`), every one by the per-message cancel (cancel.lua
    decides each against the dispatcher), then read the campaign's counters."""
    config = config or CancelConfig()
    answers = store.cancel_each(jobs.message_ids, events_maxlen=config.events_maxlen, state_ttl_s=config.state_ttl_s)
    return CampaignCancel(campaign_id, jobs, answers, store.campaign_counts(campaign_id))
