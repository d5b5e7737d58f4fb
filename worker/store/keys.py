"""Every Redis key name of the worker: the one catalogue (prefix `sms` by default).

    {p}:outbox:{lane}             stream, one entry per job (`job` JSON, optional `mid`), group `dispatch`
    {p}:msg:{message_id}          hash, the message's state, job, attempts, bulk id, campaign, trail (TTL: state TTL)
    {p}:scheduled:{lane}          sorted set, SCHEDULED message ids by due time (ms); their job is in the hash
    {p}:idem:{producer_id}        string, the message id a producer id was queued as (TTL: retention)
    {p}:events                    stream, status events (`event` JSON)
    {p}:campaign:{campaign_id}    hash, a campaign's counters: total, per state, sent, price:<CUR> (TTL >= state TTL)
    {p}:campaigns                 sorted set, campaign ids by last update (ms)
    {p}:dlq                       stream, dead letters (`message_id`, `entry` JSON)
    {p}:awaiting                  sorted set, accepted message ids by report deadline (ms)
    {p}:rl:{bucket}               GCRA bucket (TAT, microseconds); another account's are rl:acct:{account}:mps...
    {p}:dispatchers:{lane}        sorted set, dispatcher slots by lease expiry (ms)
    {p}:kick:{lane}               de-duplicates dispatch kicks
    {p}:pause:{lane}              set while a lane is paused (value: the reason); expires by itself
    {p}:fence:{token}             lives while a batch may still write its request (TTL: the send window)
    {p}:lease:{name}              a named lease's holder (the reports drain); {p}:fence:{name} its token
                                  (another account's drain: lease:reports-drain:{account})
    {p}:reports:raw               stream, report pages as fetched or pushed, group `reports`
    {p}:reports:parked            hash, reports that arrived before their message's acceptance
    {p}:reports:parked:since      sorted set, parked message ids by first arrival (ms)
    {p}:reports:stats             hash, report counters (applied, parked, dropped...)
    {p}:reports:lookup            sorted set, overdue message ids to look up in the logs, by due time
    {p}:reports:lookup:tries      hash, logs lookups made per message id
    {p}:reports:lookup:cursor     the awaiting-set score the overdue scan has reached
    {p}:reports:last_drain        hash, the last drain's time, pages and results
    {p}:reports:last_drain:{acct} the same for an account of SMS_ACCOUNTS (worker.accounts; `default` has the above)
    {p}:heartbeats                hash, consumer name -> last heartbeat (ms)
    {p}:policy:{lane}:n:{w}       hash, number -> messages counted in velocity window w (TTL: the window's end)
    {p}:policy:{lane}:p:{w}       hash, number prefix -> messages counted in window w (likewise)
    {p}:policy:{lane}:c:{d}       hash, campaign id -> messages counted on UTC day d (TTL: past the day's end)
    {p}:policy:{lane}:day:{d}     hash, UTC day d's spend: messages, parts, extra (resume --extra) (TTL 2 d)
    {p}:policy:{lane}:m:{s}       hash, message hash key -> 1: counted in two-hour slot s (kept to its end + 4 h)
    {p}:policy:acct:{account}:day:{d}  hash, an account's spend on UTC day d over all its lanes: messages,
                                  parts, extra (resume --account --extra); only for an account with a daily_cap
                                  (TTL 2 d). Lane names hold no `:`, so it never meets a lane's key.
    {p}:suppressed                set, opted-out numbers in normal form (worker.numbers.normalise), no TTL
    {p}:instance                  the Redis instance marker (a restart that lost data changes it)
Redis Cluster is not supported: scripts touch keys of several slots in one call.
"""

from __future__ import annotations


class Keys:
    """Key names under one prefix; `Store` inherits them, so `store.outbox(lane)` names a key."""

    def __init__(self, prefix: str = "sms", message_id_prefix: str = "sw") -> None:
        self.p = prefix
        self.mid_prefix = message_id_prefix

    # --- per lane, message, producer id or token ---------------------------------------------------
    def outbox(self, lane: str) -> str:
        return f"{self.p}:outbox:{lane}"

    def msg(self, message_id: str) -> str:
        return f"{self.p}:msg:{message_id}"

    def scheduled(self, lane: str) -> str:
        return f"{self.p}:scheduled:{lane}"

    def campaign(self, campaign_id: str) -> str:
        return f"{self.p}:campaign:{campaign_id}"

    def idem(self, producer_id: str) -> str:
        return f"{self.p}:idem:{producer_id}"

    def bucket(self, name: str) -> str:
        return f"{self.p}:rl:{name}"

    def dispatchers(self, lane: str) -> str:
        return f"{self.p}:dispatchers:{lane}"

    def kick_key(self, lane: str) -> str:
        return f"{self.p}:kick:{lane}"

    def pause_key(self, lane: str) -> str:
        return f"{self.p}:pause:{lane}"

    def fence_key(self, token: str) -> str:
        return f"{self.p}:fence:{token}"

    def lease_key(self, name: str) -> str:
        return f"{self.p}:lease:{name}"

    def policy_prefix(self, lane: str) -> str:
        """The prefix of a lane's traffic-policy counters (worker/lua/lib/guards.lua derives each name from it)."""
        return f"{self.p}:policy:{lane}:"

    def budget_key(self, lane: str, day: int) -> str:
        """A lane's spend on UTC day `day` (days since the epoch, on the Redis server's clock)."""
        return f"{self.policy_prefix(lane)}day:{day}"

    def account_policy_prefix(self, account: str) -> str:
        """The prefix of an account's traffic-policy counters (guards.lua derives `day:<d>` from it)."""
        return f"{self.p}:policy:acct:{account}:"

    def account_budget_key(self, account: str, day: int) -> str:
        """An account's spend on UTC day `day`, over all its lanes."""
        return f"{self.account_policy_prefix(account)}day:{day}"

    def lane_prefix(self, lane: str) -> str:
        """The message id prefix of a lane's jobs (`sw-otp-...`)."""
        return f"{self.mid_prefix}-{lane}-"

    # --- one per namespace ------------------------------------------------------------------------
    @property
    def events(self) -> str:
        return f"{self.p}:events"

    @property
    def campaigns(self) -> str:
        return f"{self.p}:campaigns"

    @property
    def dlq(self) -> str:
        return f"{self.p}:dlq"

    @property
    def awaiting(self) -> str:
        return f"{self.p}:awaiting"

    @property
    def reports_raw(self) -> str:
        return f"{self.p}:reports:raw"

    @property
    def reports_parked(self) -> str:
        return f"{self.p}:reports:parked"

    @property
    def reports_parked_since(self) -> str:
        return f"{self.p}:reports:parked:since"

    @property
    def reports_stats(self) -> str:
        return f"{self.p}:reports:stats"

    @property
    def reports_lookup(self) -> str:
        return f"{self.p}:reports:lookup"

    @property
    def reports_lookup_tries(self) -> str:
        return f"{self.p}:reports:lookup:tries"

    @property
    def reports_lookup_cursor(self) -> str:
        return f"{self.p}:reports:lookup:cursor"

    @property
    def last_drain(self) -> str:
        return f"{self.p}:reports:last_drain"

    def last_drain_of(self, account: str | None) -> str:
        """The last drain's record of `account` (None: the default account's, `last_drain`)."""
        return self.last_drain if account is None else f"{self.last_drain}:{account}"

    @property
    def heartbeats(self) -> str:
        return f"{self.p}:heartbeats"

    @property
    def suppressed_key(self) -> str:
        return f"{self.p}:suppressed"

    @property
    def instance_marker(self) -> str:
        return f"{self.p}:instance"
