"""`sms-worker dlq`: list, show, replay and purge dead letters (worker.deadletters does the work)."""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import TYPE_CHECKING, Any

from worker.cli import common
from worker.cli.errors import UsageError
from worker.errors import SmsWorkerError, StoreError
from worker.settings import Settings

if TYPE_CHECKING:
    from worker.deadletters import DeadLetter, DeadLetters

EPILOG = """examples:
  sms-worker dlq list --lane bulk --reason bad_request
  sms-worker dlq show sw-bulk-1764230000000-0
  sms-worker dlq replay --all --reason retries_exhausted
  sms-worker dlq replay --all --reason unknown_lane --lane marketing --to-lane bulk
  sms-worker dlq purge --all --before-ms 1764230000000 --yes

A replay that would only be dead-lettered again (invalid_job, bad_request, a lane not configured)
is refused with the reason; --force replays it anyway. Report dead letters (report_*) are not jobs
and are never replayed. Each replay publishes a `requeued` status event.
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["list", "show", "replay", "purge"])
    p.add_argument("ids", nargs="*", help="dead-letter ids or messageIds")
    p.add_argument("--all", action="store_true", help="replay/purge every dead letter matching the filters")
    p.add_argument("--lane", help="filter: dead letters of this lane")
    p.add_argument("--reason", help="filter: e.g. retries_exhausted, invalid_job, bad_request, unknown_lane")
    p.add_argument("--since-ms", type=int, help="filter: dead-lettered at or after this time (ms since epoch)")
    p.add_argument("--before-ms", type=int, help="filter: dead-lettered before this time (ms since epoch)")
    p.add_argument("--new-message-id", action="store_true",
                   help="replay under a new messageId (only for messages known never to have reached the provider)")
    p.add_argument("--to-lane", help="replay onto this lane instead of the dead letter's own")
    p.add_argument("--force", action="store_true", help="replay even those that would be dead-lettered again")
    p.add_argument("--yes", action="store_true", help="purge --all without asking")
    p.add_argument("--json", action="store_true")


def cmd_dlq(args: argparse.Namespace) -> int:
    from worker.deadletters import DeadLetters, DeadLettersConfig

    settings = common.settings()
    dlq = DeadLetters(common.store(settings), DeadLettersConfig.from_settings(settings))
    filters = {"lane": args.lane, "reason": args.reason, "since_ms": args.since_ms, "before_ms": args.before_ms}
    _check_flags(args)
    if args.action == "list":
        return _list(dlq, filters, as_json=args.json)
    if args.action == "show":
        return _show(dlq, args.ids)
    # replay and purge: the dead letters named, or --all of those the filters match.
    _check_selection(settings, args, filters)
    chosen = list(dlq.iterate(**filters)) if args.all else _named(dlq, args.ids)
    if not chosen:
        print(f"no dead letters match: nothing to {args.action}")
        return 0
    if args.action == "replay":
        return _replay(settings, dlq, chosen, args)
    return _purge(dlq, chosen, args, filters)


def _check_flags(args: argparse.Namespace) -> None:
    """Each flag of an action only with its action."""
    misplaced = [flag for flag, value, actions in (
        ("--force", args.force, {"replay"}), ("--new-message-id", args.new_message_id, {"replay"}),
        ("--to-lane", args.to_lane, {"replay"}), ("--yes", args.yes, {"purge"}),
        ("--all", args.all, {"replay", "purge"}),
    ) if value and args.action not in actions]
    if misplaced:
        raise UsageError(f"dlq {args.action}: {', '.join(misplaced)} belong(s) to another action")


def _check_selection(settings: Settings, args: argparse.Namespace, filters: dict[str, Any]) -> None:
    """Replay and purge take ids, or --all narrowed by the filters; --to-lane a configured lane."""
    if args.ids and args.all:
        raise UsageError(f"dlq {args.action}: give dead-letter ids or --all, not both")
    if args.ids and any(value is not None for value in filters.values()):
        raise UsageError(f"dlq {args.action}: --lane, --reason, --since-ms and --before-ms narrow --all, not ids")
    if not args.ids and not args.all:
        raise UsageError(f"dlq {args.action}: give dead-letter ids, or --all (narrowed by --lane, --reason, "
                         "--since-ms, --before-ms)")
    if args.to_lane is not None and args.to_lane not in settings.sms_lanes:
        raise UsageError(f"--to-lane {args.to_lane}: unknown lane; SMS_LANES has {', '.join(settings.sms_lanes)}")


def _list(dlq: DeadLetters, filters: dict[str, Any], *, as_json: bool) -> int:
    items = list(dlq.iterate(**filters))
    if as_json:
        common.print_json([i.as_dict() for i in items])
        return 0
    for i in items:
        print(f"{i.dlq_id}  {i.message_id or '-'}  lane={i.lane or '-'}  reason={i.reason}  "
              f"attempts={i.attempts}  {i.detail[:80]}")
    print(f"{len(items)} dead letter(s)")
    return 0


def _show(dlq: DeadLetters, ids: list[str]) -> int:
    if len(ids) != 1:
        raise UsageError("dlq show needs one dead-letter id or messageId")
    found = dlq.get(ids[0])
    if found is None:
        raise SmsWorkerError(f"no dead letter {ids[0]!r}")
    common.print_json(found.as_dict())
    return 0


def _named(dlq: DeadLetters, ids: list[str]) -> list[DeadLetter]:
    """The dead letters named (by dead-letter id or messageId), each once; all of them or SmsWorkerError."""
    named = {name: dlq.get(name) for name in dict.fromkeys(ids)}
    missing = [name for name, item in named.items() if item is None]
    if missing:
        raise SmsWorkerError(f"no dead letter {', '.join(map(repr, missing))}: nothing done")
    return list({item.dlq_id: item for item in named.values() if item is not None}.values())


def _purge(dlq: DeadLetters, chosen: list[DeadLetter], args: argparse.Namespace, filters: dict[str, Any]) -> int:
    described = ", ".join(f"{k.replace('_', '-')} {v}" for k, v in filters.items() if v is not None)
    question = f"purge {len(chosen)} dead letter(s){f' ({described})' if described else ''}? They cannot be restored."
    if args.all and not common.confirm(question, args.yes,
                                       f"dlq purge --all would delete {len(chosen)} dead letter(s)"):
        print("nothing purged")
        return 1
    print(f"purged {dlq.purge(chosen)}")
    return 0


def _replay(settings: Settings, dlq: DeadLetters, chosen: list[DeadLetter], args: argparse.Namespace) -> int:
    """Replay what can do some good; say for each other one why not (and if --force would do it)."""
    refusals = dlq.refusals(chosen, lane=args.to_lane)
    blocked = {dlq_id for dlq_id, refusal in refusals.items() if not (refusal.forceable and args.force)}
    not_replayed = 0
    lanes: dict[str, int] = {}
    for item in chosen:
        label = f"{item.dlq_id} ({item.reason}){' ' + item.message_id if item.message_id else ''}"
        if item.dlq_id in blocked:
            refusal = refusals[item.dlq_id]
            hint = "; --force replays it anyway" if refusal.forceable else ""
            print(f"sms-worker: not replayed: {label}: {refusal.why}{hint}", file=sys.stderr)
            not_replayed += 1
            continue
        try:
            dlq.replay(item, new_message_id=args.new_message_id, lane=args.to_lane)
        except SmsWorkerError as error:
            print(f"sms-worker: not replayed: {label}: {error}", file=sys.stderr)
            not_replayed += 1
            continue
        lane = args.to_lane or item.lane
        lanes[lane] = lanes.get(lane, 0) + 1
    _wake(settings, dlq, lanes)
    per_lane = ", ".join(f"{lane} {n}" for lane, n in lanes.items())
    print(f"replayed {sum(lanes.values())}" + (f" ({per_lane})" if per_lane else "")
          + (f", not replayed {not_replayed} (see above)" if not_replayed else ""))
    return 1 if not_replayed else 0


def _wake(settings: Settings, dlq: DeadLetters, lanes: dict[str, int]) -> None:
    """Wake the lanes replayed onto, so the replays go out now."""
    if not lanes:
        return
    triggers = common.triggers(settings, dlq.store)
    for lane in lanes:
        with contextlib.suppress(StoreError):  # the clock's tick wakes the lane anyway
            triggers.dispatch(lane)
