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
from worker.settings import DEFAULT_ACCOUNT, Settings

if TYPE_CHECKING:
    from worker.store import Store
    from worker.store.policy import Spend
    from worker.triggers import Triggers


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
    """Lift lanes' pauses now (after fixing an API key, or once the provider is back); with --account,
    raise an account's daily caps for today and lift its lanes' budget pauses."""
    settings = common.settings()
    store = common.store(settings)
    if args.account is not None:
        if args.lane or args.all:
            raise UsageError("resume: give --account, or --lane / --all, not both")
        _check_extra(args)
        return _resume_account(settings, store, args)
    lanes = _lanes_to_resume(settings, store, args)
    triggers = common.triggers(settings, store)
    _check_extra(args)
    lifted, refused = [], 0
    for lane in lanes:
        reason = store.paused(lane)
        if reason is None:
            print(f"{lane}: not paused")
            continue
        if reason == "budget" and not _raise_budget(settings, store, lane, args):
            refused += 1
            continue
        _lift(store, triggers, lane, reason, wake=lane in settings.sms_lanes)
        lifted.append(reason)
    if "auth" in lifted:
        print("if the API key is still refused, the next batch pauses the lane again (`sms-worker check` "
              "verifies the key the workers would use, from the same settings)")
    return 1 if refused else 0


def _check_extra(args: argparse.Namespace) -> None:
    if args.extra is not None and args.extra < 1:
        raise UsageError(f"--extra {args.extra}: give how many more messages (and parts) to allow today, at least 1")


def _used(spend: Spend) -> str:
    return f"{spend.messages:,} messages, {spend.parts:,} parts today (UTC)"


def _confirmed(who: str, question: str, args: argparse.Namespace) -> bool:
    """--yes, or a y/N answer on a terminal; without a terminal a budget is never raised unasked."""
    if args.yes:
        return True
    if not sys.stdin.isatty():
        print(f"sms-worker: {who}: not resumed: raising a budget needs a confirmation; run with --yes "
              "(no terminal to ask on)", file=sys.stderr)
        return False
    if input(f"{question} [y/N] ").strip().lower() not in ("y", "yes"):
        print(f"{who}: not resumed")
        return False
    return True


def _raise_budget(settings: Settings, store: Store, lane: str, args: argparse.Namespace) -> bool:
    """A lane paused at its daily cap resumes only with more allowance (`--extra N`), confirmed by
    --yes or a y/N answer on a terminal: resuming without it would pause again at the next batch.
    A lane paused because its account is at the account's cap is pointed to `--account`: raising the
    lane's own caps would not let it send."""
    from worker.policy import LanePolicy

    spend = store.spend_today([lane])[lane]
    used = _used(spend)
    policy = LanePolicy.of(lane, settings.sms_lanes[lane]) if lane in settings.sms_lanes else None
    account_note = ""
    if policy is not None and policy.account_capped:
        account = store.account_spend_today([policy.account])[policy.account]
        if account.at_cap(policy.account_cap_messages, policy.account_cap_parts):
            hint = f"sms-worker resume --account {policy.account} --extra N"
            if not spend.at_cap(policy.cap_messages, policy.cap_parts):
                print(f"sms-worker: {lane}: paused for budget because its account {policy.account} is at the "
                      f"account's daily cap ({_used(account)}); give `{hint}` to raise the account's caps, or "
                      "wait: the pause lifts by itself at midnight UTC", file=sys.stderr)
                return False
            account_note = f"; its account {policy.account} is at its daily cap too: {hint}"
    if args.extra is None:
        print(f"sms-worker: {lane}: paused for budget, its daily cap is reached ({used}); give --extra N to raise "
              "today's caps by N and resume it, or wait: the pause lifts by itself at midnight UTC", file=sys.stderr)
        return False
    if not _confirmed(lane, f"{lane}: raise today's caps by {args.extra:,} ({used}) and resume sending?", args):
        return False
    after = store.raise_budget(lane, args.extra)
    print(f"{lane}: today's caps raised by {after.extra:,} in all; the counters stay ({used}), so the lane pauses "
          f"again once it has sent the extra; tomorrow the configured caps apply{account_note}")
    return True


def _resume_account(settings: Settings, store: Store, args: argparse.Namespace) -> int:
    """`resume --account A --extra N`: raise the account's caps for today by N (confirmed like the lane
    form), then lift the budget pauses of its lanes, except a lane still at its own lane cap."""
    from worker.policy import LanePolicy

    account = args.account
    known = [DEFAULT_ACCOUNT, *settings.sms_accounts]
    if account not in known:
        raise UsageError(f"--account {account}: unknown account {account!r} (the accounts: {', '.join(known)})")
    cap = settings.account_daily_cap(account)
    if cap is None:
        where = "SMS_ACCOUNT_DAILY_CAP" if account == DEFAULT_ACCOUNT else "its daily_cap in SMS_ACCOUNTS"
        raise UsageError(f"--account {account}: the account has no daily cap ({where}), so there is none to raise; "
                         "lift a lane's pause with --lane")
    spend = store.account_spend_today([account])[account]
    used = _used(spend)
    who = f"account {account}"
    if args.extra is None:
        print(f"sms-worker: {who}: give --extra N to raise the account's caps for today by N and resume its lanes "
              f"({used}), or wait: its lanes' budget pauses lift by themselves at midnight UTC", file=sys.stderr)
        return 1
    if not _confirmed(who, f"{who}: raise today's caps by {args.extra:,} ({used}) and resume its lanes?", args):
        return 1
    after = store.raise_account_budget(account, args.extra)
    print(f"{who}: today's caps raised by {after.extra:,} in all; the counters stay ({used}), so its lanes pause "
          "again once they have sent the extra; tomorrow the configured caps apply")
    lanes = [lane for lane, cfg in settings.sms_lanes.items() if cfg.account == account]
    own = store.spend_today(lanes)
    triggers = common.triggers(settings, store)
    for lane in lanes:
        reason = store.paused(lane)
        if reason is None:
            print(f"{lane}: not paused")
            continue
        if reason != "budget":
            print(f"{lane}: paused ({reason}), not for budget: left as it is (sms-worker resume --lane {lane})")
            continue
        policy = LanePolicy.of(lane, settings.sms_lanes[lane])
        if own[lane].at_cap(policy.cap_messages, policy.cap_parts):
            print(f"{lane}: still at its own daily cap ({_used(own[lane])}): left paused "
                  f"(sms-worker resume --lane {lane} --extra N)")
            continue
        _lift(store, triggers, lane, reason, wake=True)
    return 0


def _lift(store: Store, triggers: Triggers, lane: str, reason: str, *, wake: bool) -> None:
    """Lift `lane`'s pause and wake its dispatcher (`wake`: it is a configured lane)."""
    store.resume(lane)
    print(f"{lane}: lifted the pause ({reason}); its dispatcher is woken now")
    if wake:
        with contextlib.suppress(StoreError):  # the clock's tick wakes the lane anyway
            triggers.dispatch(lane)


def _lanes_to_resume(settings: Settings, store: Store, args: argparse.Namespace) -> list[str]:
    """--all, or the --lane ones: configured, or paused (a lane taken out of SMS_LANES may still be)."""
    if args.all and args.lane:
        raise UsageError("resume: give --lane or --all, not both")
    if not args.all and not args.lane:
        raise UsageError("resume: give --lane LANE (repeat it for several), --all, or --account ACCOUNT --extra N")
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
