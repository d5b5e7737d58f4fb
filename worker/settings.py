"""The only reader of the environment: every setting typed, validated once at start-up, frozen.

Field names are the environment variable names in lower case (`ICOMM_API_KEY` -> `icomm_api_key`);
units are in the names. Tests build `Settings(...)` directly instead of patching the environment.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from worker.errors import ConfigError

_LANE_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")


class LaneConfig(BaseModel):
    """How one lane batches: `otp` waits ~0 ms for company, `bulk` waits to fill big batches."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    batch_size: Annotated[int, Field(ge=1, le=10_000)] = 1000
    max_wait_ms: Annotated[int, Field(ge=0, le=60_000)] = 250
    concurrency: Annotated[int, Field(ge=1, le=64)] = 4
    # Share of the global messages/s limit this lane may use (1.0 = all of it).
    rate_share: Annotated[float, Field(gt=0, le=1)] = 1.0


def _default_lanes() -> dict[str, LaneConfig]:
    return {
        "otp": LaneConfig(batch_size=100, max_wait_ms=0, concurrency=2),
        # 8 bulks in flight keep a provider that takes 100 ms per POST from bounding throughput.
        "bulk": LaneConfig(batch_size=1000, max_wait_ms=250, concurrency=8),
    }


# One example per variable, shown when the value is wrong (and used by config/example.env tests).
EXAMPLES: dict[str, str] = {
    "ICOMM_BASE_URL": "https://apisms.trx.icommarketing.com",
    "ICOMM_API_KEY": "0123456789abcdef0123456789abcdef-01234567-89ab-cdef-0123-456789abcdef",
    "ICOMM_CONNECT_TIMEOUT_S": "3",
    "ICOMM_READ_TIMEOUT_S": "15",
    "ICOMM_WRITE_TIMEOUT_S": "10",
    "ICOMM_POOL_TIMEOUT_S": "5",
    "ICOMM_MAX_CONNECTIONS": "32",
    "ICOMM_SEND_RETRY_ATTEMPTS": "4",
    "ICOMM_RETRY_BACKOFF_BASE_S": "0.2",
    "ICOMM_RETRY_BACKOFF_MAX_S": "5",
    "REDIS_URL": "redis://127.0.0.1:6379/0",
    "SMS_KEY_PREFIX": "sms",
    "SMS_REDIS_ALLOW_VOLATILE": "false",
    "SMS_MESSAGE_ID_PREFIX": "sw",
    "SMS_LANES": '{"otp":{"batch_size":100,"max_wait_ms":0},"bulk":{"batch_size":1000,"max_wait_ms":250}}',
    "SMS_DEFAULT_LANE": "bulk",
    "SMS_DEFAULT_SENDER": "ACME",
    "SMS_RATE_LIMIT_MPS": "500",
    "SMS_RATE_LIMIT_RPS": "20",
    "SMS_RATE_LIMIT_BURST_S": "1",
    "SMS_LEASE_S": "180",
    "SMS_MAX_ATTEMPTS": "10",
    "SMS_RETRY_HORIZON_S": "21600",
    "SMS_RECONCILE_DELAY_S": "5",
    "SMS_RECONCILE_CHECKS": "3",
    "SMS_RECONCILE_WINDOW_S": "60",
    "SMS_SEND_WINDOW_S": "150",
    "SMS_AUTH_PAUSE_S": "30",
    "SMS_OUTAGE_PAUSE_S": "10",
    "SMS_LOGS_RATE_PER_MIN": "120",
    "SMS_IDEMPOTENCY_TTL_S": "172800",
    "SMS_STATE_TTL_S": "259200",
    "SMS_METADATA_MAX_BYTES": "2048",
    "SMS_MAX_TEXT_PARTS": "25",
    "SMS_EVENTS_STREAM_MAXLEN": "1000000",
    "SMS_EVENTS_DRAMATIQ_QUEUE": "sms_status",
    "SMS_EVENTS_DRAMATIQ_ACTOR": "handle_sms_status",
    "SMS_DISPATCH_TICK_MS": "500",
    "SMS_REPORTS_DRAIN_INTERVAL_S": "5",
    "SMS_REPORTS_ENTITY_ID": "my-entity",
    "SMS_REPORTS_APPLICATION_ID": "my-app",
    "SMS_REPORTS_CAMPAIGN_REFERENCE_ID": "spring-sale",
    "SMS_REPORT_PARK_TIMEOUT_S": "3600",
    "SMS_UNKNOWN_REPORTS": "emit",
    "SMS_NO_REPORT_GRACE_S": "3600",
    "SMS_WEBHOOK_PUBLIC_URL": "https://sms-worker.example.com",
    "SMS_WEBHOOK_PATH": "/webhooks/icomm/delivery",
    "SMS_WEBHOOK_SECRET": "s3cr3t-long-random-string",
    "SMS_WEBHOOK_AUTH": "header",
    "SMS_WEBHOOK_MAX_BODY_BYTES": "1048576",
    "SMS_SHUTDOWN_TIMEOUT_S": "20",
    "SMS_METRICS_PORT": "9191",
    "LOG_FORMAT": "json",
    "LOG_LEVEL": "INFO",
}


