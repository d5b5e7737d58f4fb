"""`sms-worker trace`: where is my message? Its whole local life in time order, from Redis alone
(and the provider's own log entry with --provider). Reads only: it changes nothing."""

from __future__ import annotations

import argparse
import time
from typing import TYPE_CHECKING, Any

import orjson

from worker.cli import common
from worker.cli.errors import UsageError
from worker.errors import ProviderError, SmsWorkerError

if TYPE_CHECKING:
    from worker.settings import Settings
    from worker.store import Store
    from worker.trace import Found, Trace

# Entries read at most per stream by --to (the events stream, each outbox, each schedule): an
# operator's command must not walk millions of entries unasked. --scan-limit changes it.
SCAN_LIMIT = 200_000
# --to prints each message's whole trace up to this many messages, a list of them beyond.
FULL_TRACES = 5

EPILOG = f"""examples:
  sms-worker trace sw-bulk-1764230000000-0
  sms-worker trace --id order-42 --provider
  sms-worker trace --to 41793026727 --since 2h
  sms-worker trace --to +41793026727 --since 2026-12-01T08:00:00Z --json

Prints the local life of a message in time order: enqueued, scheduled, each submit attempt (the
first one is its claim) and its outcome, reconciliation checks and verdicts, the delivery report
and where it came from (drain, webhook, logs), every event published (read from the events
stream by the id its record names; one trimmed from the stream says so), dead letters, cancel
and requeue. It reads the message's record (its hash in Redis, field `trail`), and for a message
with no record yet its outbox entry ("queued, not claimed yet"). Records expire after
SMS_STATE_TTL_S; a producer id maps to its message id for SMS_IDEMPOTENCY_TTL_S.

--to NUMBER --since WHEN finds that number's messages since WHEN (RFC 3339 with an offset, or a
duration back from now: 30m, 2h, 1h30m, 7d) by scanning, from WHEN on, the events stream (its
events' `to`), every lane's outbox (entries appended since WHEN, pending ones included) and every
lane's schedule (messages scheduled since WHEN), at most --scan-limit entries each (default
{SCAN_LIMIT:,}; a scan that stops there says so). Events trimmed from the stream
(SMS_EVENTS_STREAM_MAXLEN) cannot be found. Up to {FULL_TRACES} messages print whole, more as a
list (newest first, at most --limit).

--provider adds the provider's own log entry (GET /sms/3/logs; it keeps 48 h). Phone numbers are
masked unless --show-numbers; the SMS text is never printed (`sms-worker dlq show` prints a dead
letter's job). Exit status 0 when the message (or a message to the number) is found, 1 when it
is unknown or the provider's log could not be read, 2 for a usage mistake.
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("message_id", nargs="?", metavar="MESSAGE_ID", help="a message id, as enqueue printed it")
    p.add_argument("--id", metavar="PRODUCER_ID", help="the producer id the message was queued with")
    p.add_argument("--to", metavar="NUMBER", help="the destination number (with --since)")
    p.add_argument("--since", metavar="WHEN", help="with --to: RFC 3339 time with an offset, or a duration (2h)")
    p.add_argument("--limit", type=int, default=20, metavar="N",
                   help="with --to: at most this many messages (default 20)")
    p.add_argument("--scan-limit", type=int, default=SCAN_LIMIT, metavar="N",
                   help=f"with --to: entries read at most per stream (default {SCAN_LIMIT})")
    p.add_argument("--provider", action="store_true", help="add the provider's own log entry (GET /sms/3/logs)")
    p.add_argument("--show-numbers", action="store_true", help="print phone numbers unmasked")
    p.add_argument("--json", action="store_true", help="one JSON document")


def register(sub: Any) -> None:
    """Add `trace` to the `sms-worker` parser's subcommands."""
    p = sub.add_parser("trace", help="where is my message: its whole local life in time order", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=cmd_trace)


