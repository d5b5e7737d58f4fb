"""`sms-worker campaigns` and `sms-worker campaign X`: the campaigns' counters, one campaign's, or its live progress."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson

from worker.cli import common
from worker.cli.errors import UsageError

if TYPE_CHECKING:
    from worker.campaigns import Campaign
    from worker.store import Store

LIST_EPILOG = """examples:
  sms-worker campaigns
  sms-worker campaigns --json | jq '.[] | select(.complete | not) | .id'

One line per campaign (jobs with a campaign_reference_id), the most recently updated first. The
counts are exact: they change in the same atomic steps as the messages' states. waiting = queued +
scheduled; failed = failed + rejected + undeliverable + expired. A campaign's counters are kept at
least SMS_STATE_TTL_S after its last change.
"""

ONE_EPILOG = """examples:
  sms-worker campaign xmas
  sms-worker campaign xmas --watch
  sms-worker campaign xmas --watch --timeout 600 --json

--watch draws a progress bar (final messages of all) until every message of the campaign is final,
--timeout passes (exit 1) or Ctrl-C; without a terminal (CI, a pipe) it prints a line at each
change instead (with --json, one JSON object per line). Exit 1 for a campaign with no counters here.
"""

WATCH_INTERVAL_S = 0.5


def register(sub: Any, command: Callable[..., argparse.ArgumentParser]) -> None:
    """Add `campaigns` and `campaign` to the `sms-worker` parser (`command` is its subcommand maker)."""
    p = command(sub, "campaigns", "list campaigns with their counts", LIST_EPILOG)
    p.add_argument("--limit", type=int, default=1000, help="at most this many, the most recently updated first")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_campaigns)

    p = command(sub, "campaign", "one campaign's counts, or its live progress (--watch)", ONE_EPILOG)
    p.add_argument("campaign_id", metavar="CAMPAIGN", help="the campaign_reference_id its jobs carry")
    p.add_argument("--watch", action="store_true", help="follow it until every message is final")
    p.add_argument("--timeout", type=float, metavar="S", help="with --watch: give up after S seconds (exit 1)")
    p.add_argument("--interval", type=float, default=WATCH_INTERVAL_S, metavar="S", help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_campaign)


# --- commands -------------------------------------------------------------------------------------
def cmd_campaigns(args: argparse.Namespace) -> int:
    if args.limit < 1:
        raise UsageError("campaigns: --limit is at least 1")
    store = common.store(common.settings())
    found = store.list_campaigns(args.limit)
    if args.json:
        common.print_json([campaign.to_json() for campaign in found])
    elif not found:
        print("no campaigns (jobs with a campaign_reference_id) counted here")
    else:
        print(render_table(found))
    return 0


def cmd_campaign(args: argparse.Namespace) -> int:
    if args.timeout is not None and not args.watch:
        raise UsageError("campaign: --timeout goes with --watch")
    if args.interval <= 0:
        raise UsageError("campaign: --interval is more than 0")
    store = common.store(common.settings())
    campaign = store.campaign_counts(args.campaign_id)
    if campaign is None:
        print(f"sms-worker: unknown campaign {args.campaign_id!r}: no counters here (no job carried it, or its "
              f"counters expired after SMS_STATE_TTL_S; `sms-worker campaigns` lists the known ones)",
              file=sys.stderr)
        return 1
    if not args.watch:
        if args.json:
            common.print_json(campaign.to_json())
        else:
            print(render_one(campaign))
        return 0
    return _watch(store, campaign, args)


def _watch(store: Store, campaign: Campaign, args: argparse.Namespace) -> int:
    """Follow the campaign until complete (0), the timeout (1) or Ctrl-C (main answers 130)."""
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    def read() -> Campaign:
        return store.campaign_counts(campaign.id) or campaign  # expired meanwhile: the last counts stand

    if _interactive() and not args.json:
        campaign = _watch_bar(campaign, read, deadline, args.interval)
    else:
        campaign = _watch_lines(campaign, read, deadline, args.interval, args.json)
    if campaign.complete:
        print(f"campaign {campaign.id}: complete, {campaign.final} of {campaign.total} final "
              f"({summary(campaign)})", file=sys.stderr)
        return 0
    print(f"sms-worker: campaign {campaign.id}: not complete after {args.timeout:g} s: {campaign.final} of "
          f"{campaign.total} final ({summary(campaign)})", file=sys.stderr)
    return 1


def _interactive() -> bool:
    """A person watching: stdout is a terminal and this is no CI run."""
    return sys.stdout.isatty() and not os.environ.get("CI")


def _expired(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() >= deadline


def _watch_lines(campaign: Campaign, read: Callable[[], Campaign], deadline: float | None, interval: float,
                 as_json: bool) -> Campaign:
    """A line (or a JSON object) each time the counts change."""
    last: Any = None
    while True:
        shown = campaign.to_json() if as_json else watch_line(campaign)
        key = {k: v for k, v in shown.items() if k != "updated_ms"} if isinstance(shown, dict) else shown
        if key != last:
            print(orjson.dumps(shown).decode() if as_json else shown, flush=True)
            last = key
        if campaign.complete or _expired(deadline):
            return campaign
        time.sleep(interval)  # the refresh interval of a display, not a wait for a condition
        campaign = read()


def _watch_bar(campaign: Campaign, read: Callable[[], Campaign], deadline: float | None,
               interval: float) -> Campaign:
    """A rich progress bar of final / total, the counts beside it."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
               TimeElapsedColumn(), TextColumn("{task.fields[counts]}"))
    with Progress(*columns) as progress:
        task = progress.add_task(f"campaign {campaign.id}", total=campaign.total, completed=campaign.final,
                                 counts=summary(campaign))
        while not campaign.complete and not _expired(deadline):
            time.sleep(interval)  # the display's refresh, not a wait for a condition
            campaign = read()
            progress.update(task, total=campaign.total, completed=campaign.final, counts=summary(campaign))
    return campaign


