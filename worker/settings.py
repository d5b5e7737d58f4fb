"""The settings: owns every knob of the worker, typed, validated once at start-up, frozen.

Field names are the environment variable names in lower case (`ICOMM_API_KEY` -> `icomm_api_key`);
units are in the names. Tests build `Settings(...)` directly instead of patching the environment.

`load_settings()` reads the environment and an env file: `.env` in the working directory, or the
file named by SMS_ENV_FILE (`sms-worker --env-file FILE` sets it for the command and every process it
starts); a variable set in the real environment wins over the file. An empty value means unset.
Every mistake is one line of the ConfigError naming the variable; `unknown_variables()` lists the
SMS_*/ICOMM_* variables that are no setting (a misspelt one would otherwise be ignored silently).

The env file and the unknown variables are found by worker.settings_env, the mistakes worded by
worker.settings_problems; import their names from here. Each component takes a small config of
its own built from these settings (`OutboxConfig.from_settings(settings)`, ...).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict, SettingsError

from worker import settings_env
from worker.errors import ConfigError
from worker.settings_env import (
    DEFAULT_ENV_FILE,
    ENV_FILE_VARIABLE,
    NOT_SETTINGS,
    NOT_SETTINGS_PREFIXES,
    UnknownVariable,
    env_file_path,
    read_env_file,
)
from worker.settings_problems import EXAMPLES, format_problems

# What other modules and the tests import from here (the env-file and problem helpers live in
# worker.settings_env and worker.settings_problems).
__all__ = [
    "DEFAULT_ACCOUNT", "DEFAULT_ENV_FILE", "ENV_FILE_VARIABLE", "EXAMPLES", "NOT_SETTINGS", "NOT_SETTINGS_PREFIXES",
    "SETTING_NAMES", "AccountConfig", "Countries", "DailyCap", "LaneConfig", "NumberVelocity", "PrefixVelocity",
    "Settings", "UnknownVariable", "Velocity", "env_file_path", "load_settings", "settings_from_env",
    "unknown_variables",
]

_LANE_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
# The account of today's variables (ICOMM_BASE_URL, ICOMM_API_KEY, SMS_RATE_LIMIT_*, SMS_REPORTS_*_ID,
# SMS_WEBHOOK_SECRET): every lane that names no account sends through it.
DEFAULT_ACCOUNT = "default"
# Account names follow the lane names' rule: they go into Redis key names, metric labels and page sources.
_ACCOUNT_NAME = _LANE_NAME
_ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]{0,127}$"
# Dramatiq's own rule for queue names (dramatiq.actor._queue_name_re); actor names follow it too.
_DRAMATIQ_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9._-]*$")


def _no_boolean(value: Any) -> Any:
    if isinstance(value, bool):  # JSON true is no batch size or limit (pydantic would take it as 1)
        raise ValueError("must be a number, not true or false")
    return value


# A guard's counts and limits are JSON numbers, never true/false (see _no_boolean).
_Count = Annotated[int, BeforeValidator(_no_boolean)]


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class NumberVelocity(_Strict):
    """At most `limit` messages to one destination number per fixed window of `window_s`."""

    limit: Annotated[_Count, Field(ge=1, le=1_000_000)]
    window_s: Annotated[_Count, Field(ge=1, le=31 * 86400)]


class PrefixVelocity(NumberVelocity):
    """The same per number prefix: the number without its last `digits_dropped` digits."""

    digits_dropped: Annotated[_Count, Field(ge=1, le=8)] = 3


class Velocity(_Strict):
    per_number: NumberVelocity | None = None
    per_prefix: PrefixVelocity | None = None


class Countries(_Strict):
    """ISO 3166 regions (from the number itself, worker.numbers.facts): an allow-list or a block-list."""

    allow: list[Annotated[str, Field(pattern=r"^[A-Z]{2}$")]] | None = None
    block: list[Annotated[str, Field(pattern=r"^[A-Z]{2}$")]] | None = None

    @model_validator(mode="after")
    def _one_list(self) -> Countries:
        if (self.allow is None) == (self.block is None):
            raise ValueError('give either "allow" or "block" (a list of ISO regions such as "CH"), not both or neither')
        return self


class DailyCap(_Strict):
    """Messages and SMS parts a lane (or an account, over all its lanes) may send per UTC day (either or both)."""

    messages: Annotated[_Count, Field(ge=1)] | None = None
    parts: Annotated[_Count, Field(ge=1)] | None = None

    @model_validator(mode="after")
    def _some_cap(self) -> DailyCap:
        if self.messages is None and self.parts is None:
            raise ValueError('give "messages", "parts" or both')
        return self


class AccountConfig(_Strict):
    """One more icomm account (SMS_ACCOUNTS): where its API is, the NAME of the variable holding its
    key (a key never goes into the JSON, which is shown in errors and config dumps), its own rate
    limits (0 = none), its reports' entityId/applicationId, and optionally the NAME of the variable
    holding its webhook secret."""

    base_url: str
    api_key_env: Annotated[str, Field(pattern=_ENV_NAME)]
    rate_limit_mps: Annotated[float, Field(ge=0), BeforeValidator(_no_boolean)] = 0.0
    rate_limit_rps: Annotated[float, Field(ge=0), BeforeValidator(_no_boolean)] = 0.0
    entity_id: Annotated[str, Field(max_length=255)] | None = None
    application_id: Annotated[str, Field(max_length=255)] | None = None
    webhook_secret_env: Annotated[str, Field(pattern=_ENV_NAME)] | None = None
    # Messages and parts per UTC day over every lane of the account (worker.policy; None: no cap).
    daily_cap: DailyCap | None = None

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        return _check_http_url(value)  # the ICOMM_BASE_URL rule


class LaneConfig(BaseModel):
    """How one lane batches: `otp` waits ~0 ms for company, `bulk` waits to fill big batches; and its
    traffic policy (worker.policy), every guard off unless set, except the defaults that depend on
    the lane's name (None here: worker.policy.LanePolicy resolves them)."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    batch_size: Annotated[int, Field(ge=1, le=10_000)] = 1000
    max_wait_ms: Annotated[int, Field(ge=0, le=60_000)] = 250
    concurrency: Annotated[int, Field(ge=1, le=64)] = 4
    # Share of the global messages/s limit this lane may use (1.0 = all of it).
    rate_share: Annotated[float, Field(gt=0, le=1)] = 1.0
    # The icomm account it sends through: `default` (today's ICOMM_* variables) or one of SMS_ACCOUNTS.
    account: Annotated[str, Field(pattern=_ACCOUNT_NAME.pattern)] = DEFAULT_ACCOUNT
    # --- traffic policy (worker.policy; config/example.env documents each) ---
    velocity: Velocity | None = None
    countries: Countries | None = None
    # phonenumbers PhoneNumberType names; None: PREMIUM_RATE and SHARED_COST on the lane named otp, none elsewhere.
    block_number_types: list[str] | None = None
    # Reject numbers on the suppression list; None: on for the lane named bulk, off elsewhere.
    suppression: bool | None = None
    max_parts: Annotated[_Count, Field(ge=1, le=255)] | None = None
    allow_ucs2: bool = True
    # When the guards' own state cannot be read; None: open on the lane named otp, closed elsewhere.
    on_guard_error: Literal["open", "closed"] | None = None
    daily_cap: DailyCap | None = None
    # Messages per campaign_reference_id per UTC day on this lane; the rest wait for the next day.
    campaign_daily_cap: Annotated[_Count, Field(ge=1)] | None = None
    # The daily cap of the account the lane sends through: not a key of the lane's JSON but resolved
    # by Settings at start-up (SMS_ACCOUNTS' daily_cap, SMS_ACCOUNT_DAILY_CAP for `default`), so
    # every component that has the lane's config (the dispatcher's guard, status) sees it.
    _account_cap: DailyCap | None = PrivateAttr(default=None)

    @property
    def account_cap(self) -> DailyCap | None:
        return self._account_cap

    @field_validator("batch_size", "max_wait_ms", "concurrency", "rate_share", mode="before")
    @classmethod
    def _no_booleans(cls, value: Any) -> Any:
        return _no_boolean(value)

    @field_validator("block_number_types")
    @classmethod
    def _number_types(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        import phonenumbers  # only a lane that names number types pays for the import here

        known = [name for name in vars(phonenumbers.PhoneNumberType) if name.isupper()]
        for name in value:
            if name not in known:
                raise ValueError(f"{name!r} is no phonenumbers PhoneNumberType (one of {', '.join(known)})")
        return value


def _default_lanes() -> dict[str, LaneConfig]:
    return {
        "otp": LaneConfig(batch_size=100, max_wait_ms=0, concurrency=2),
        # 8 bulks in flight keep a provider that takes 100 ms per POST from bounding throughput.
        "bulk": LaneConfig(batch_size=1000, max_wait_ms=250, concurrency=8),
    }


class Settings(BaseSettings):
    """Every knob of the worker, the clock and the web process."""

    # An empty value (`SMS_SEND_WINDOW_S=` as in config/example.env) means unset; inf and nan are no
    # durations or rates. The env file is given per load (load_settings), not here.
    model_config = SettingsConfigDict(
        frozen=True, extra="ignore", case_sensitive=False, env_ignore_empty=True, allow_inf_nan=False,
        env_file_encoding="utf-8-sig",
    )

    # --- the icomm API -------------------------------------------------------------------------
    icomm_base_url: str = "https://apisms.trx.icommarketing.com"
    icomm_api_key: SecretStr = SecretStr("")
    icomm_connect_timeout_s: Annotated[float, Field(gt=0, le=60)] = 3.0
    icomm_read_timeout_s: Annotated[float, Field(gt=0, le=300)] = 15.0
    icomm_write_timeout_s: Annotated[float, Field(gt=0, le=300)] = 10.0
    icomm_pool_timeout_s: Annotated[float, Field(gt=0, le=300)] = 5.0
    icomm_max_connections: Annotated[int, Field(ge=1, le=1000)] = 32
    # tenacity's attempts for requests that were certainly not acted on (connect error, 429, 503).
    icomm_send_retry_attempts: Annotated[int, Field(ge=1, le=20)] = 4
    icomm_retry_backoff_base_s: Annotated[float, Field(gt=0, le=60)] = 0.2
    icomm_retry_backoff_max_s: Annotated[float, Field(gt=0, le=600)] = 5.0

    # --- Redis -----------------------------------------------------------------------------------
    redis_url: str = "redis://127.0.0.1:6379/0"
    sms_key_prefix: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,32}$")] = "sms"
    # A Redis without persistence (no AOF, no RDB save points) loses every queued job when it restarts:
    # `sms-worker check` fails on one unless this says the operator accepts that (throwaway stacks).
    # An eviction policy other than noeviction is never accepted (worker/redis_health.py).
    sms_redis_allow_volatile: bool = False

    # --- sending -----------------------------------------------------------------------------
    sms_message_id_prefix: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,40}$")] = "sw"
    # NoDecode: the JSON is parsed by _lanes_json below, so a broken one is a named mistake, not a crash.
    sms_lanes: Annotated[dict[str, LaneConfig], NoDecode] = Field(default_factory=_default_lanes)
    # More icomm accounts besides `default`: name -> AccountConfig (JSON, parsed like SMS_LANES).
    sms_accounts: Annotated[dict[str, AccountConfig], NoDecode] = Field(default_factory=dict)
    # The `default` account's daily cap over all its lanes, JSON {"messages": N, "parts": M} (either
    # or both; parsed like SMS_LANES); another account's is `daily_cap` in SMS_ACCOUNTS. None: no cap.
    sms_account_daily_cap: Annotated[DailyCap | None, NoDecode] = None
    sms_default_lane: str = "bulk"
    sms_default_sender: str | None = None
    sms_rate_limit_mps: Annotated[float, Field(ge=0)] = 0.0  # 0 = no limit
    sms_rate_limit_rps: Annotated[float, Field(ge=0)] = 0.0  # 0 = no limit
    sms_rate_limit_burst_s: Annotated[float, Field(gt=0, le=60)] = 1.0
    sms_lease_s: Annotated[float, Field(gt=0, le=3600)] = 180.0
    sms_max_attempts: Annotated[int, Field(ge=1, le=1000)] = 10
    sms_retry_horizon_s: Annotated[float, Field(gt=0)] = 6 * 3600.0
    sms_reconcile_delay_s: Annotated[float, Field(ge=0, le=3600)] = 5.0
    # Fencing: a batch's request may only be written within this long of its SUBMITTING record
    # (checked against Redis and the local clock right before the first byte leaves); a takeover
    # waits it out before looking in the logs. Unset: the longest a send can take (see send_window_s).
    sms_send_window_s: Annotated[float, Field(gt=0, le=3600)] | None = None
    # A message missing from the provider's logs is resent only once it was missing in at least
    # SMS_RECONCILE_CHECKS checks spread over SMS_RECONCILE_WINDOW_S (the logs may lag a send).
    sms_reconcile_window_s: Annotated[float, Field(ge=0, le=86_400)] = 60.0
    sms_reconcile_checks: Annotated[int, Field(ge=1, le=20)] = 3
    # A 401/403 pauses the lane this long, then one batch tries again (a fixed key resumes it).
    sms_auth_pause_s: Annotated[float, Field(gt=0, le=3600)] = 30.0
    # The provider did not act on a request even after tenacity's retries: pause the lane.
    sms_outage_pause_s: Annotated[float, Field(gt=0, le=3600)] = 10.0
    sms_logs_rate_per_min: Annotated[int, Field(ge=1, le=100_000)] = 120
    sms_idempotency_ttl_s: Annotated[int, Field(ge=60)] = 2 * 86400
    sms_state_ttl_s: Annotated[int, Field(ge=3600)] = 3 * 86400
    sms_metadata_max_bytes: Annotated[int, Field(ge=0, le=1_000_000)] = 2048
    sms_max_text_parts: Annotated[int, Field(ge=1, le=255)] = 25
    sms_dispatch_tick_ms: Annotated[int, Field(ge=10, le=60_000)] = 500
    # How far ahead a job's send_at may be; a later one is refused at enqueue.
    sms_schedule_horizon_s: Annotated[int, Field(ge=60, le=10 * 365 * 86400)] = 180 * 86400

    # --- status events -------------------------------------------------------------------------
    sms_events_stream_maxlen: Annotated[int, Field(ge=1000)] = 1_000_000
    sms_events_dramatiq_queue: str | None = None
    sms_events_dramatiq_actor: str | None = None

    # --- delivery reports ----------------------------------------------------------------------
    sms_reports_drain_interval_s: Annotated[float, Field(gt=0, le=3600)] = 5.0
    sms_reports_entity_id: Annotated[str, Field(max_length=255)] | None = None
    sms_reports_application_id: Annotated[str, Field(max_length=255)] | None = None
    sms_reports_campaign_reference_id: Annotated[str, Field(max_length=255)] | None = None
    sms_report_park_timeout_s: Annotated[float, Field(gt=0)] = 3600.0
    sms_unknown_reports: Literal["emit", "drop"] = "emit"
    # An accepted message with no final report gets `expired`/no_report after its validity + this.
    sms_no_report_grace_s: Annotated[float, Field(ge=0)] = 3600.0
    # An accepted message still without a final report this long after its acceptance is looked up
    # in GET /sms/3/logs by the sweep (again later with backoff), long before its no-report deadline.
    sms_report_lookup_after_s: Annotated[float, Field(gt=0)] = 3600.0
    # At most this many such lookups per sweep (0 = none), and never over half the logs calls/min.
    sms_report_lookup_batch: Annotated[int, Field(ge=0, le=10_000)] = 200

    # --- webhook (web process) -----------------------------------------------------------------
    sms_webhook_public_url: str | None = None
    sms_webhook_path: Annotated[str, Field(pattern=r"^/[A-Za-z0-9_./-]*$")] = "/webhooks/icomm/delivery"
    sms_webhook_secret: SecretStr | None = None
    sms_webhook_auth: Literal["header", "basic", "path"] = "header"
    sms_webhook_max_body_bytes: Annotated[int, Field(ge=1024, le=64 * 1024 * 1024)] = 1024 * 1024

    # --- processes -----------------------------------------------------------------------------
    sms_shutdown_timeout_s: Annotated[float, Field(gt=0, le=3600)] = 20.0
    sms_metrics_port: Annotated[int, Field(ge=0, le=65535)] = 0  # 0 = no metrics server in workers
    log_format: Literal["json", "console"] = "json"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    # The values of the variables SMS_ACCOUNTS names (api_key_env, webhook_secret_env), read by
    # load_settings / settings_from_env from the same sources as the settings; no field, so never
    # shown by repr or a config dump. A Settings built directly reads them from os.environ.
    _named_secrets: dict[str, str] = PrivateAttr(default_factory=dict)

    @field_validator("icomm_base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        return _check_http_url(value)

    @field_validator("sms_webhook_public_url", mode="before")
    @classmethod
    def _public_url(cls, value: Any) -> Any:
        if value is None or value == "":
            return None
        return _check_http_url(value) if isinstance(value, str) else value

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str) -> str:
        if not re.match(r"^(redis|rediss|unix)://", value):
            raise ValueError("must start with redis://, rediss:// or unix://")
        parts = urlsplit(value)
        try:
            port = parts.port
        except ValueError:
            raise ValueError("the port must be a number from 1 to 65535") from None
        if parts.scheme == "unix":
            if not parts.path:
                raise ValueError("a unix:// URL needs the socket's path (unix:///run/redis.sock)")
            return value
        if not parts.hostname or any(c.isspace() for c in value):
            raise ValueError("needs a host, e.g. redis://127.0.0.1:6379/0")
        if port == 0:
            raise ValueError("the port must be a number from 1 to 65535")
        if parts.path not in ("", "/") and not re.fullmatch(r"/\d+", parts.path):
            raise ValueError("the path must be the database number, e.g. /0")
        return value

    @field_validator("icomm_api_key")
    @classmethod
    def _api_key(cls, value: SecretStr) -> SecretStr:
        if any(c.isspace() or not c.isprintable() for c in value.get_secret_value()):
            raise ValueError("must not contain spaces or control characters (it is sent in a header)")
        return value

    @field_validator("sms_webhook_secret")
    @classmethod
    def _webhook_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        secret = value.get_secret_value()
        # Long enough to be no guess (and to be redacted from logs, worker.logs.Redactor); sent in a header.
        if len(secret) < 16:
            raise ValueError("must be at least 16 characters (e.g. `openssl rand -hex 32`)")
        if any(c.isspace() or not c.isprintable() or not c.isascii() for c in secret):
            raise ValueError("must be printable ASCII without spaces (it is sent in a header)")
        return value

    @field_validator("sms_default_sender")
    @classmethod
    def _sender(cls, value: str | None) -> str | None:
        # The same bounds as a job's `sender` (worker.models): a default no job could carry is a mistake.
        if value is not None and not 0 < len(value) <= 64:
            raise ValueError("must be 1 to 64 characters")
        return value

    @field_validator("sms_events_dramatiq_queue", "sms_events_dramatiq_actor")
    @classmethod
    def _dramatiq_name(cls, value: str | None) -> str | None:
        if value is not None and not _DRAMATIQ_NAME.match(value):
            raise ValueError(f"must match {_DRAMATIQ_NAME.pattern} (a Dramatiq queue or actor name)")
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _level_any_case(cls, value: Any) -> Any:
        return value.strip().upper() if isinstance(value, str) else value  # LOG_LEVEL=warning is clear too

    @field_validator("log_format", mode="before")
    @classmethod
    def _format_any_case(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("sms_lanes", "sms_accounts", "sms_account_daily_cap", mode="before")
    @classmethod
    def _lanes_json(cls, value: Any) -> Any:
        # From the environment or an env file the lanes (accounts, cap) arrive as a JSON text.
        if isinstance(value, bytes | str):
            try:
                return json.loads(value)
            except json.JSONDecodeError as error:
                raise ValueError(f"is not valid JSON ({error.msg} at character {error.pos})") from None
        return value

    @field_validator("sms_lanes")
    @classmethod
    def _lane_names(cls, value: dict[str, LaneConfig]) -> dict[str, LaneConfig]:
        if not value:
            raise ValueError("at least one lane is needed")
        for name in value:
            if not _LANE_NAME.match(name):
                raise ValueError(f"lane name {name!r} must match {_LANE_NAME.pattern}")
        return value

    @field_validator("sms_accounts")
    @classmethod
    def _account_names(cls, value: dict[str, AccountConfig]) -> dict[str, AccountConfig]:
        for name in value:
            if name == DEFAULT_ACCOUNT:
                raise ValueError(f"{DEFAULT_ACCOUNT!r} is the account of ICOMM_BASE_URL and ICOMM_API_KEY; "
                                 "give the other accounts other names")
            if not _ACCOUNT_NAME.match(name):
                raise ValueError(f"account name {name!r} must match {_ACCOUNT_NAME.pattern}")
        return value

    @model_validator(mode="after")
    def _coherent(self) -> Settings:
        # In this order: the first rule broken is the one named.
        self._lanes_coherent()
        self._timeouts_coherent()
        self._events_coherent()
        self._webhook_coherent()
        return self

    def _lanes_coherent(self) -> None:
        if self.sms_default_lane not in self.sms_lanes:
            raise ValueError(
                f"SMS_DEFAULT_LANE={self.sms_default_lane!r} is not one of SMS_LANES ({', '.join(self.sms_lanes)})"
            )
        known = [DEFAULT_ACCOUNT, *self.sms_accounts]
        for lane, cfg in self.sms_lanes.items():
            if cfg.account not in known:
                raise ValueError(f"SMS_LANES: lane {lane!r} names account {cfg.account!r}, which SMS_ACCOUNTS does "
                                 f"not define (the accounts: {', '.join(known)})")
            cap = self.account_daily_cap(cfg.account)
            if cap is not None:  # on a copy: a LaneConfig given to Settings may be shared with other Settings
                resolved = cfg.model_copy()
                resolved._account_cap = cap
                self.sms_lanes[lane] = resolved
        # A cap on an account no lane sends through caps nothing: whoever set it believes spend is
        # bounded, so it is refused at start-up rather than accepted in silence.
        used = {cfg.account for cfg in self.sms_lanes.values()}
        lanes = ", ".join(f"{lane} -> {cfg.account}" for lane, cfg in self.sms_lanes.items())
        if self.sms_account_daily_cap is not None and DEFAULT_ACCOUNT not in used:
            raise ValueError(f"SMS_ACCOUNT_DAILY_CAP caps account {DEFAULT_ACCOUNT!r}, which no lane of SMS_LANES "
                             f"sends through (lanes: {lanes}): put the cap on the account the lanes use, or remove it")
        for account, spec in self.sms_accounts.items():
            if spec.daily_cap is not None and account not in used:
                raise ValueError(f"SMS_ACCOUNTS: account {account!r} has a daily_cap, but it caps nothing: no lane "
                                 f"of SMS_LANES sends through it (lanes: {lanes}); name it in a lane's \"account\" "
                                 "or remove the cap")

    def _timeouts_coherent(self) -> None:
        # A claimed batch must not be recovered by another worker while its POST may still run.
        worst_post_s = (self.icomm_connect_timeout_s + self.icomm_write_timeout_s + self.icomm_read_timeout_s) * (
            self.icomm_send_retry_attempts
        ) + self.icomm_retry_backoff_max_s * self.icomm_send_retry_attempts
        if self.sms_lease_s <= worst_post_s:
            raise ValueError(
                f"SMS_LEASE_S={self.sms_lease_s:g} must exceed the longest a send can take "
                f"({worst_post_s:g} s from the ICOMM_*_TIMEOUT_S and retry settings), or a batch "
                "still in flight could be taken over and sent twice"
            )
        if self.sms_reconcile_window_s < self.icomm_read_timeout_s:
            raise ValueError(
                f"SMS_RECONCILE_WINDOW_S={self.sms_reconcile_window_s:g} must be at least ICOMM_READ_TIMEOUT_S="
                f"{self.icomm_read_timeout_s:g}: a provider may act on a request after our read timeout, so "
                "absence from its logs only counts once it held for longer than that"
            )

    def _events_coherent(self) -> None:
        if (self.sms_events_dramatiq_queue is None) != (self.sms_events_dramatiq_actor is None):
            given, missing = ("SMS_EVENTS_DRAMATIQ_QUEUE", "SMS_EVENTS_DRAMATIQ_ACTOR")[
                :: 1 if self.sms_events_dramatiq_queue is not None else -1]
            raise ValueError(f"{given} is set but {missing} is not: SMS_EVENTS_DRAMATIQ_QUEUE and "
                             "SMS_EVENTS_DRAMATIQ_ACTOR go together")

    def _webhook_coherent(self) -> None:
        if self.sms_webhook_public_url and self.sms_webhook_secret is None:
            # The provider would push reports to a webhook that refuses every call (503), and a
            # report pushed is not in GET /sms/3/reports any more.
            raise ValueError("SMS_WEBHOOK_PUBLIC_URL is set, so SMS_WEBHOOK_SECRET is needed too "
                             f"(example: SMS_WEBHOOK_SECRET={EXAMPLES['SMS_WEBHOOK_SECRET']})")
        secret = self.webhook_secret()
        if secret and self.sms_webhook_auth != "header" and not re.fullmatch(r"[A-Za-z0-9._~-]+", secret):
            raise ValueError(f"SMS_WEBHOOK_AUTH={self.sms_webhook_auth} puts SMS_WEBHOOK_SECRET in the webhook URL, "
                             "so it may only contain letters, digits and . _ ~ - (e.g. `openssl rand -hex 32`)")

    def worst_send_s(self) -> float:
        """The longest one bulk POST can take, tenacity's retries and pool waits included."""
        per_attempt = (self.icomm_pool_timeout_s + self.icomm_connect_timeout_s + self.icomm_write_timeout_s
                       + self.icomm_read_timeout_s)
        return (per_attempt + self.icomm_retry_backoff_max_s) * self.icomm_send_retry_attempts

    def send_window_s(self) -> float:
        """How long after its SUBMITTING record a batch's request may still be written."""
        return self.sms_send_window_s if self.sms_send_window_s is not None else self.worst_send_s()

    def require_api_key(self) -> str:
        """The API key, for the processes that call the provider; a clear error when it is unset."""
        key = self.icomm_api_key.get_secret_value()
        if not key:
            raise ConfigError(f"ICOMM_API_KEY is not set (example: ICOMM_API_KEY={EXAMPLES['ICOMM_API_KEY'][:8]}...)")
        return key

    def webhook_secret(self) -> str | None:
        return self.sms_webhook_secret.get_secret_value() if self.sms_webhook_secret else None

    def account_names(self) -> list[str]:
        """The accounts in use: `default` when a lane sends through it (or no other account is
        configured), then every account of SMS_ACCOUNTS (drained even with no lane left on it)."""
        uses_default = not self.sms_accounts or any(
            cfg.account == DEFAULT_ACCOUNT for cfg in self.sms_lanes.values())
        return ([DEFAULT_ACCOUNT] if uses_default else []) + list(self.sms_accounts)

    def account_daily_cap(self, account: str) -> DailyCap | None:
        """An account's daily cap over all its lanes (None: none)."""
        if account == DEFAULT_ACCOUNT:
            return self.sms_account_daily_cap
        spec = self.sms_accounts.get(account)
        return spec.daily_cap if spec is not None else None

    def named_secret(self, variable: str) -> str | None:
        """The value of a variable SMS_ACCOUNTS names (None when unset or empty)."""
        value = self._named_secrets.get(variable)
        if value is None:
            value = os.environ.get(variable)
        return value or None

    def account_secrets(self) -> list[str]:
        """The values of every key and webhook secret SMS_ACCOUNTS names that is set (for redaction)."""
        named = [v for spec in self.sms_accounts.values() for v in (spec.api_key_env, spec.webhook_secret_env) if v]
        return [value for variable in named if (value := self.named_secret(variable))]

    def webhook_delivery_url(self, secret: str | None = None) -> str | None:
        """The URL dispatched messages carry in `webhooks.delivery.url`, secret included as configured
        (`secret`: an account's own webhook secret instead of SMS_WEBHOOK_SECRET)."""
        if not self.sms_webhook_public_url:
            return None
        base = self.sms_webhook_public_url.rstrip("/")
        secret = secret or self.webhook_secret() or ""
        if self.sms_webhook_auth == "path":
            return f"{base}{self.sms_webhook_path}/{secret}"
        if self.sms_webhook_auth == "basic":
            scheme, _, rest = base.partition("://")
            return f"{scheme}://icomm:{secret}@{rest}{self.sms_webhook_path}"
        return f"{base}{self.sms_webhook_path}"


def _check_http_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname or any(c.isspace() for c in value):
        raise ValueError("must be an http(s) URL")
    try:
        port = parts.port
    except ValueError:
        raise ValueError("must be an http(s) URL; the port must be a number from 1 to 65535") from None
    if port == 0:
        raise ValueError("must be an http(s) URL; the port must be a number from 1 to 65535")
    return value.rstrip("/")


def _validated(env_file: Path | None, values: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> Settings:
    file_values = read_env_file(env_file) if env_file is not None else {}  # unreadable: one clear line
    try:
        settings = Settings(_env_file=env_file, **values)  # type: ignore[call-arg]
    except ValidationError as error:
        raise ConfigError(format_problems(error, _LANE_KEYS)) from None
    except SettingsError as error:  # a source could not be parsed at all
        raise ConfigError(str(error)) from None
    _read_named_secrets(settings, os.environ if environ is None else environ, file_values)
    return settings


def _read_named_secrets(settings: Settings, environ: Mapping[str, str], file_values: Mapping[str, str | None]) -> None:
    """Read the variables SMS_ACCOUNTS names, the environment winning over the env file as for the
    settings; one line per value that could never be sent (never showing it). An unset key is
    refused only where it is needed (worker.accounts, like ICOMM_API_KEY), so producers need no key."""
    found: dict[str, str] = {}
    problems: list[str] = []
    for name, account in settings.sms_accounts.items():
        named = (("api_key_env", account.api_key_env, api_key_problem),
                 ("webhook_secret_env", account.webhook_secret_env, webhook_secret_problem))
        for what, variable, check in named:
            if variable is None:
                continue
            value = environ.get(variable) or file_values.get(variable) or ""
            if not value:
                continue
            problem = check(value)
            in_url = check is webhook_secret_problem and settings.sms_webhook_auth != "header"
            if not problem and in_url and not re.fullmatch(r"[A-Za-z0-9._~-]+", value):
                problem = (f"SMS_WEBHOOK_AUTH={settings.sms_webhook_auth} puts it in the webhook URL, so it may only "
                           "contain letters, digits and . _ ~ -")
            if problem:
                problems.append(f"{variable} (the {what} of account {name!r} in SMS_ACCOUNTS): {problem}")
            found[variable] = value
    if problems:
        raise ConfigError("\n".join(problems))
    settings._named_secrets.update(found)


def api_key_problem(key: str) -> str | None:
    if any(c.isspace() or not c.isprintable() for c in key):
        return "must not contain spaces or control characters (it is sent in a header)"
    return None


def webhook_secret_problem(secret: str) -> str | None:
    # Long enough to be no guess (and to be redacted from logs, worker.logs.Redactor); sent in a header.
    if len(secret) < 16:
        return "must be at least 16 characters (e.g. `openssl rand -hex 32`)"
    if any(c.isspace() or not c.isprintable() or not c.isascii() for c in secret):
        return "must be printable ASCII without spaces (it is sent in a header)"
    return None


def settings_from_env(env: Mapping[str, str]) -> Settings:
    """Settings from an explicit mapping of environment variables (demo, tests, tools).

    The processes started with the same mapping read the same values from their environment (and
    the same env file, which the mapping's values win over, as the real environment does).
    """
    values: dict[str, Any] = {}
    for name, value in env.items():
        field = name.lower()
        if field in Settings.model_fields and value != "":  # empty means unset, as in the environment
            values[field] = value  # SMS_LANES's JSON is parsed by its validator
    return _validated(env_file_path(env), values, env)


def load_settings(**overrides: Any) -> Settings:
    """Read and validate the environment and the env file; raise ConfigError naming every wrong variable."""
    return _validated(env_file_path(), overrides)


# --- variables that are no setting ------------------------------------------------------------------
SETTING_NAMES = tuple(name.upper() for name in Settings.model_fields)
_LANE_KEYS = tuple(LaneConfig.model_fields)


def unknown_variables(environ: Mapping[str, str] | None = None) -> list[UnknownVariable]:
    """Every SMS_*/ICOMM_* variable of the environment and the env file that is no setting (and, in
    the env file, a near miss of REDIS_URL or LOG_*), with the setting it most likely meant. The
    variables SMS_ACCOUNTS names (its accounts' keys and webhook secrets) are no mistake."""
    found = settings_env.unknown_variables(SETTING_NAMES, environ)
    named = _variables_accounts_name(environ)
    return [u for u in found if u.name.upper() not in named]


def _variables_accounts_name(environ: Mapping[str, str] | None) -> set[str]:
    """The api_key_env and webhook_secret_env names of SMS_ACCOUNTS, read leniently (a broken
    SMS_ACCOUNTS is load_settings's to name)."""
    environ = os.environ if environ is None else environ
    text = environ.get("SMS_ACCOUNTS")
    if not text:
        try:
            env_file = env_file_path(environ)
            text = (read_env_file(env_file).get("SMS_ACCOUNTS") if env_file is not None else None) or ""
        except ConfigError:
            return set()
    try:
        accounts = json.loads(text) if text else {}
    except json.JSONDecodeError:
        return set()
    named: set[str] = set()
    for account in accounts.values() if isinstance(accounts, dict) else ():
        if isinstance(account, dict):
            named |= {str(account[k]).upper() for k in ("api_key_env", "webhook_secret_env")
                      if isinstance(account.get(k), str)}
    return named
