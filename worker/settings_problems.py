"""The wording of a wrong setting: one line per mistake, naming the variable, never showing a secret.

worker.settings validates; this module turns pydantic's errors into the ConfigError's lines
(`SMS_LEASE_S=-1: Input should be greater than 0 (example: SMS_LEASE_S=180)`) and holds the one
example per variable those lines show (config/example.env is checked against it).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError
from pydantic_core import ErrorDetails

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
    "SMS_ACCOUNTS": ('{"marketing":{"base_url":"https://apisms.trx.icommarketing.com",'
                     '"api_key_env":"MARKETING_ICOMM_API_KEY","rate_limit_mps":100}}'),
    "SMS_ACCOUNT_DAILY_CAP": '{"messages":100000,"parts":150000}',
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
    "SMS_SCHEDULE_HORIZON_S": "15552000",
    "SMS_REPORTS_DRAIN_INTERVAL_S": "5",
    "SMS_REPORTS_ENTITY_ID": "my-entity",
    "SMS_REPORTS_APPLICATION_ID": "my-app",
    "SMS_REPORTS_CAMPAIGN_REFERENCE_ID": "spring-sale",
    "SMS_REPORT_PARK_TIMEOUT_S": "3600",
    "SMS_UNKNOWN_REPORTS": "emit",
    "SMS_NO_REPORT_GRACE_S": "3600",
    "SMS_REPORT_LOOKUP_AFTER_S": "3600",
    "SMS_REPORT_LOOKUP_BATCH": "200",
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

# One example per traffic-policy key of a lane (worker.policy), shown instead of SMS_LANES's when the
# mistake is inside that key.
LANE_POLICY_EXAMPLES: dict[str, str] = {
    "velocity": ('{"per_number":{"limit":5,"window_s":3600},'
                 '"per_prefix":{"digits_dropped":3,"limit":20,"window_s":3600}}'),
    "countries": '{"allow":["CH","DE"]} or {"block":["XX"]}',
    "block_number_types": '["PREMIUM_RATE","SHARED_COST"]',
    "suppression": "true",
    "max_parts": "3",
    "allow_ucs2": "false",
    "on_guard_error": '"open" or "closed"',
    "daily_cap": '{"messages":100000,"parts":150000}',
    "campaign_daily_cap": "50000",
}

_SECRET_VARIABLES = frozenset({"ICOMM_API_KEY", "SMS_WEBHOOK_SECRET"})
# What pydantic says when a lane is not a JSON object.
_NOT_AN_OBJECT = frozenset({"model_type", "model_attributes_type", "dict_type"})


def format_problems(error: ValidationError, lane_keys: Sequence[str]) -> str:
    """The ConfigError text: one line per mistake, no header, no traceback. `lane_keys` are the keys
    a lane of SMS_LANES has (worker.settings.LaneConfig's fields), named when one is misspelt."""
    return "\n".join(problem_line(item, lane_keys) for item in error.errors())


def _shown(variable: str, raw: Any) -> str:
    """`=value` as the mistake was given: never a secret, never a URL's password."""
    if variable in _SECRET_VARIABLES:
        return ""
    if isinstance(raw, str):
        raw = re.sub(r"(://[^/@:\s]*:)[^/@\s]*@", r"\1***@", raw)
    return f"={raw!r}"


def _hint(variable: str) -> str:
    example = EXAMPLES.get(variable)
    return f" (example: {variable}={example})" if example else ""


def problem_line(item: ErrorDetails, lane_keys: Sequence[str]) -> str:
    """One line per mistake: the variable, what was given, what is wrong, and a right example."""
    loc = [str(part) for part in item["loc"]]
    message = item["msg"].removeprefix("Value error, ")
    if not loc:  # a rule across settings: the message names the variables
        return message
    variable = loc[0].upper()
    if variable == "SMS_LANES":
        line = _lanes_line(item, loc[1:], message, lane_keys)
        if line is not None:
            return line
    if variable == "SMS_ACCOUNTS":
        line = _accounts_line(item, loc[1:], message)
        if line is not None:
            return line
    if variable == "SMS_ACCOUNT_DAILY_CAP":
        line = _cap_line(item, loc[1:], message)
        if line is not None:
            return line
    return f"{variable}{_shown(variable, item.get('input'))}: {message}{_hint(variable)}"


def _lanes_line(item: ErrorDetails, where: list[str], message: str, lane_keys: Sequence[str]) -> str | None:
    """The line for a mistake inside SMS_LANES (`where` is the path below it), or None for the
    general form."""
    hint = _hint("SMS_LANES")
    if not where:
        if item["type"] == "dict_type":
            return f"SMS_LANES={item.get('input')!r}: must be a JSON object of lanes, lane name to its settings{hint}"
        return None
    lane, inner = where[0], where[1:]
    if item["type"] == "extra_forbidden" and len(inner) == 1:
        close = difflib.get_close_matches(inner[0], lane_keys, n=1)
        guess = f"did you mean {close[0]}? " if close else ""
        return f"SMS_LANES: lane {lane!r} has an unknown key {inner[0]!r} ({guess}a lane has {', '.join(lane_keys)})"
    if not inner and item["type"] in _NOT_AN_OBJECT:
        return f"SMS_LANES: lane {lane!r} must be a JSON object of {', '.join(lane_keys)}{hint}"
    if inner and inner[0] in LANE_POLICY_EXAMPLES:
        hint = f" (example: \"{inner[0]}\":{LANE_POLICY_EXAMPLES[inner[0]]})"
    return f"SMS_LANES: lane {lane!r}: {'.'.join(inner)}={item.get('input')!r}: {message}{hint}"


_ACCOUNT_KEYS = ("base_url", "api_key_env", "rate_limit_mps", "rate_limit_rps", "entity_id", "application_id",
                 "webhook_secret_env", "daily_cap")
# The keys of a daily cap (worker.settings.DailyCap), lane's or account's.
_CAP_KEYS = ("messages", "parts")


def _cap_line(item: ErrorDetails, where: list[str], message: str) -> str | None:
    """The line for a mistake inside SMS_ACCOUNT_DAILY_CAP (`where` is the path below it), or None
    for the general form (not JSON, neither key given)."""
    hint = _hint("SMS_ACCOUNT_DAILY_CAP")
    if not where:
        if item["type"] in _NOT_AN_OBJECT:
            return (f"SMS_ACCOUNT_DAILY_CAP={item.get('input')!r}: must be a JSON object with "
                    f"{' and/or '.join(_CAP_KEYS)}{hint}")
        return None
    if item["type"] == "extra_forbidden":
        return f"SMS_ACCOUNT_DAILY_CAP: {_unknown_cap_key(where[0])}{hint}"
    return f"SMS_ACCOUNT_DAILY_CAP: {'.'.join(where)}={item.get('input')!r}: {message}{hint}"


def _unknown_cap_key(key: str) -> str:
    close = difflib.get_close_matches(key, _CAP_KEYS, n=1)
    guess = f"did you mean {close[0]}? " if close else ""
    return f"unknown key {key!r} ({guess}a daily cap has {', '.join(_CAP_KEYS)})"


def _accounts_line(item: ErrorDetails, where: list[str], message: str) -> str | None:
    """The line for a mistake inside SMS_ACCOUNTS (`where` is the path below it), or None for the
    general form. The value of a key that is not an account's is never shown: it may be a key
    someone put into the JSON."""
    hint = _hint("SMS_ACCOUNTS")
    if not where:
        if item["type"] == "dict_type":
            return f"SMS_ACCOUNTS: must be a JSON object of accounts, account name to its settings{hint}"
        return None
    account, inner = where[0], where[1:]
    if item["type"] == "extra_forbidden" and len(inner) == 1:
        if "key" in inner[0].lower() or "secret" in inner[0].lower():
            return (f"SMS_ACCOUNTS: account {account!r} has a key {inner[0]!r}: secrets never go into SMS_ACCOUNTS; "
                    "put the key in a variable of its own and name that variable in api_key_env "
                    "(webhook secret: webhook_secret_env)")
        close = difflib.get_close_matches(inner[0], _ACCOUNT_KEYS, n=1)
        guess = f"did you mean {close[0]}? " if close else ""
        return (f"SMS_ACCOUNTS: account {account!r} has an unknown key {inner[0]!r} "
                f"({guess}an account has {', '.join(_ACCOUNT_KEYS)})")
    if not inner and item["type"] in _NOT_AN_OBJECT:
        return f"SMS_ACCOUNTS: account {account!r} must be a JSON object of {', '.join(_ACCOUNT_KEYS)}{hint}"
    if item["type"] == "missing" and inner:
        return f"SMS_ACCOUNTS: account {account!r}: {'.'.join(inner)} is required{hint}"
    if inner[:1] == ["daily_cap"]:
        hint = f" (example: \"daily_cap\":{LANE_POLICY_EXAMPLES['daily_cap']})"
        if item["type"] == "extra_forbidden" and len(inner) == 2:  # its value is never shown (see above)
            return f"SMS_ACCOUNTS: account {account!r}: daily_cap has an {_unknown_cap_key(inner[1])}{hint}"
        if len(inner) == 1 and item["type"] in _NOT_AN_OBJECT:
            return (f"SMS_ACCOUNTS: account {account!r}: daily_cap={_short(item.get('input'))}: must be a JSON "
                    f"object with {' and/or '.join(_CAP_KEYS)}{hint}")
    return f"SMS_ACCOUNTS: account {account!r}: {'.'.join(inner)}={_short(item.get('input'))}: {message}{hint}"


def _short(raw: Any) -> str:
    """A value as given, a URL's password hidden."""
    if isinstance(raw, str):
        raw = re.sub(r"(://[^/@:\s]*:)[^/@\s]*@", r"\1***@", raw)
    return repr(raw)
