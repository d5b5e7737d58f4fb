"""Structured logging: structlog configured once, JSON in production, console in dev, with redaction.

Dramatiq's, httpx's and uvicorn's stdlib records go through the same processors and renderer, so
one process writes one format. `redact` removes secrets wherever they appear and masks phone
numbers (country code and last two digits kept) in every string, key by key.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterable, MutableMapping
from typing import Any

import structlog

# E.164 country codes that are two digits long; 1 and 7 are one digit; everything else is three.
_TWO_DIGIT_CC = frozenset(
    {"20", "27", "30", "31", "32", "33", "34", "36", "39", "40", "41", "43", "44", "45", "46", "47", "48", "49",
     "51", "52", "53", "54", "55", "56", "57", "58", "60", "61", "62", "63", "64", "65", "66", "81", "82", "84",
     "86", "90", "91", "92", "93", "94", "95", "98"}
)
# A phone number standing alone: not glued to letters, digits, '-' or '.' (so ids and timestamps such
# as stream entry ids `1700000000000-0` are left alone).
_PHONE_IN_TEXT = re.compile(r"(?<![\w.-])\+?[1-9]\d{6,14}(?![\w-])")
_PHONE_KEYS = frozenset({"to", "destination", "phone", "msisdn", "recipient", "number"})
REDACTED = "[REDACTED]"


def mask_phone(number: str) -> str:
    """`41793026727` -> `41*******27`: enough to tell numbers apart in a log, not to dial one."""
    plus = "+" if number.startswith("+") else ""
    digits = number.removeprefix("+")
    if not digits.isdigit() or len(digits) < 5:
        return "*" * len(number)
    cc_len = 1 if digits[0] in "17" else 2 if digits[:2] in _TWO_DIGIT_CC else 3
    hidden = len(digits) - cc_len - 2
    return plus + digits[:cc_len] + "*" * hidden + digits[-2:]


class Redactor:
    """A structlog processor: secrets out, phone numbers masked, in every value of the event."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        # Short secrets would redact ordinary words; settings never allow those anyway.
        self.secrets = sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True)

    def clean_text(self, text: str) -> str:
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        return _PHONE_IN_TEXT.sub(lambda m: mask_phone(m.group(0)), text)

    def clean(self, value: Any, key: str | None = None) -> Any:
        if isinstance(value, str):
            if key in _PHONE_KEYS:
                return mask_phone(value) if value.lstrip("+").isdigit() else self.clean_text(value)
            return self.clean_text(value)
        if isinstance(value, dict):
            return {k: self.clean(v, str(k)) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.clean(v, key) for v in value]
        if isinstance(value, BaseException):
            return self.clean_text(f"{type(value).__name__}: {value}")
        return value

    def __call__(self, _logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        for key, value in list(event_dict.items()):
            event_dict[key] = self.clean(value, key)
        return event_dict


_redactor = Redactor()


def _redact_rendered_exception(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    # Tracebacks are rendered to text by format_exc_info; the text may quote a request or a URL.
    exc = event_dict.get("exception")
    if isinstance(exc, str):
        event_dict["exception"] = _redactor.clean_text(exc)
    return event_dict


def configure(*, fmt: str = "json", level: str = "INFO", secrets: Iterable[str] = (), cache: bool = True) -> None:
    """Configure structlog and the stdlib root logger once per process.

    `cache` makes each logger build its processor chain once, on first use, for the life of the
    process: worth it in the long-running processes; a one-shot CLI command passes False, so a later
    configure (or a test's structlog.testing.capture_logs) still reaches every logger."""
    global _redactor
    _redactor = Redactor(secrets)
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _redactor,
    ]
    renderer: Any
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
        exception_steps: list[Any] = []
    else:
        renderer = structlog.processors.JSONRenderer()
        exception_steps = [structlog.processors.format_exc_info, _redact_rendered_exception]

    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.PositionalArgumentsFormatter(),
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=cache,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder()],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            *exception_steps,
            _redactor,
            renderer,
        ],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # httpx logs every request at INFO with the full URL; our canonical lines say more, once.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLevelName(level)))
    logging.getLogger("httpcore").setLevel(logging.WARNING)


def configure_from(settings: Any, *, warn_unknown: bool = True, cache: bool = True) -> None:
    """Configure from Settings, registering the API keys and webhook secrets for redaction.

    Every process calls this once at start-up (worker.broker in each worker process, the clock, the
    web, every CLI command), so it is also where a misspelt variable is reported: one warning per
    SMS_*/ICOMM_* variable that is no setting, once per process (`warn_unknown=False`: the caller
    reports them itself, as `sms-worker check` does)."""
    secrets = [settings.icomm_api_key.get_secret_value()]
    if settings.sms_webhook_secret is not None:
        secrets.append(settings.sms_webhook_secret.get_secret_value())
    secrets += settings.account_secrets()  # the keys and webhook secrets of SMS_ACCOUNTS (worker.accounts)
    configure(fmt=settings.log_format, level=settings.log_level, secrets=secrets, cache=cache)
    if warn_unknown:
        warn_unknown_variables()


_warned_unknown = False


def warn_unknown_variables() -> None:
    """Log `unknown_variable` (warning) for each variable that looks like a setting but is none; once."""
    global _warned_unknown
    if _warned_unknown:
        return
    _warned_unknown = True
    from worker.settings import unknown_variables

    log = structlog.get_logger("worker.settings")
    for item in unknown_variables():
        log.warning("unknown_variable", variable=item.name, source=item.source, did_you_mean=item.closest,
                    message=item.line())
