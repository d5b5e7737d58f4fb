"""`sms-worker cancel`: cancel scheduled or queued messages no dispatcher has submitted yet."""

from __future__ import annotations

import argparse
import sys

from worker.cli import common
from worker.cli.errors import UsageError

EPILOG = """examples:
  sms-worker cancel sw-bulk-1764230000000-0
  sms-worker cancel --id order-42
  sms-worker cancel sw-bulk-1764230000000-0 sw-bulk-1764230000000-1 --id order-43 --json
  sms-worker cancel --campaign xmas --yes

A scheduled message, or a queued one that no dispatcher has submitted yet, is cancelled: it is
never sent, and a `cancelled` event is published. A message already being sent or later is left
alone and its state is printed. Exit status 0 when every message is cancelled (now, or by an
earlier cancel), 1 otherwise.

--campaign cancels every scheduled job of the campaign and every queued one no dispatcher has
claimed yet, each as a single cancel would (so a job a dispatcher takes at that moment is either
cancelled or sent, never both); it asks first unless --yes, and prints how many were cancelled and
how many were already past cancelling. Exit 0 when it cancelled every job it found, 1 for an
unknown campaign or when nothing was confirmed.
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("message_id", nargs="*", metavar="MESSAGE_ID", help="message ids, as enqueue printed them")
    p.add_argument("--id", action="append", default=[], metavar="PRODUCER_ID",
                   help="a producer id the message was queued with (repeat for several)")
    p.add_argument("--campaign", metavar="CAMPAIGN",
                   help="every scheduled and unclaimed queued job of this campaign (campaign_reference_id)")
    p.add_argument("--yes", action="store_true", help="--campaign without asking")
    p.add_argument("--json", action="store_true")


def cmd_cancel(args: argparse.Namespace) -> int:
    from worker.cancel import CancelConfig, cancel
    from worker.models import State

    if args.campaign is not None:
        if args.message_id or args.id:
            raise UsageError("cancel: --campaign goes alone, not with MESSAGE_ID or --id")
        return _cancel_campaign(args)
    if not args.message_id and not args.id:
        raise UsageError("cancel: give MESSAGE_ID or --id PRODUCER_ID (or --campaign CAMPAIGN)")
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


def _cancel_campaign(args: argparse.Namespace) -> int:
    from worker.cancel import CancelConfig, campaign_jobs, cancel_campaign

    settings = common.settings()
    store = common.store(settings)
    campaign_id = args.campaign
    before = store.campaign_counts(campaign_id)
    jobs = campaign_jobs(store, campaign_id, list(settings.sms_lanes))
    if before is None and not jobs.message_ids:
        print(f"sms-worker: unknown campaign {campaign_id!r}: no counters and no scheduled or queued jobs here",
              file=sys.stderr)
        return 1
    found = f"{len(jobs.scheduled)} scheduled and {len(jobs.queued)} queued job(s)"
    if jobs.message_ids and not common.confirm(f"cancel {found} of campaign {campaign_id}?", args.yes,
                                               f"cancel --campaign {campaign_id} would cancel {found}"):
        print("nothing cancelled")
        return 1
    done = cancel_campaign(store, CancelConfig.from_settings(settings), campaign_id, jobs)
    if args.json:
        common.print_json({
            "campaign": campaign_id, "found": len(jobs.message_ids), "cancelled": done.cancelled,
            "not_cancelled": done.lost_race, "past_cancelling": done.past_cancelling,
            "still_waiting": done.still_waiting, "truncated": jobs.truncated,
            "counts": done.counts.to_json() if done.counts else None,
            "messages": [{"message_id": a.message_id, "outcome": a.outcome.value,
                          "state": a.state.value if a.state else None} for a in done.answers],
        })
    else:
        print(f"campaign {campaign_id}: cancelled {done.cancelled} of {found} found; "
              f"{done.past_cancelling} already past cancelling (being sent, sent or final)")
        if done.lost_race:
            print(f"  {done.lost_race} were taken by a dispatcher before their cancel: not cancelled")
        if done.still_waiting:
            print(f"  {done.still_waiting} still queued or scheduled (claimed by a dispatcher, which decides, "
                  f"or enqueued since): run it again to cancel the ones enqueued since")
        if jobs.truncated:
            print("  the search was cut at its bound: run it again for the rest")
    return 0 if done.lost_race == 0 else 1
