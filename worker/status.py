"""What the system looks like right now (`SystemStatus`), and how it reads for people: for
`sms-worker status` and the metrics. The reads themselves are the store's (`Store.snapshot`)."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from worker import redis_health
from worker.policy import LanePolicy
from worker.settings import DEFAULT_ACCOUNT, Settings
from worker.store import Store
from worker.store.ops import LaneSnapshot

HEARTBEAT_STALE_S = 30.0


@dataclass
class LaneStatus:
    lane: str
    depth: int  # entries in the outbox stream not yet settled (waiting or in flight)
    waiting: int  # not yet claimed by any dispatcher
    in_flight: int  # claimed, pending in the consumer group
    oldest_age_s: float | None  # age of the oldest entry still in the outbox
    paused: str | None
    paused_for_s: float | None = None  # how long the pause has left before it lifts by itself
    configured: bool = True  # False: an outbox stream of a lane SMS_LANES does not name
    scheduled: int = 0  # jobs held until their send_at (not in the outbox yet)
    next_due_in_s: float | None = None  # when the earliest of them is due (negative: overdue)
    # The traffic policy's rules in force (worker.policy.LanePolicy.describe), and on a lane with a
    # daily cap today's spend: unit ("messages", "parts") -> [counted today, today's cap].
    policy: dict[str, Any] = field(default_factory=dict)
    budget: dict[str, list[int]] | None = None
    # The lane's account when that account is at its daily cap today (a budget pause is then lifted
    # with `resume --account`), else None.
    account_at_cap: str | None = None


@dataclass
class SystemStatus:
    lanes: list[LaneStatus]
    ambiguous: int
    awaiting_reports: int
    dead_letters: int
    parked_reports: int
    events: int
    limiter: dict[str, Any]
    last_drain: dict[str, Any] | None
    workers: list[dict[str, Any]] = field(default_factory=list)
    # What the server will do with our data (worker.redis_health): its configuration, the findings
    # (eviction, no persistence, replica, unknown) and since when it holds this data set (marker).
    redis: dict[str, Any] = field(default_factory=dict)
    # Per icomm account (worker.accounts): its lanes, limits, booked-ahead time, last drain, the
    # lanes it has paused and, with a daily cap, today's spend (`budget`, like a lane's); never its
    # key. The default account's limiter and drain are also above.
    accounts: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _age_s(entry_id: str, now_s: float) -> float:
    return max(0.0, now_s - int(entry_id.split("-", 1)[0]) / 1000)


@dataclass(frozen=True)
class StatusConfig:
    """The settings a status snapshot reads."""

    lanes: tuple[str, ...]  # the configured lanes, in SMS_LANES order
    allow_volatile: bool  # SMS_REDIS_ALLOW_VOLATILE
    rate_limit_mps: float  # 0: no limit
    rate_limit_rps: float
    policies: tuple[LanePolicy, ...] = ()  # the configured lanes' traffic policies
    accounts: tuple[AccountView, ...] = ()  # the accounts in use (Settings.account_names())

    @classmethod
    def from_settings(cls, settings: Settings) -> StatusConfig:
        views = []
        for name in settings.account_names():
            lanes = tuple(lane for lane, cfg in settings.sms_lanes.items() if cfg.account == name)
            cap = settings.account_daily_cap(name)
            caps = ((cap.messages or 0), (cap.parts or 0)) if cap else (0, 0)
            if name == DEFAULT_ACCOUNT:
                views.append(AccountView(name, lanes, settings.sms_rate_limit_mps, settings.sms_rate_limit_rps, *caps))
            else:
                spec = settings.sms_accounts[name]
                views.append(AccountView(name, lanes, spec.rate_limit_mps, spec.rate_limit_rps, *caps))
        return cls(lanes=tuple(settings.sms_lanes), allow_volatile=settings.sms_redis_allow_volatile,
                   rate_limit_mps=settings.sms_rate_limit_mps, rate_limit_rps=settings.sms_rate_limit_rps,
                   policies=tuple(LanePolicy.of(lane, cfg) for lane, cfg in settings.sms_lanes.items()),
                   accounts=tuple(views))


@dataclass(frozen=True)
class AccountView:
    """What status shows of an account: no URL credentials, no key."""

    name: str
    lanes: tuple[str, ...]
    rate_limit_mps: float
    rate_limit_rps: float
    cap_messages: int = 0  # its daily caps over all its lanes (0: none)
    cap_parts: int = 0


def collect(config: StatusConfig, store: Store, *, all_outboxes: bool = False) -> SystemStatus:
    """One snapshot, a handful of round trips (pipelined).

    `all_outboxes` adds every other outbox stream that exists (a lane nobody configured, written
    with plain XADD) after the configured lanes; finding them SCANs the whole keyspace, so the
    `status` command does it and the metrics scrape does not."""
    now = time.time()
    lanes = list(config.lanes)
    if all_outboxes:
        lanes += [lane for lane in store.outbox_lanes() if lane not in config.lanes]
    snap = store.snapshot(lanes)
    ambiguous = store.count_ambiguous(lanes)
    health = redis_health.inspect(store, config.allow_volatile)
    redis_info = {**health.as_dict(), "data_since": redis_health.marker_since(snap.marker)}
    statuses = [_lane_status(lane, raw, now, configured=lane in config.lanes)
                for lane, raw in zip(lanes, snap.lanes, strict=True)]
    _add_policies(config, store, statuses)
    workers = []
    for name, beat in sorted(snap.heartbeats.items()):
        age = now - beat / 1000
        workers.append({"consumer": name, "last_seen_s": round(age, 1), "alive": age < HEARTBEAT_STALE_S})
    tat = snap.booked_until_us
    limiter: dict[str, Any] = {
        "messages_per_s": config.rate_limit_mps or None,
        "requests_per_s": config.rate_limit_rps or None,
        # How far ahead of now the shared bucket is booked (0 = tokens available now).
        "booked_ahead_ms": max(0.0, round((tat / 1e6 - now) * 1000, 1)) if tat is not None else 0.0,
    }
    accounts = _accounts(config, store, statuses, limiter, snap.last_drain or None, now)
    return SystemStatus(statuses, ambiguous, snap.awaiting, snap.dead_letters, snap.parked, snap.events, limiter,
                        snap.last_drain or None, workers, redis=redis_info, accounts=accounts)


def _accounts(config: StatusConfig, store: Store, lanes: list[LaneStatus], limiter: dict[str, Any],
              last_drain: dict[str, Any] | None, now: float) -> list[dict[str, Any]]:
    """One entry per account; the default account's limiter and drain are the ones read above, an
    other account's cost one round trip each (only configurations with SMS_ACCOUNTS pay it), and the
    capped accounts' spend one more."""
    paused = {lane.lane: lane.paused for lane in lanes if lane.paused}
    capped = [v.name for v in config.accounts if v.cap_messages or v.cap_parts]
    spend = store.account_spend_today(capped) if capped else {}
    out = []
    for view in config.accounts:
        if view.name == DEFAULT_ACCOUNT:
            booked, drain = limiter["booked_ahead_ms"], last_drain
        else:
            tat, record = store.account_state(f"acct:{view.name}:mps", view.name)
            booked = max(0.0, round((tat / 1e6 - now) * 1000, 1)) if tat is not None else 0.0
            drain = record or None
        budget = None
        today = spend.get(view.name)
        if today is not None:
            budget = {unit: [used, cap + today.extra] for unit, used, cap in (
                ("messages", today.messages, view.cap_messages), ("parts", today.parts, view.cap_parts)) if cap}
            if today.at_cap(view.cap_messages, view.cap_parts):
                for lane in lanes:
                    if lane.lane in view.lanes:
                        lane.account_at_cap = view.name
        out.append({"account": view.name, "lanes": list(view.lanes),
                    "messages_per_s": view.rate_limit_mps or None, "requests_per_s": view.rate_limit_rps or None,
                    "booked_ahead_ms": booked, "last_drain": drain,
                    "paused": {lane: paused[lane] for lane in view.lanes if lane in paused}, "budget": budget})
    return out