# --- rendering (pure) -------------------------------------------------------------------------------
def when(ms: int | None) -> str:
    return "-" if ms is None else datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")


TABLE_COLUMNS = ("CAMPAIGN", "TOTAL", "WAITING", "SENDING", "ACCEPTED", "DELIVERED", "FAILED", "CANCELLED", "PRICE",
                 "UPDATED (UTC)")


def table_row(campaign: Campaign) -> tuple[str, ...]:
    return (campaign.id, str(campaign.total), str(campaign.waiting), str(campaign.count("sending")),
            str(campaign.count("accepted")), str(campaign.count("delivered")), str(campaign.failed_total),
            str(campaign.count("cancelled")), campaign.price_text() or "-", when(campaign.updated_ms))


def render_table(campaigns: Sequence[Campaign]) -> str:
    """The `campaigns` table: a header and a row per campaign, columns padded (numbers to the right)."""
    rows = [TABLE_COLUMNS, *(table_row(c) for c in campaigns)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(TABLE_COLUMNS))]
    numeric = {1, 2, 3, 4, 5, 6, 7}
    lines = []
    for row in rows:
        cells = [cell.rjust(widths[i]) if i in numeric else cell.ljust(widths[i]) for i, cell in enumerate(row)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def summary(campaign: Campaign) -> str:
    """The non-zero counts in one short phrase: `3 queued, 5 delivered, 1 failed`."""
    from worker.campaigns import STATE_FIELDS

    parts = [f"{campaign.count(name)} {name}" for name in STATE_FIELDS if campaign.count(name)]
    return ", ".join(parts) or "nothing counted"


def render_one(campaign: Campaign) -> str:
    """`campaign X`: its progress, each state's count, sent, prices and times."""
    from worker.campaigns import FINAL_FIELDS, STATE_FIELDS

    state = "complete" if campaign.complete else "in progress"
    lines = [f"campaign {campaign.id}: {campaign.final} of {campaign.total} final ({campaign.progress:.1%}), {state}"]
    for name in STATE_FIELDS:
        lines.append(f"  {name:<14}{campaign.count(name):>10}{'  (final)' if name in FINAL_FIELDS else ''}")
    lines.append(f"  {'sent':<14}{campaign.sent:>10}  (accepted by the provider, cumulative)")
    lines.append(f"  {'price':<14}{campaign.price_text() or '-':>10}")
    lines.append(f"  first {when(campaign.first_ms)} UTC, updated {when(campaign.updated_ms)} UTC")
    return "\n".join(lines)


def watch_line(campaign: Campaign) -> str:
    """One plain progress line (for --watch without a terminal)."""
    progress = f"{campaign.final}/{campaign.total} final ({campaign.progress:.1%})"
    return f"campaign {campaign.id}: {progress}: {summary(campaign)}"