def cmd_trace(args: argparse.Namespace) -> int:
    chosen = [name for name, given in (("MESSAGE_ID", args.message_id), ("--id", args.id), ("--to", args.to))
              if given is not None]
    if len(chosen) != 1:
        raise UsageError("trace: give one of MESSAGE_ID, --id PRODUCER_ID or --to NUMBER --since WHEN"
                         + (f" (not {' and '.join(chosen)})" if chosen else ""))
    if (args.to is None) != (args.since is None):
        raise UsageError("trace: --to and --since go together")
    if args.limit < 1 or args.scan_limit < 1:
        raise UsageError("trace: --limit and --scan-limit are at least 1")
    if args.to is not None:
        from worker.trace import normalise_number, parse_since

        try:  # a usage mistake is told before anything is reached
            number = normalise_number(args.to)
            since_ms = parse_since(args.since, int(time.time() * 1000))
        except ValueError as error:
            raise UsageError(f"trace: {error}") from None
        settings = common.settings()
        return _trace_number(settings, common.store(settings), args, number, since_ms)
    settings = common.settings()
    store = common.store(settings)
    message_id = args.message_id
    if args.id is not None:
        message_id = store.trace_message_id_of(args.id)
        if message_id is None:
            raise SmsWorkerError(f"trace: --id {args.id}: unknown producer id (never queued here, or its claim "
                                 "has expired: SMS_IDEMPOTENCY_TTL_S)")
    trace = collect(store, message_id)
    if trace is None:
        raise SmsWorkerError(f"trace: {message_id[:120]}: unknown message (never queued here, or its records have "
                             "expired: SMS_STATE_TTL_S)")
    ok = _add_provider(settings, [trace]) if args.provider else True
    _print([trace], args, single=True)
    return 0 if ok else 1


def collect(store: Store, message_id: str) -> Trace | None:
    """One message's trace from Redis, or None when this worker holds nothing of it."""
    from worker.trace import build_trace, linked_ids, parse_trail

    record = store.trace_record(message_id)
    entry = None
    if not record:
        entry = store.trace_outbox_entry(message_id)
        if entry is None:
            # A dispatcher may have submitted and settled it (deleting its entry) during the search:
            # submit.lua writes the record before settle.lua deletes the entry, so this read sees it.
            record = store.trace_record(message_id)
            if not record:
                return None
    event_ids, dlq_ids = linked_ids(parse_trail(record.get("trail", ""))) if record else ([], [])
    return build_trace(message_id, record, mid_prefix=store.mid_prefix, outbox_entry=entry,
                       events=store.trace_events(event_ids) if event_ids else {},
                       dead_letters=store.trace_dead_letters(dlq_ids) if dlq_ids else {})


def find_by_number(store: Store, number: str, since_ms: int, scan_limit: int) -> Found:
    """The messages to `number` that the events stream, the outboxes and the schedules show since
    `since_ms` (see EPILOG), each scan bounded by `scan_limit` entries."""
    from worker.trace import Found, entry_ms, origin, same_number

    found = Found()
    # A cheap test of the raw bytes first: only entries that contain the digits at all are parsed.
    needle = number.encode()
    read = 0
    for rows in store.trace_event_pages(since_ms, scan_limit):
        read += len(rows)
        for entry_id, fields in rows:
            raw = fields.get(b"event", b"")
            if needle in raw:
                event = _json(raw)
                if same_number(event.get("to"), number) and isinstance(event.get("message_id"), str):
                    found.add(event["message_id"], store.mid_prefix, entry_ms(entry_id))
    if read >= scan_limit:
        found.bounded.append("events")
    for lane in store.trace_lanes():
        read = 0
        for rows in store.trace_outbox_pages(lane, since_ms, scan_limit):
            read += len(rows)
            for entry_id, fields in rows:
                job = fields.get(b"job", b"")
                if needle in job and same_number(_json(job).get("to"), number):
                    found.add(store.entry_message_id(lane, entry_id, fields), store.mid_prefix, entry_ms(entry_id))
        if read >= scan_limit:
            found.bounded.append(f"outbox {lane}")
        read = 0
        for members in store.trace_scheduled_pages(lane, scan_limit):
            read += len(members)
            for message_id, raw_job in members:
                came_from = origin(message_id, store.mid_prefix)
                if came_from is not None and came_from.ms < since_ms:
                    continue
                if raw_job and needle in raw_job and same_number(_json(raw_job).get("to"), number):
                    found.add(message_id, store.mid_prefix, since_ms)
        if read >= scan_limit:
            found.bounded.append(f"schedule {lane}")
    return found