def _add_policies(config: StatusConfig, store: Store, statuses: list[LaneStatus]) -> None:
    """Each lane's rules, and today's spend against its caps (one more round trip, only with caps)."""
    policies = {p.lane: p for p in config.policies}
    capped = [p.lane for p in config.policies if p.cap_messages or p.cap_parts]
    spend = store.spend_today(capped) if capped else {}
    for lane in statuses:
        policy = policies.get(lane.lane)
        if policy is None:
            continue
        lane.policy = policy.describe()
        today = spend.get(lane.lane)
        if today is not None:
            lane.budget = {unit: [used, cap + today.extra] for unit, used, cap in (
                ("messages", today.messages, policy.cap_messages), ("parts", today.parts, policy.cap_parts)) if cap}


def _lane_status(lane: str, raw: LaneSnapshot, now: float, *, configured: bool) -> LaneStatus:
    return LaneStatus(
        lane=lane, depth=raw.depth, waiting=max(0, raw.depth - raw.pending), in_flight=raw.pending,
        oldest_age_s=round(_age_s(raw.head_id, now), 3) if raw.head_id is not None else None,
        paused=raw.paused,
        paused_for_s=round(raw.pause_ms / 1000, 1) if raw.paused and raw.pause_ms >= 0 else None,
        configured=configured, scheduled=raw.scheduled,
        next_due_in_s=round(raw.next_due_ms / 1000 - now, 1) if raw.next_due_ms is not None else None,
    )



