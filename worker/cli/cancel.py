"""`sms-worker cancel`: cancel scheduled or queued messages no dispatcher has submitted yet."""

from __future__ import annotations

import argparse

from worker.cli import common
from worker.cli.errors import UsageError

EPILOG = """examples:
  sms-worker cancel sw-bulk-1764230000000-0
  sms-worker cancel --id order-42
  sms-worker cancel sw-bulk-1764230000000-0 sw-bulk-1764230000000-1 --id order-43 --json

A scheduled message, or a queued one that no dispatcher has submitted yet, is cancelled: it is
never sent, and a `cancelled` event is published. A message already being sent or later is left
alone and its state is printed. Exit status 0 when every message is cancelled (now, or by an
earlier cancel), 1 otherwise.
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("message_id", nargs="*", metavar="MESSAGE_ID", help="message ids, as enqueue printed them")
    p.add_argument("--id", action="append", default=[], metavar="PRODUCER_ID",
                   help="a producer id the message was queued with (repeat for several)")
    p.add_argument("--json", action="store_true")


def cmd_cancel(args: argparse.Namespace) -> int:
    from worker.cancel import CancelConfig, cancel
    from worker.models import State

    if not args.message_id and not args.id:
        raise UsageError("cancel: give MESSAGE_ID or --id PRODUCER_ID")
    settings = common.settings()
    store = common.store(settings)
    config = CancelConfig.from_settings(settings)
    answers = [cancel(store, config, message_id=mid) for mid in args.message_id]
    answers += [cancel(store, config, producer_id=pid) for pid in args.id]
    if args.json:
        common.print_json([{"message_id": a.message_id, "id": a.producer_id, "outcome": a.outcome.value,
                            "state": a.state.value if a.state else None} for a in answers])
    else:
        for answer in answers:
            print(answer.describe())
    # A repeated cancel finds the message CANCELLED already: that is the state asked for.
    return 0 if all(answer.state is State.CANCELLED for answer in answers) else 1