def _trace_number(settings: Settings, store: Store, args: argparse.Namespace, number: str, since_ms: int) -> int:
    from worker.logs import mask_phone
    from worker.trace import iso_ms

    found = find_by_number(store, number, since_ms, args.scan_limit)
    traces = [t for t in (collect(store, mid) for mid in found.newest(args.limit)) if t is not None]
    ok = _add_provider(settings, traces) if args.provider and traces else True
    shown_to = number if args.show_numbers else mask_phone(number)
    if args.json:
        from worker.trace import as_json

        common.print_json({"to": shown_to, "since": iso_ms(since_ms), "found": len(found.messages),
                           "scan_limit": args.scan_limit, "bounded": found.bounded,
                           "messages": [as_json(t, show_numbers=args.show_numbers) for t in traces]})
    else:
        more = f", showing the newest {len(traces)}" if len(found.messages) > len(traces) else ""
        print(f"{len(found.messages)} message{'' if len(found.messages) == 1 else 's'} to {shown_to} since "
              f"{iso_ms(since_ms)}{more}")
        for stream in found.bounded:
            print(f"  the scan of {stream} stopped after {args.scan_limit} entries: later messages may be missing "
                  "(give a later --since, or a larger --scan-limit)")
        if traces:
            print()
            _print(traces, args, single=len(traces) <= FULL_TRACES)
    return (0 if ok else 1) if traces else 1


def _add_provider(settings: Settings, traces: list[Trace]) -> bool:
    """Attach the provider's log entry to each trace (GET /sms/3/logs, as many ids per request as its
    2048-character filter holds); False when the provider could not be asked (each trace says why)."""
    from worker.accounts import Accounts
    from worker.provider import Provider, ProviderConfig, chunk_message_ids
    from worker.trace import provider_view

    # Each message is looked up in the logs of its lane's account (worker.accounts).
    accounts = Accounts.from_settings(settings).require_keys()  # ConfigError (exit 2) without a key
    loggable: dict[str, list[str]] = {}
    for trace in traces:
        try:
            chunk_message_ids([trace.message_id])
            loggable.setdefault(accounts.of_lane(trace.lane or "").name, []).append(trace.message_id)
        except ValueError as error:
            trace.provider = provider_view(None, str(error))
    entries = {}
    try:
        for name, ids in loggable.items():
            with Provider(ProviderConfig.from_settings(settings, accounts.get(name))) as provider:
                entries.update(provider.logs_for_message_ids(ids))
    except ProviderError as error:
        for trace in traces:
            trace.provider = trace.provider or provider_view(None, str(error))
        return False
    for trace in traces:
        if trace.provider is None:
            entry = entries.get(trace.message_id)
            trace.provider = provider_view(entry.raw if entry is not None else None)
    return all(not (t.provider or {}).get("error") for t in traces)


def _print(traces: list[Trace], args: argparse.Namespace, *, single: bool) -> None:
    from worker.trace import as_json, render_list, render_text

    if args.json:
        common.print_json(as_json(traces[0], show_numbers=args.show_numbers))
    elif single:
        print("\n\n".join(render_text(t, show_numbers=args.show_numbers) for t in traces))
    else:
        print(render_list(traces))
        print(f"trace one: sms-worker trace {traces[0].message_id}")


def _json(raw: bytes) -> dict[str, Any]:
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}
