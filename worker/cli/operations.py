"""The operator's commands: status, resume, logs, reconcile and check."""

from __future__ import annotations

import argparse
import contextlib
import sys
from datetime import datetime
from typing import TYPE_CHECKING

from worker.cli import common
from worker.cli.errors import UsageError
from worker.errors import SmsWorkerError, StoreError
from worker.settings import Settings

if TYPE_CHECKING:
    from worker.store import Store


def cmd_status(args: argparse.Namespace) -> int:
    from worker.status import StatusConfig, collect, render

    settings = common.settings()
    status = collect(StatusConfig.from_settings(settings), common.store(settings), all_outboxes=True)
    if args.json:
        common.print_json(status.as_dict())
    else:
        print(render(status))
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    """Lift lanes' pauses now (after fixing an API key, or once the provider is back)."""
    settings = common.settings()
    store = common.store(settings)
    lanes = _lanes_to_resume(settings, store, args)
    triggers = common.triggers(settings, store)
    if args.extra is not None and args.extra < 1:
        raise UsageError(f"--extra {args.extra}: give how many more messages (and parts) to allow today, at least 1")
    lifted, refused = [], 0
    for lane in lanes:
        reason = store.paused(lane)
        if reason is None:
            print(f"{lane}: not paused")
            continue
        if reason == "budget" and not _raise_budget(store, lane, args):
            refused += 1
            continue
        store.resume(lane)
        lifted.append(reason)
        print(f"{lane}: lifted the pause ({reason}); its dispatcher is woken now")
        if lane in settings.sms_lanes:
            with contextlib.suppress(StoreError):  # the clock's tick wakes the lane anyway
                triggers.dispatch(lane)
    if "auth" in lifted:
        print("if the API key is still refused, the next batch pauses the lane again (`sms-worker check` "
              "verifies the key the workers would use, from the same settings)")
    return 1 if refused else 0


def _raise_budget(store: Store, lane: str, args: argparse.Namespace) -> bool:
    """A lane paused at its daily cap resumes only with more allowance (`--extra N`), confirmed by
    --yes or a y/N answer on a terminal: resuming without it would pause again at the next batch."""
    spend = store.spend_today([lane])[lane]
    used = f"{spend.messages:,} messages, {spend.parts:,} parts today (UTC)"
    if args.extra is None:
        print(f"sms-worker: {lane}: paused for budget, its daily cap is reached ({used}); give --extra N to raise "
              "today's caps by N and resume it, or wait: the pause lifts by itself at midnight UTC", file=sys.stderr)
        return False
    question = f"{lane}: raise today's caps by {args.extra:,} ({used}) and resume sending?"
    if not args.yes:
        if not sys.stdin.isatty():
            print(f"sms-worker: {lane}: not resumed: raising a budget needs a confirmation; run with --yes "
                  "(no terminal to ask on)", file=sys.stderr)
            return False
        if input(f"{question} [y/N] ").strip().lower() not in ("y", "yes"):
            print(f"{lane}: not resumed")
            return False
    after = store.raise_budget(lane, args.extra)
    print(f"{lane}: today's caps raised by {after.extra:,} in all; the counters stay ({used}), so the lane pauses "
          "again once it has sent the extra; tomorrow the configured caps apply")
    return True


def _lanes_to_resume(settings: Settings, store: Store, args: argparse.Namespace) -> list[str]:
    """--all, or the --lane ones: configured, or paused (a lane taken out of SMS_LANES may still be)."""
    if args.all and args.lane:
        raise UsageError("resume: give --lane or --all, not both")
    if not args.all and not args.lane:
        raise UsageError("resume: give --lane LANE (repeat it for several) or --all")
    lanes = list(settings.sms_lanes) if args.all else list(dict.fromkeys(args.lane))
    for lane in lanes:
        if lane not in settings.sms_lanes and store.paused(lane) is None:
            raise UsageError(f"--lane {lane}: unknown lane {lane!r}; SMS_LANES has {', '.join(settings.sms_lanes)}")
    return lanes