class Settings(BaseSettings):
    """Every knob of the worker, the clock and the web process."""

    model_config = SettingsConfigDict(frozen=True, extra="ignore", case_sensitive=False)

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
    sms_lanes: dict[str, LaneConfig] = Field(default_factory=_default_lanes)
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

    @field_validator("icomm_base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not re.match(r"^https?://[^\s/]+(:\d+)?(/[^\s]*)?$", value):
            raise ValueError("must be an http(s) URL")
        return value.rstrip("/")

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str) -> str:
        if not re.match(r"^(redis|rediss|unix)://", value):
            raise ValueError("must start with redis://, rediss:// or unix://")
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

    @model_validator(mode="after")
    def _coherent(self) -> Settings:
        if self.sms_default_lane not in self.sms_lanes:
            raise ValueError(
                f"SMS_DEFAULT_LANE={self.sms_default_lane!r} is not one of SMS_LANES ({', '.join(self.sms_lanes)})"
            )
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
        if (self.sms_events_dramatiq_queue is None) != (self.sms_events_dramatiq_actor is None):
            raise ValueError("SMS_EVENTS_DRAMATIQ_QUEUE and SMS_EVENTS_DRAMATIQ_ACTOR go together")
        return self

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

    def webhook_delivery_url(self) -> str | None:
        """The URL dispatched messages carry in `webhooks.delivery.url`, secret included as configured."""
        if not self.sms_webhook_public_url:
            return None
        base = self.sms_webhook_public_url.rstrip("/")
        secret = self.webhook_secret() or ""
        if self.sms_webhook_auth == "path":
            return f"{base}{self.sms_webhook_path}/{secret}"
        if self.sms_webhook_auth == "basic":
            scheme, _, rest = base.partition("://")
            return f"{scheme}://icomm:{secret}@{rest}{self.sms_webhook_path}"
        return f"{base}{self.sms_webhook_path}"


def _format(error: ValidationError) -> str:
    lines = [f"{error.error_count()} configuration problem(s):"]
    for item in error.errors():
        loc = [str(part) for part in item["loc"]]
        variable = loc[0].upper() if loc else "(settings)"
        detail = ".".join(loc[1:])
        raw = item.get("input")
        shown = "" if variable in {"ICOMM_API_KEY", "SMS_WEBHOOK_SECRET"} else f"={raw!r}"
        message = item["msg"].removeprefix("Value error, ")
        example = EXAMPLES.get(variable)
        hint = f" (example: {variable}={example})" if example else ""
        where = f" [{detail}]" if detail else ""
        if variable == "(settings)" or not loc:
            lines.append(f"  - {message}")
        else:
            lines.append(f"  - {variable}{shown}{where}: {message}{hint}")
    return "\n".join(lines)


def settings_from_env(env: Mapping[str, str]) -> Settings:
    """Settings from an explicit mapping of environment variables (demo, tests, tools).

    The processes started with the same mapping read the same values from their environment.
    """
    values: dict[str, Any] = {}
    for name, value in env.items():
        field = name.lower()
        if field in Settings.model_fields:
            # Structured values arrive as JSON in the environment, as pydantic-settings reads them.
            values[field] = json.loads(value) if field == "sms_lanes" else value
    return load_settings(**values)


def load_settings(**overrides: Any) -> Settings:
    """Read and validate the environment; raise ConfigError naming every wrong variable."""
    try:
        return Settings(**overrides)
    except ValidationError as error:
        raise ConfigError(_format(error)) from None