UNCONFIGURED = "not configured: its jobs are dead-lettered as unknown_lane"


def duration(seconds: float) -> str:
    """A duration for people: 850 ms, 12.3 s, 4.2 min, 3.1 h, 2.0 d."""
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:,.1f} d"


def _plural(n: int | str, word: str) -> str:
    return f"{n} {word}" if str(n) == "1" else f"{n} {word}s"


def _table(rows: list[list[str]], right: set[int]) -> list[str]:
    """Columns padded to their widest cell (the header is rows[0]), `right` ones right-aligned."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
                      for i, cell in enumerate(row)).rstrip() for row in rows]


def render(status: SystemStatus) -> str:
    """A readable report for people: an aligned table of lanes, then one labelled line per fact."""
    rows = [["lane", "depth", "waiting", "in flight", "oldest", "scheduled", "next due", "paused"]]
    for lane in status.lanes:
        paused = "no"
        if lane.paused:
            left = f", lifts in {duration(lane.paused_for_s)}" if lane.paused_for_s is not None else ""
            # A budget pause is lifted by raising the cap: the account's when the account is at its cap.
            if lane.paused == "budget" and lane.account_at_cap:
                how = f"--account {lane.account_at_cap} --extra N"
            else:
                how = f"--lane {lane.lane}" + (" --extra N" if lane.paused == "budget" else "")
            paused = f"{lane.paused}{left} (sms-worker resume {how})"
        rows.append([lane.lane, f"{lane.depth:,}", f"{lane.waiting:,}", f"{lane.in_flight:,}",
                     "-" if lane.oldest_age_s is None else duration(lane.oldest_age_s),
                     f"{lane.scheduled:,}", _due(lane.next_due_in_s),
                     paused if lane.configured else f"{paused}  ({UNCONFIGURED})"])
    lines = _table(rows, right={1, 2, 3, 4, 5, 6})

    limiter = status.limiter
    rates = ", ".join(f"{unit} {'none (no limit)' if limiter.get(key) is None else f'{limiter[key]:g}'}"
                      for key, unit in (("messages_per_s", "messages/s"), ("requests_per_s", "requests/s")))
    booked = duration(float(limiter.get("booked_ahead_ms") or 0.0) / 1000)
    facts: list[tuple[str, list[str]]] = [
        ("ambiguous (awaiting reconciliation)", [f"{status.ambiguous:,}"]),
        ("accepted, awaiting a final report", [f"{status.awaiting_reports:,}"]),
        ("dead letters", [f"{status.dead_letters:,}" + ("  (sms-worker dlq list)" if status.dead_letters else "")]),
        ("parked reports (message unknown)", [f"{status.parked_reports:,}"]),
        ("events stream length", [f"{status.events:,}"]),
        ("rate limiter", [f"{rates}; booked ahead {booked}"]),
        ("last drain", [_render_drain(status.last_drain)]),
        *_render_accounts(status.accounts),
        ("workers", _render_workers(status.workers)),
        *_render_policies(status.lanes),
        *_render_redis(status.redis),
    ]
    width = max(len(label) for label, _ in facts) + 2
    lines.append("")
    for label, values in facts:
        lines.append(f"{label + ':':<{width}}{values[0]}")
        lines += [f"{'':<{width}}{value}" for value in values[1:]]
    return "\n".join(lines)


def _due(in_s: float | None) -> str:
    if in_s is None:
        return "-"
    return f"in {duration(in_s)}" if in_s >= 0 else f"{duration(-in_s)} overdue"


def _render_drain(drain: dict[str, Any] | None) -> str:
    if not drain:
        return "never"
    at = drain.get("at") or "?"
    try:
        ago = time.time() - datetime.fromisoformat(at).timestamp()
    except ValueError:
        ago = -1.0
    when = f"{at} ({duration(ago)} ago)" if ago >= 0 else at
    return (f"{when}: {drain.get('outcome') or '?'}, {_plural(drain.get('pages', '?'), 'page')}, "
            f"{_plural(drain.get('reports', '?'), 'report')}")


def _render_accounts(accounts: list[dict[str, Any]]) -> list[tuple[str, list[str]]]:
    """One line per account, once there is more than the default one or an account has a daily cap
    (a configuration without either reads as before)."""
    only_default = [a["account"] for a in accounts] == [DEFAULT_ACCOUNT]
    if not accounts or (only_default and not any(a.get("budget") for a in accounts)):
        return []
    lines = []
    for a in accounts:
        rates = ", ".join(f"{unit} {'no limit' if a[key] is None else f'{a[key]:g}'}"
                          for key, unit in (("messages_per_s", "messages/s"), ("requests_per_s", "requests/s")))
        paused = ", ".join(f"{lane} {reason}" for lane, reason in a["paused"].items())
        spend = "; ".join(f"{used:,}/{cap:,} {unit} today" + (" (AT CAP)" if used >= cap else "")
                          for unit, (used, cap) in (a.get("budget") or {}).items())
        lines.append(f"{a['account']}: lanes {', '.join(a['lanes']) or 'none'}; {rates}; booked ahead "
                     f"{duration(float(a['booked_ahead_ms']) / 1000)}; last drain {_render_drain(a['last_drain'])}"
                     + (f"; daily cap {spend}" if spend else "") + (f"; PAUSED {paused}" if paused else ""))
    return [("accounts", lines)]


def _render_workers(workers: list[dict[str, Any]]) -> list[str]:
    if not workers:
        return ["none"]
    rows = [[w["consumer"], f"seen {duration(w['last_seen_s'])} ago",
             "alive" if w["alive"] else f"STALE (no heartbeat for {duration(HEARTBEAT_STALE_S)})"] for w in workers]
    return _table(rows, right=set())


def _render_policies(lanes: list[LaneStatus]) -> list[tuple[str, list[str]]]:
    """One line per lane with a traffic policy: its rules, and today's spend against its caps."""
    lines = []
    for lane in lanes:
        if not lane.policy:
            continue
        rules = ", ".join(f"{name} {_rule_value(value)}" for name, value in lane.policy.items())
        spend = "; ".join(f"{used:,}/{cap:,} {unit} today" + (" (AT CAP)" if used >= cap else "")
                          for unit, (used, cap) in (lane.budget or {}).items())
        lines.append(f"{lane.lane}: {rules}" + (f"; {spend}" if spend else ""))
    return [("traffic policy", lines)] if lines else []


def _rule_value(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    if isinstance(value, dict):
        return ",".join(f"{k} {v:,}" for k, v in value.items())
    return str(value).lower() if isinstance(value, bool) else str(value)


def _render_redis(info: dict[str, Any]) -> list[tuple[str, list[str]]]:
    if not info:
        return []
    policy = info.get("maxmemory_policy") or "unknown"
    since = info.get("data_since")
    lines = [f"{info.get('version') or 'unknown version'} {info.get('role') or 'unknown role'}, "
             f"maxmemory-policy {policy}, persistence {info.get('persistence') or 'unknown'}"
             + ("" if info.get("config_readable") else " (CONFIG not allowed: read from INFO)")
             + (f", data set since {since}" if since else ", no instance marker yet (no worker ran)")]
    for finding in info.get("findings", []):
        level = "accepted" if finding["acknowledged"] else finding["level"].upper()
        lines.append(f"  {level:<8} {finding['message']}")
    return [("redis", lines)]
