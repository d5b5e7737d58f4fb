"""Where is my message: a message's trail parsed, its timeline built, rendered as text or JSON.

Pure: no Redis, no provider, no clock. `sms-worker trace` (worker/cli/trace.py) fetches the record,
the events and dead letters its trail names and the provider's log entry, and hands them here.

The trail (field `trail` of `{p}:msg:{id}`, written by the Lua scripts in the same atomic call as
each state change) is one line per step, "\\n"-separated:

    <ms> <step> key=value key=value ... [note=<free text to the end of the line>]

ms is Redis's clock (epoch milliseconds); values have no spaces, except the note, which is always
last. When the trail grows past ~4 KB the scripts keep its first line, a line `<ms> trimmed`, and
the most recent lines. A line this version cannot read is kept as step `unreadable`, never dropped.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

import orjson

from worker.logs import Redactor, mask_phone
from worker.models import lenient_job

# Trail fields whose values are counts or times (ints in the JSON); every other value is text.
_NUMERIC: Final = frozenset({"due", "attempt", "check"})
# Trail fields that name an entry of the events stream or of the dead letters.
_EVENT_FIELD: Final = "event"
_DLQ_FIELD: Final = "dlq"
_ENTRY_ID: Final = re.compile(r"\d{1,20}-\d{1,20}")
# One masker for every value shown; secrets are not its job here (a trace holds none).
_REDACTOR: Final = Redactor()


def iso_ms(ms: int) -> str:
    """Epoch milliseconds as UTC ISO 8601 with milliseconds: 2026-12-01T16:30:00.123Z."""
    moment = datetime.fromtimestamp(ms // 1000, UTC).replace(microsecond=ms % 1000 * 1000)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


# --- the trail ----------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class TrailLine:
    ms: int
    step: str
    fields: dict[str, str]
    note: str | None = None


def parse_line(line: str, previous_ms: int = 0) -> TrailLine:
    """One trail line; a line without a readable time or step is step `unreadable` (its text the
    note), placed at the time of the line before it so the order stays."""
    # Only the note may hold spaces, so the first " note=" starts it.
    head, has_note, note = line.partition(" note=")
    tokens = head.split()
    if len(tokens) < 2 or not tokens[0].isdigit():
        return TrailLine(previous_ms, "unreadable", {}, line)
    fields: dict[str, str] = {}
    for token in tokens[2:]:
        key, _, value = token.partition("=")
        fields[key] = value
    return TrailLine(int(tokens[0]), tokens[1], fields, note if has_note else None)


def parse_trail(text: str) -> list[TrailLine]:
    lines: list[TrailLine] = []
    for raw in text.split("\n"):
        if raw.strip():
            lines.append(parse_line(raw.strip("\r"), lines[-1].ms if lines else 0))
    return lines


def linked_ids(lines: Sequence[TrailLine]) -> tuple[list[str], list[str]]:
    """(events stream entry ids, dead-letter ids) the trail names, in order, each once; only
    well-formed entry ids (anything else cannot be looked up, and is shown as it is)."""
    events: dict[str, None] = {}
    dead: dict[str, None] = {}
    for line in lines:
        for name, found in ((_EVENT_FIELD, events), (_DLQ_FIELD, dead)):
            value = line.fields.get(name)
            if value and _ENTRY_ID.fullmatch(value):
                found[value] = None
    return list(events), list(dead)


# --- where a message id says it came from ----------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Origin:
    """What a message id tells: its lane, when it was enqueued, and its outbox entry when it is
    derived from one (`<prefix>-<lane>-<entry id>`; ids given at enqueue are
    `<prefix>-<lane>-<ms>-p<tag>...`, replays under a new id `<prefix>-<lane>-<ms>-r<tag>`)."""

    lane: str
    ms: int
    entry_id: str | None
    replayed: bool = False


def origin(message_id: str, mid_prefix: str) -> Origin | None:
    prefix = re.escape(f"{mid_prefix}-")
    derived = re.fullmatch(rf"{prefix}(?P<lane>.+)-(?P<entry>(?P<ms>\d{{1,20}})-\d{{1,20}})", message_id)
    if derived is not None:
        return Origin(derived["lane"], int(derived["ms"]), derived["entry"])
    given = re.fullmatch(rf"{prefix}(?P<lane>.+)-(?P<ms>\d{{1,20}})-(?P<kind>[pr])[0-9a-z]+", message_id)
    if given is not None:
        return Origin(given["lane"], int(given["ms"]), None, replayed=given["kind"] == "r")
    return None


# --- the timeline -----------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Linked:
    """An events stream entry or a dead letter a step names: its data, or found=False when it is
    no longer there (trimmed from the events stream; a dead letter replayed or purged)."""

    entry_id: str
    found: bool
    data: dict[str, Any] | None = None

    def as_dict(self, show_numbers: bool) -> dict[str, Any]:
        return {"entry_id": self.entry_id, "found": self.found, "data": masked(self.data, show_numbers)}


@dataclass(frozen=True, slots=True)
class Step:
    ms: int
    step: str
    fields: dict[str, Any]
    note: str | None = None
    event: Linked | None = None
    dead_letter: Linked | None = None

    def as_dict(self, show_numbers: bool) -> dict[str, Any]:
        out: dict[str, Any] = {"at": iso_ms(self.ms), "ms": self.ms, "step": self.step}
        for key, value in self.fields.items():
            if key in out or key in ("note", "due_at"):
                continue  # a field named like one of ours (never written so far) must not replace it
            out[key] = _typed(key, value)
            if key == "due" and isinstance(out[key], int):
                out["due_at"] = iso_ms(out[key])
        if self.event is not None:
            out[_EVENT_FIELD] = self.event.as_dict(show_numbers)
        if self.dead_letter is not None:
            out[_DLQ_FIELD] = self.dead_letter.as_dict(show_numbers)
        if self.note is not None:
            out["note"] = masked(self.note, show_numbers)
        return out


@dataclass(slots=True)
class Trace:
    """One message as this worker knows it. `recorded` is False for a message still in its outbox
    with no record: queued, not claimed by a dispatcher yet."""

    message_id: str
    state: str
    recorded: bool
    lane: str | None
    timeline: list[Step]
    producer_id: str | None = None
    to: str | None = None
    campaign: str | None = None
    bulk_id: str | None = None
    attempts: int | None = None
    status: str | None = None
    reason: str | None = None
    last_error: str | None = None
    send_at: str | None = None
    entry_id: str | None = None  # its outbox entry, when known
    provider: dict[str, Any] | None = None  # with --provider: see provider_view

    @property
    def first_ms(self) -> int | None:
        return self.timeline[0].ms if self.timeline else None

    @property
    def last(self) -> Step | None:
        return self.timeline[-1] if self.timeline else None


def _event_data(raw: bytes | None) -> dict[str, Any] | None:
    if raw is None:
        return None
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return {"unreadable": raw.decode("utf-8", "replace")[:200]}
    return data if isinstance(data, dict) else {"unreadable": str(data)[:200]}


def _dead_letter_data(fields: Mapping[bytes, bytes] | None) -> dict[str, Any] | None:
    """A dead letter without its job (the job holds the text, which a trace never shows)."""
    if fields is None:
        return None
    entry = _event_data(fields.get(b"entry", b"{}")) or {}
    return {k: v for k, v in entry.items() if k != "job"}


def build_trace(
    message_id: str,
    record: Mapping[str, str],
    *,
    mid_prefix: str,
    outbox_entry: tuple[str, str, bytes] | None = None,
    events: Mapping[str, bytes | None] | None = None,
    dead_letters: Mapping[str, Mapping[bytes, bytes] | None] | None = None,
) -> Trace:
    """The trace of a message from its record (its hash, job and trail included), or, for one with
    no record yet, its outbox entry (lane, entry id, job); `events` and `dead_letters` are the
    entries its trail names (`linked_ids`), None for those no longer there."""
    events = events or {}
    dead_letters = dead_letters or {}
    came_from = origin(message_id, mid_prefix)
    if record:
        job = lenient_job(record.get("job", "").encode())
        lane = record.get("lane") or (came_from.lane if came_from else None)
        entry_id = record.get("entry") or (came_from.entry_id if came_from else None)
    elif outbox_entry is not None:
        lane, entry_id, raw_job = outbox_entry
        job = lenient_job(raw_job)
    else:
        raise ValueError("a trace needs the message's record or its outbox entry")

    timeline: list[Step] = []
    if came_from is not None:
        enqueued: dict[str, Any] = {"lane": came_from.lane}
        if came_from.entry_id or (not record and entry_id):
            enqueued["entry"] = came_from.entry_id or entry_id
        if isinstance(job.get("id"), str):
            enqueued["id"] = job["id"]
        note = "replayed from a dead letter under a new message id" if came_from.replayed else None
        timeline.append(Step(came_from.ms, "enqueued", enqueued, note))
    lines = parse_trail(record.get("trail", "")) if record else []
    if record and record.get("first_by"):
        # A message's first submit is no trail line: submit.lua wrote the record then (first_ms,
        # first_by; the fence and entry are the first attempt's while it is the only one).
        first: dict[str, Any] = {"attempt": "1", "by": record["first_by"]}
        if _int(record.get("attempts")) == 1:
            first.update({k: record[k] for k in ("fence", "entry") if record.get(k)})
        timeline.append(Step(_int(record.get("first_ms")) or (came_from.ms if came_from else 0), "submit", first))
    for line in lines:
        event = dead = None
        fields = dict(line.fields)
        if (event_id := fields.get(_EVENT_FIELD)) and event_id in events:
            fields.pop(_EVENT_FIELD)
            raw = events[event_id]
            event = Linked(event_id, raw is not None, _event_data(raw))
        if (dlq_id := fields.get(_DLQ_FIELD)) and dlq_id in dead_letters:
            fields.pop(_DLQ_FIELD)
            letter = dead_letters[dlq_id]
            dead = Linked(dlq_id, letter is not None, _dead_letter_data(letter))
        timeline.append(Step(line.ms, line.step, fields, line.note, event, dead))
    if record and not lines and not record.get("first_by"):
        # A record from before trails were kept (or its trail was lost): its last state is all there is.
        ms = _int(record.get("updated_ms")) or _int(record.get("first_ms")) or (came_from.ms if came_from else 0)
        timeline.append(Step(ms, "record", {"state": record.get("state", "?")}, "no trail recorded for this message"))

    return Trace(
        message_id=message_id,
        state=record.get("state", "?") if record else "QUEUED",
        recorded=bool(record),
        lane=lane,
        timeline=timeline,
        producer_id=job["id"] if isinstance(job.get("id"), str) else None,
        to=job["to"] if isinstance(job.get("to"), str) else None,
        campaign=(record.get("campaign") if record else None) or _str(job.get("campaign_reference_id")),
        bulk_id=(record.get("bulk_id") or None) if record else None,
        attempts=_int(record.get("attempts")) if record else 0,
        status=(record.get("status") or None) if record else None,
        reason=(record.get("reason") or None) if record else None,
        last_error=(record.get("last_error") or None) if record else None,
        send_at=_str(job.get("send_at")),
        entry_id=entry_id,
    )


def _int(value: str | None) -> int | None:
    return int(value) if value is not None and value.isdigit() else None


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _typed(key: str, value: Any) -> Any:
    if key in _NUMERIC and isinstance(value, str) and value.isdigit():
        return int(value)
    return value


# --- the provider's log entry ---------------------------------------------------------------------
def provider_view(raw: Mapping[str, Any] | None, error: str | None = None) -> dict[str, Any]:
    """What `--provider` adds: the provider's log entry (GET /sms/3/logs) as it sent it, whether it
    had one, or why it could not be asked."""
    if error is not None:
        return {"found": False, "error": error}
    return {"found": raw is not None, "entry": dict(raw) if raw is not None else None}


# --- masking ----------------------------------------------------------------------------------------
def masked(value: Any, show_numbers: bool) -> Any:
    """Phone numbers masked (worker.logs: country code and last two digits kept) in a value and
    everything inside it, unless the operator asked to see them."""
    return value if show_numbers or value is None else _REDACTOR.clean(value)


def _number(value: str | None, show_numbers: bool) -> str | None:
    if value is None or show_numbers:
        return value
    return mask_phone(value)


# --- JSON -------------------------------------------------------------------------------------------
def as_json(trace: Trace, *, show_numbers: bool = False) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "message_id": trace.message_id,
        "found": True,
        "state": trace.state,
        "recorded": trace.recorded,
        "lane": trace.lane,
        "id": trace.producer_id,
        "to": _number(trace.to, show_numbers),
        "campaign": trace.campaign,
        "bulk_id": trace.bulk_id,
        "attempts": trace.attempts,
        "status": trace.status,
        "reason": trace.reason,
        "last_error": masked(trace.last_error, show_numbers),
        "send_at": trace.send_at,
        "entry": trace.entry_id,
        "timeline": [step.as_dict(show_numbers) for step in trace.timeline],
    }
    if trace.provider is not None:
        doc["provider"] = masked(trace.provider, show_numbers)
    return doc


# --- text -------------------------------------------------------------------------------------------
_WIDTH = 26  # the time column: "2026-12-01T16:30:00.123Z  "


def render_text(trace: Trace, *, show_numbers: bool = False) -> str:
    out = [f"message {trace.message_id}"]
    state = trace.state if trace.recorded else "QUEUED: queued, not claimed yet"
    where = [f"lane {trace.lane}"] if trace.lane else []
    if trace.recorded and trace.attempts is not None:
        where.append(f"attempts {trace.attempts}")
    if not trace.recorded and trace.entry_id:
        where.append(f"outbox entry {trace.entry_id}")
    out.append(f"  {'state':<11}{state}" + (f" ({', '.join(where)})" if where else ""))
    header = (("to", _number(trace.to, show_numbers)), ("id", trace.producer_id), ("campaign", trace.campaign),
              ("send at", trace.send_at), ("bulk id", trace.bulk_id), ("status", trace.status),
              ("reason", trace.reason), ("last error", masked(trace.last_error, show_numbers)))
    out += [f"  {name:<11}{value}" for name, value in header if value]
    out.append("timeline (UTC)")
    for step in trace.timeline:
        out.append(f"  {iso_ms(step.ms):<{_WIDTH}}{step.step:<11} {describe(step, show_numbers)}")
        for linked in _sub_lines(step, show_numbers):
            out.append(" " * (_WIDTH + 2 + 12) + linked)
    if trace.provider is not None:
        out += render_provider(trace.provider, show_numbers)
    return "\n".join(out)


def describe(step: Step, show_numbers: bool = False) -> str:
    """One step in words; a step this version does not know shows its fields as they are."""
    f = step.fields
    by = f" by {f['by']}" if f.get("by") else ""
    text: str
    match step.step:
        case "enqueued":
            parts = [f"on lane {f.get('lane')}"]
            if f.get("entry"):
                parts.append(f"outbox entry {f['entry']}")
            if f.get("id"):
                parts.append(f"producer id {f['id']}")
            text = ", ".join(parts)
        case "scheduled":
            due = _int(f.get("due"))
            text = f"held in the schedule until {iso_ms(due) if due is not None else f.get('due')}"
            if f.get("entry"):
                text += f" (from outbox entry {f['entry']})"
        case "queued":
            text = f"due: moved to the outbox (entry {f.get('entry')})"
        case "submit":
            claimed = "claimed, " if f.get("attempt") == "1" else ""
            text = (f"{claimed}attempt {f.get('attempt')}{by}: submitting "
                    f"(fence {f.get('fence')}, entry {f.get('entry')})")
        case "reconcile":
            text = f"reconciling (was {f.get('state')}: an attempt may have reached the provider), lease taken{by}"
        case "absent":
            text = f"not found in the provider's logs (check {f.get('check')}{by})"
        case "resend":
            text = f"resend: attempt {f.get('attempt')}{by} (fence {f.get('fence')})"
        case "state":
            text = f"-> {f.get('to')}"
        case "report":
            text = f"report -> {f.get('to')} ({f.get('status')}) from {f.get('source')}"
        case "expired":
            text = f"-> EXPIRED: {f.get('reason')}"
        case "cancelled":
            text = "-> CANCELLED: never sent"
        case "requeued":
            dlq = step.dead_letter.entry_id if step.dead_letter is not None else f.get("dlq")
            text = f"-> QUEUED: requeued by an operator from dead letter {dlq}"
            if f.get("entry"):
                text += f" (new outbox entry {f['entry']})"
        case "trimmed":
            text = "(the trail's earlier lines were trimmed)"
        case "record":
            text = f"state {f.get('state')}"
        case _:
            text = " ".join(f"{k}={v}" for k, v in f.items())
    known = _KNOWN_FIELDS.get(step.step)
    if known is not None:
        # Fields this version does not describe still show (a later script may add one).
        extra = [f"{k}={v}" for k, v in f.items() if k not in known]
        if extra:
            text += f" [{' '.join(extra)}]"
    if step.note:
        text += f" ({masked(step.note, show_numbers)})"
    return text


_KNOWN_FIELDS: Final[dict[str, frozenset[str]]] = {
    "enqueued": frozenset({"lane", "entry", "id"}),
    "scheduled": frozenset({"due", "entry"}),
    "queued": frozenset({"entry"}),
    "submit": frozenset({"attempt", "by", "fence", "entry"}),
    "reconcile": frozenset({"state", "by"}),
    "absent": frozenset({"check", "by"}),
    "resend": frozenset({"attempt", "by", "fence"}),
    "state": frozenset({"to"}),
    "report": frozenset({"to", "status", "source"}),
    "expired": frozenset({"reason"}),
    "cancelled": frozenset(),
    "requeued": frozenset({"dlq", "entry"}),
    "trimmed": frozenset(),
    "record": frozenset({"state"}),
}


def _sub_lines(step: Step, show_numbers: bool) -> list[str]:
    lines = []
    if step.event is not None:
        lines.append(_event_line(step.event, show_numbers))
    if step.dead_letter is not None and step.step != "requeued":
        letter = step.dead_letter
        if letter.found and letter.data is not None:
            data = masked(letter.data, show_numbers)
            lines.append(f"dead letter {letter.entry_id}: {data.get('reason')}: {data.get('detail')} "
                         f"(attempts {data.get('attempts')})")
        else:
            lines.append(f"dead letter {letter.entry_id}: no longer in the dead letters (replayed or purged)")
    return lines


def _event_line(event: Linked, show_numbers: bool) -> str:
    if not event.found or event.data is None:
        return f"event {event.entry_id}: trimmed from the events stream (SMS_EVENTS_STREAM_MAXLEN)"
    data = masked(event.data, show_numbers)
    parts = [f"event {event.entry_id}: {data.get('type')}"]
    status = data.get("status")
    if isinstance(status, dict) and status.get("name"):
        parts.append(f"status {status['name']}")
    error = data.get("error")
    if isinstance(error, dict) and error.get("name") and error.get("name") != "NO_ERROR":
        parts.append(f"error {error['name']}")
    if data.get("reason"):
        parts.append(f"reason {data['reason']}")
    price = data.get("price")
    if isinstance(price, dict) and price.get("pricePerMessage") is not None:
        parts.append(f"price {price['pricePerMessage']} {price.get('currency') or ''}".rstrip())
    return ", ".join(parts)


def render_provider(view: Mapping[str, Any], show_numbers: bool) -> list[str]:
    out = ["provider's log (GET /sms/3/logs)"]
    if view.get("error"):
        out.append(f"  could not be read: {view['error']}")
        return out
    entry = view.get("entry")
    if not isinstance(entry, Mapping):
        out.append("  no entry: the provider keeps its logs 48 h, and a message it never accepted is not there")
        return out
    entry = masked(dict(entry), show_numbers)
    status, error, price = entry.get("status") or {}, entry.get("error") or {}, entry.get("price") or {}
    line = f"  status {status.get('name')} ({status.get('groupName')})"
    if error.get("name"):
        line += f", error {error['name']}"
    out.append(line)
    details = [("sent", entry.get("sentAt")), ("done", entry.get("doneAt")), ("bulk id", entry.get("bulkId")),
               ("to", entry.get("destination")), ("parts", entry.get("messageCount")),
               ("mcc/mnc", entry.get("mccMnc"))]
    if price.get("pricePerMessage") is not None:
        details.append(("price", f"{price['pricePerMessage']} {price.get('currency') or ''}".rstrip()))
    shown = [f"{name} {value}" for name, value in details if value not in (None, "")]
    if shown:
        out.append("  " + ", ".join(shown))
    return out


# --- many messages (--to) -----------------------------------------------------------------------------
def render_list(traces: Sequence[Trace]) -> str:
    """One line per message: its id, state, lane, when it was enqueued, and its last step."""
    out = [f"  {'message id':<44}{'state':<14}{'lane':<8}{'enqueued (UTC)':<26}last step"]
    for trace in traces:
        first = iso_ms(trace.first_ms) if trace.first_ms is not None else "?"
        last = f"{trace.last.step} {iso_ms(trace.last.ms)}" if trace.last is not None else ""
        state = trace.state if trace.recorded else "QUEUED*"
        out.append(f"  {trace.message_id:<44}{state:<14}{trace.lane or '?':<8}{first:<26}{last}")
    if any(not t.recorded for t in traces):
        out.append("  * queued, not claimed yet")
    return "\n".join(out)


def normalise_number(value: str) -> str:
    """A destination as jobs hold it: digits only (a leading '+' and spaces dropped); ValueError
    for anything that is no international number."""
    digits = value.strip().replace(" ", "").removeprefix("+")
    if not (digits.isdigit() and 7 <= len(digits) <= 15) or digits.startswith("0"):
        raise ValueError(f"--to: not an international number: {value!r} (7 to 15 digits, e.g. 41793026727)")
    return digits


def same_number(value: object, number: str) -> bool:
    return isinstance(value, str) and value.strip().removeprefix("+") == number


_DURATION: Final = re.compile(r"(\d+)(ms|s|m|h|d)")
_UNIT_MS: Final = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


def parse_since(value: str, now_ms: int) -> int:
    """--since as epoch ms: an RFC 3339 time with an offset, or a duration back from now (2h, 30m,
    1h30m, 45s, 7d); ValueError saying which forms are understood."""
    text = value.strip()
    if text and _DURATION.sub("", text) == "" and text[0].isdigit():
        return now_ms - sum(int(n) * _UNIT_MS[unit] for n, unit in _DURATION.findall(text))
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        moment = None
    if moment is None or moment.tzinfo is None:
        raise ValueError(f"--since: {value!r} is neither a duration (2h, 30m, 1h30m, 7d) nor an RFC 3339 time "
                         "with an offset (2026-12-01T08:00:00Z)")
    return int(moment.timestamp() * 1000)


@dataclass(slots=True)
class Found:
    """Messages to one number found by `trace --to`: message id -> when it was enqueued (ms, from its
    id, or the time of the entry that named it), and the streams whose scan stopped at the bound."""

    messages: dict[str, int] = field(default_factory=dict)
    bounded: list[str] = field(default_factory=list)

    def add(self, message_id: str, mid_prefix: str, seen_ms: int) -> None:
        came_from = origin(message_id, mid_prefix)
        ms = came_from.ms if came_from else seen_ms
        self.messages[message_id] = min(ms, self.messages.get(message_id, ms))

    def newest(self, limit: int) -> list[str]:
        return sorted(self.messages, key=lambda mid: (self.messages[mid], mid), reverse=True)[:limit]


def entry_ms(entry_id: str) -> int:
    head = entry_id.partition("-")[0]
    return int(head) if head.isdigit() else 0
