"""The icomm accounts: owns which account each lane sends through, and each account's own settings.

`default` is the account of today's variables (ICOMM_BASE_URL, ICOMM_API_KEY, SMS_RATE_LIMIT_MPS/RPS,
SMS_REPORTS_ENTITY_ID/APPLICATION_ID, SMS_WEBHOOK_SECRET); SMS_ACCOUNTS adds more, and each lane
names its account (`"account"` in SMS_LANES, `default` when it names none). Each account has its own
Provider (connection pool, key), its own rate-limit buckets, its own report drain (lease and page
source) and its own webhook secret; a 401/403 pauses only lanes of the account that got it.

Where a name in Redis depends on the account, `default` keeps exactly today's name (rate-limit
buckets `mps`/`rps`/`logs`, the `reports-drain` lease, page source `drain`, `reports:last_drain`),
so a configuration without SMS_ACCOUNTS runs as before.

A message's account is its lane's account (the message hash records the lane, not the account: the
submit script is left alone), so a lane moved to another account later has its older messages
looked up against the new one. Secrets: an Account's repr hides its key and webhook secret.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from worker.dispatch.config import Route
from worker.errors import ConfigError
from worker.provider import Provider, ProviderConfig
from worker.ratelimit import RateLimiter, RateLimiterConfig
from worker.settings import DEFAULT_ACCOUNT, Settings
from worker.settings_problems import EXAMPLES
from worker.store import Store


@dataclass(frozen=True, slots=True)
class Account:
    """One icomm account as this worker uses it."""

    name: str
    base_url: str
    api_key: str = field(repr=False)  # "" when its variable is unset: require_keys says so
    rate_limit_mps: float = 0.0
    rate_limit_rps: float = 0.0
    entity_id: str | None = None
    application_id: str | None = None
    webhook_secret: str | None = field(default=None, repr=False)
    lanes: tuple[str, ...] = ()
    key_variable: str = "ICOMM_API_KEY"  # where its key comes from, for the messages that name it

    @property
    def is_default(self) -> bool:
        return self.name == DEFAULT_ACCOUNT

    def _suffixed(self, base: str) -> str:
        return base if self.is_default else f"{base}:{self.name}"

    @property
    def bucket_prefix(self) -> str:
        """Prefix of its rate-limit bucket names; lane names hold no `:`, so `acct:...` never meets a
        lane's `mps:{lane}`."""
        return "" if self.is_default else f"acct:{self.name}:"

    @property
    def drain_lease(self) -> str:
        return self._suffixed("reports-drain")

    @property
    def drain_source(self) -> str:
        """The `src` of the raw pages its drain stores."""
        return self._suffixed("drain")

    @property
    def webhook_source(self) -> str:
        """The `src` of the raw pages its webhook calls store."""
        return self._suffixed("webhook")