def _when(value: str | None) -> datetime | None:
    """An ISO date-time flag with its time zone; SmsWorkerError otherwise."""
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise SmsWorkerError(f"not an ISO date-time: {value!r} (e.g. 2026-11-27T10:00:00+00:00)") from None
    if parsed.tzinfo is None:
        raise SmsWorkerError(f"give a time zone: {value!r} (e.g. 2026-11-27T10:00:00+00:00)")
    return parsed


def cmd_logs(args: argparse.Namespace) -> int:
    from worker.accounts import Accounts
    from worker.provider import Provider, ProviderConfig

    settings = common.settings()
    accounts = Accounts.from_settings(settings)
    account = accounts.get(args.account) if getattr(args, "account", None) else accounts.default
    Accounts({account.name: account}, {}).require_keys()
    with Provider(ProviderConfig.from_settings(settings, account)) as provider:
        try:
            entries = provider.logs(
                message_id=args.message_id, bulk_id=args.bulk_id, campaign_reference_id=args.campaign_reference_id,
                mcc=args.mcc, mnc=args.mnc, sender=args.sender, destination=args.destination,
                general_status=args.general_status, sent_since=_when(args.sent_since),
                sent_until=_when(args.sent_until), limit=args.limit, entity_id=args.entity_id,
                application_id=args.application_id,
            )
        except ValueError as error:
            raise SmsWorkerError(str(error)) from None
    if args.json:
        common.print_json([e.raw for e in entries])
        return 0
    print(f"{'messageId':<40}{'bulkId':<28}{'destination':<16}{'status':<28}sentAt")
    for e in entries:
        status = e.status.name if e.status else "?"
        print(f"{e.message_id or '':<40}{e.bulk_id or '':<28}{e.destination or '':<16}{status:<28}{e.sent_at or ''}")
    print(f"{len(entries)} log entr{'y' if len(entries) == 1 else 'ies'}")
    return 0


def cmd_reconcile(args: argparse.Namespace) -> int:
    from worker.reconcile import force_reconcile

    settings = common.settings()
    store = common.store(settings)
    result = force_reconcile(settings, store, message_ids=args.message_id, bulk_ids=args.bulk_id)
    if args.json:
        common.print_json(result)
    else:
        print(f"checked {result['checked']}: reconciled {result['reconciled']} (now {result['now']}), "
              f"already settled {result['already_settled']}, unknown here {result['unknown']}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from worker.accounts import Accounts
    from worker.provider import Provider, ProviderConfig
    from worker.redis_health import inspect
    from worker.settings import unknown_variables

    # The configuration first, whole: a wrong or missing setting stops the check before anything is
    # reached (ConfigError, exit 2). Variables that are no setting (misspelt ones) are warnings.
    settings = common.settings()
    accounts = Accounts.from_settings(settings).require_keys()  # every account's key
    print("configuration: ok")
    for unknown in unknown_variables():
        print(f"configuration warning: {unknown.line()}")
    store = common.store(settings)
    store.ping()
    print(f"redis: ok ({settings.redis_url.split('@')[-1]})")
    # Reachable is not enough: a Redis that evicts keys or keeps nothing across a restart loses jobs
    # silently. One line per problem, naming the setting and its fix; the API is checked anyway.
    health = inspect(store, settings.sms_redis_allow_volatile)
    print(f"redis config: {health.summary()}")
    problems = health.blocking()
    for finding in health.findings:
        if finding not in problems:
            print(f"redis {'accepted' if finding.acknowledged else finding.level}: {finding.line()}")
    for finding in problems:
        print(f"sms-worker: {finding.line()}", file=sys.stderr)
    for account in accounts.accounts.values():
        with Provider(ProviderConfig.from_settings(settings, account)) as provider:
            # GET /sms/3/logs is read-only and re-readable; GET /sms/3/reports would consume reports.
            provider.logs(limit=1)
        which = "" if account.is_default else f" (account {account.name})"
        print(f"icomm API{which}: ok ({account.base_url})")
    return 1 if problems else 0
