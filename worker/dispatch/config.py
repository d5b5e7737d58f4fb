"""What the dispatcher reads from the settings: `DispatchConfig`, one frozen value built once."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from worker.settings import DEFAULT_ACCOUNT, LaneConfig, Settings
from worker.store import FENCE_MARGIN_MS

if TYPE_CHECKING:  # a Route carries them; this module only describes where a lane's batches go
    from worker.provider import Provider
    from worker.ratelimit import RateLimiter

# How long one Dramatiq message keeps dispatching before it hands over to a fresh message, so a
# long backlog never holds a worker thread past the actor's time limit or a shutdown.
RUN_BUDGET_S = 2.0
# Stale pending entries are looked for at most this often per process and lane.
RECOVER_EVERY_S = 1.0
# A listening dispatcher (see Dispatcher._listen) blocks on Redis in slices this long, so it sees a
# shutdown request within one slice.
LISTEN_SLICE_MS = 250


@dataclass(frozen=True, slots=True)
class DispatchConfig:
    """The settings the send path uses, in the units it uses them (ms where Redis takes ms).

    The last three are not settings: tests change them with `dataclasses.replace` (e.g. a lease of
    0 ms so recovery takes pending entries over at once)."""

    lanes: Mapping[str, LaneConfig]  # SMS_LANES
    lease_ms: int  # SMS_LEASE_S: claims, slots and reconciliation leases
    send_window_ms: int  # Settings.send_window_s(): how long after SUBMITTING a request may be written
    state_ttl_s: int  # SMS_STATE_TTL_S
    events_maxlen: int  # SMS_EVENTS_STREAM_MAXLEN
    max_text_parts: int  # SMS_MAX_TEXT_PARTS
    metadata_max_bytes: int  # SMS_METADATA_MAX_BYTES
    idempotency_ttl_s: int  # SMS_IDEMPOTENCY_TTL_S
    max_attempts: int  # SMS_MAX_ATTEMPTS
    retry_horizon_s: float  # SMS_RETRY_HORIZON_S
    reconcile_checks: int  # SMS_RECONCILE_CHECKS
    reconcile_window_ms: int  # SMS_RECONCILE_WINDOW_S
    reconcile_delay_ms: int  # SMS_RECONCILE_DELAY_S
    auth_pause_s: float  # SMS_AUTH_PAUSE_S
    outage_pause_s: float  # SMS_OUTAGE_PAUSE_S
    no_report_grace_s: float  # SMS_NO_REPORT_GRACE_S
    default_sender: str | None  # SMS_DEFAULT_SENDER
    webhook_url: str | None  # Settings.webhook_delivery_url()
    schedule_horizon_s: int = 180 * 86400  # SMS_SCHEDULE_HORIZON_S: a raw entry's send_at beyond it is refused
    fence_margin_ms: int = FENCE_MARGIN_MS
    recover_every_s: float = RECOVER_EVERY_S
    listen: bool = True  # an immediate lane's run waits on its outbox for the rest of its budget

    @classmethod
    def from_settings(cls, settings: Settings) -> DispatchConfig:
        return cls(
            lanes=dict(settings.sms_lanes),
            lease_ms=int(settings.sms_lease_s * 1000),
            send_window_ms=int(settings.send_window_s() * 1000),
            state_ttl_s=settings.sms_state_ttl_s,
            events_maxlen=settings.sms_events_stream_maxlen,
            max_text_parts=settings.sms_max_text_parts,
            metadata_max_bytes=settings.sms_metadata_max_bytes,
            idempotency_ttl_s=settings.sms_idempotency_ttl_s,
            max_attempts=settings.sms_max_attempts,
            retry_horizon_s=settings.sms_retry_horizon_s,
            reconcile_checks=settings.sms_reconcile_checks,
            reconcile_window_ms=int(settings.sms_reconcile_window_s * 1000),
            reconcile_delay_ms=int(settings.sms_reconcile_delay_s * 1000),
            auth_pause_s=settings.sms_auth_pause_s,
            outage_pause_s=settings.sms_outage_pause_s,
            no_report_grace_s=settings.sms_no_report_grace_s,
            default_sender=settings.sms_default_sender,
            webhook_url=settings.webhook_delivery_url(),
            schedule_horizon_s=settings.sms_schedule_horizon_s,
        )


@dataclass(frozen=True, slots=True)
class Route:
    """Where a lane's batches go (worker.accounts): its account's Provider and RateLimiter, the
    lanes that share its key (an accepted request lifts their auth pauses, and only theirs), and the
    webhook URL its messages carry (its own webhook secret)."""

    provider: Provider
    limiter: RateLimiter
    account: str = DEFAULT_ACCOUNT
    lanes: tuple[str, ...] = ()
    webhook_url: str | None = None