@dataclass(frozen=True)
class Accounts:
    """account name -> Account, and lane -> account name."""

    accounts: dict[str, Account]
    lane_accounts: dict[str, str]

    @classmethod
    def from_settings(cls, settings: Settings) -> Accounts:
        lanes: dict[str, list[str]] = {}
        for lane, cfg in settings.sms_lanes.items():
            lanes.setdefault(cfg.account, []).append(lane)
        accounts: dict[str, Account] = {}
        for name in settings.account_names():
            if name == DEFAULT_ACCOUNT:
                accounts[name] = Account(
                    name, settings.icomm_base_url, settings.icomm_api_key.get_secret_value(),
                    rate_limit_mps=settings.sms_rate_limit_mps, rate_limit_rps=settings.sms_rate_limit_rps,
                    entity_id=settings.sms_reports_entity_id, application_id=settings.sms_reports_application_id,
                    webhook_secret=settings.webhook_secret(), lanes=tuple(lanes.get(name, ())),
                )
                continue
            spec = settings.sms_accounts[name]
            accounts[name] = Account(
                name, spec.base_url, settings.named_secret(spec.api_key_env) or "",
                rate_limit_mps=spec.rate_limit_mps, rate_limit_rps=spec.rate_limit_rps,
                entity_id=spec.entity_id, application_id=spec.application_id,
                webhook_secret=settings.named_secret(spec.webhook_secret_env) if spec.webhook_secret_env else None,
                lanes=tuple(lanes.get(name, ())), key_variable=spec.api_key_env,
            )
        return cls(accounts, {lane: cfg.account for lane, cfg in settings.sms_lanes.items()})

    def require_keys(self) -> Accounts:
        """Every account's key is set; else a ConfigError with one line per missing variable (for
        the processes that call the provider, as ICOMM_API_KEY is required today)."""
        problems = []
        for account in self.accounts.values():
            if account.api_key:
                continue
            if account.is_default:
                problems.append(f"ICOMM_API_KEY is not set (example: ICOMM_API_KEY={EXAMPLES['ICOMM_API_KEY'][:8]}...)")
            else:
                problems.append(f"{account.key_variable} is not set: it holds the API key of account {account.name!r} "
                                "(its api_key_env in SMS_ACCOUNTS)")
        if problems:
            raise ConfigError("\n".join(problems))
        return self

    def names(self) -> list[str]:
        return list(self.accounts)

    def of_lane(self, lane: str) -> Account:
        """The account a lane sends through; a lane nobody configured (swept as unknown_lane) has
        the default account, or the first one."""
        name = self.lane_accounts.get(lane, DEFAULT_ACCOUNT)
        return self.accounts.get(name) or next(iter(self.accounts.values()))

    @property
    def default(self) -> Account:
        """The account of the process-wide calls that name no lane (`sms-worker logs` without --account)."""
        return self.accounts.get(DEFAULT_ACCOUNT) or next(iter(self.accounts.values()))

    def get(self, name: str) -> Account:
        try:
            return self.accounts[name]
        except KeyError:
            raise ConfigError(f"unknown account {name!r} (the accounts: {', '.join(self.accounts)})") from None

    def webhook_secrets(self) -> list[tuple[str, str]]:
        """(account, secret) of every account with a webhook secret."""
        return [(a.name, a.webhook_secret) for a in self.accounts.values() if a.webhook_secret]



@dataclass
class Wired:
    """One Provider and one RateLimiter per account, and what the dispatcher and the sweep take from
    them (`routes`: lane -> Route for the lanes of accounts other than `default`; `lane_logs`: lane
    -> where its messages are looked up, None with one account). Closing closes the providers."""

    accounts: Accounts
    providers: dict[str, Provider]
    limiters: dict[str, RateLimiter]
    routes: dict[str, Route]
    lane_logs: dict[str, tuple[Provider, Callable[[], None]]] | None

    @property
    def main(self) -> str:
        """The account of the process-wide Provider (`default`, or the first when no lane uses it)."""
        return self.accounts.default.name

    def close(self) -> None:
        for provider in self.providers.values():
            provider.close()


def wire(settings: Settings, store: Store, accounts: Accounts | None = None) -> Wired:
    """Providers and limiters for every account (their keys required: ConfigError naming each missing one)."""
    accounts = (accounts or Accounts.from_settings(settings)).require_keys()
    providers = {name: Provider(ProviderConfig.from_settings(settings, a)) for name, a in accounts.accounts.items()}
    limiters = {name: RateLimiter(RateLimiterConfig.from_settings(settings, a), store)
                for name, a in accounts.accounts.items()}
    routes = {}
    for lane in settings.sms_lanes:
        account = accounts.of_lane(lane)
        if not account.is_default:
            routes[lane] = Route(providers[account.name], limiters[account.name], account.name, account.lanes,
                                 settings.webhook_delivery_url(account.webhook_secret))
    lane_logs = None
    if len(accounts.accounts) > 1:
        lane_logs = {lane: (providers[name], limiters[name].wait_for_logs_call)
                     for lane, name in ((lane, accounts.of_lane(lane).name) for lane in settings.sms_lanes)}
    return Wired(accounts, providers, limiters, routes, lane_logs)
