"""What both producer clients share: their configuration, how `send`'s arguments become a job, the status answer."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from worker.errors import ConfigError
from worker.models import TERMINAL_STATES, State
from worker.outbox import OutboxConfig
from worker.settings import Settings
from worker.store.lookup import Located


def _default(name: str) -> Any:
    """A setting's default, so a client built from explicit arguments matches the worker's defaults."""
    field = Settings.model_fields[name]
    return field.default_factory() if field.default_factory is not None else field.default  # type: ignore[call-arg]


@dataclass(frozen=True, slots=True)
class ClientConfig:
    """Where a client writes (Redis URL, key prefix, message id prefix) and what its Outbox accepts."""

    redis_url: str
    prefix: str
    message_id_prefix: str
    outbox: OutboxConfig
    state_ttl_s: int  # how long a cancelled message's record is kept
    events_maxlen: int  # the events stream's cap, kept by every writer of an event (cancel)

    @classmethod
    def from_settings(cls, settings: Settings) -> ClientConfig:
        return cls(
            redis_url=settings.redis_url, prefix=settings.sms_key_prefix,
            message_id_prefix=settings.sms_message_id_prefix, outbox=OutboxConfig.from_settings(settings),
            state_ttl_s=settings.sms_state_ttl_s, events_maxlen=settings.sms_events_stream_maxlen,
        )

    @classmethod
    def of(
        cls, redis_url: str | None = None, *, prefix: str | None = None, message_id_prefix: str | None = None,
        lanes: Sequence[str] | None = None, default_lane: str | None = None,
    ) -> ClientConfig:
        """Explicit arguments; whatever is left out is the worker's default (worker.settings)."""
        if lanes is None:
            lane_names, default = tuple(_default("sms_lanes")), default_lane or _default("sms_default_lane")
        else:
            lane_names = tuple(lanes)
            default = default_lane or (lane_names[0] if lane_names else "")
        if not lane_names or default not in lane_names:
            raise ConfigError(f"default lane {default!r} is not one of the lanes {list(lane_names)}")
        return cls(
            redis_url=redis_url or _default("redis_url"), prefix=prefix or _default("sms_key_prefix"),
            message_id_prefix=message_id_prefix or _default("sms_message_id_prefix"),
            outbox=OutboxConfig(
                lanes=lane_names, default_lane=default, max_text_parts=_default("sms_max_text_parts"),
                metadata_max_bytes=_default("sms_metadata_max_bytes"),
                idempotency_ttl_s=_default("sms_idempotency_ttl_s"),
                schedule_horizon_s=_default("sms_schedule_horizon_s"), state_ttl_s=_default("sms_state_ttl_s"),
            ),
            state_ttl_s=_default("sms_state_ttl_s"), events_maxlen=_default("sms_events_stream_maxlen"),
        )


def make_job(
    to: str, text: str | None, *, id: str | None, metadata: Mapping[str, Any] | None, sender: str | None,
    send_at: datetime | str | None, fields: Mapping[str, Any],
) -> dict[str, Any]:
    """The job `send` describes, as a producer would write it; the Outbox validates it (nothing here does).

    A datetime `send_at` is written in RFC 3339 (`isoformat`); a naive one has no offset and is
    refused by the validator like a naive string."""
    job: dict[str, Any] = {"to": to}
    if text is not None:
        job["text"] = text
    if id is not None:
        job["id"] = id
    if metadata is not None:
        job["metadata"] = dict(metadata)
    if sender is not None:
        job["sender"] = sender
    if send_at is not None:
        job["send_at"] = send_at.isoformat() if isinstance(send_at, datetime) else send_at
    job.update(fields)
    return job


@dataclass(frozen=True, slots=True)
class MessageStatus:
    """Where one message is, as far as this Redis knows.

    `state` is None when the message is unknown: never queued here, its records expired
    (SMS_STATE_TTL_S), or an id this worker does not make. A message queued and not yet submitted
    has no record of its own: it is QUEUED while its outbox entry exists. `fields` is its record
    (attempts, bulk id, reason...) without the job, empty while it has none."""

    message_id: str | None
    state: State | None
    lane: str | None = None
    fields: Mapping[str, str] | None = None

    @property
    def known(self) -> bool:
        return self.state is not None

    @property
    def final(self) -> bool:
        return self.state in TERMINAL_STATES

    @classmethod
    def unknown(cls, message_id: str | None) -> MessageStatus:
        return cls(message_id, None)

    @classmethod
    def of(cls, located: Located) -> MessageStatus:
        if located.in_outbox:
            return cls(located.message_id, State.QUEUED, located.lane, {})
        raw = located.fields.get("state")
        # A state this version does not know (a newer worker's) is reported as unknown, its
        # record kept in `fields`.
        state = next((s for s in State if s.value == raw), None)
        return cls(located.message_id, state, located.lane, dict(located.fields))
