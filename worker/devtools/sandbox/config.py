"""The sandbox's knobs: one typed table read by the CLI flags, the admin endpoint and the server."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from worker.devtools.sandbox.codes import OUTCOME_KINDS

DEFAULT_OUTCOME_MIX: Final = {"delivered": 0.9, "undeliverable": 0.05, "expired": 0.03, "rejected": 0.02}
GATEWAY_CODES: Final = (500, 502, 503, 504)


@dataclass
class SandboxConfig:
    """Every behaviour knob of the sandbox; mutable because faults change at run time."""

    report_delay_ms: float = 200.0
    outcome_mix: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_OUTCOME_MIX))
    seed: int | None = None
    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    error_5xx_rate: float = 0.0
    error_5xx_codes: tuple[int, ...] = GATEWAY_CODES
    rate_429: float = 0.0
    retry_after_share: float = 0.0
    retry_after_s: int = 1
    accept_then_timeout_rate: float = 0.0
    timeout_delay_ms: float = 30000.0
    drop_rate: float = 0.0
    html_body_rate: float = 0.0
    truncated_body_rate: float = 0.0
    partial_results_rate: float = 0.0
    unknown_status_rate: float = 0.0
    late_accept_rate: float = 0.0
    late_accept_delay_ms: float = 30000.0
    request_rate_limit: float = 0.0
    down: bool = False
    logs_rate_per_min: int = 120
    logs_lag_ms: float = 0.0
    forbidden_keys: tuple[str, ...] = ()
    reject_duplicate_ids: bool = True
    reject_text_containing: str = ""
    webhook_max_attempts: int = 6
    webhook_retry_base_ms: float = 200.0
    webhook_timeout_ms: float = 5000.0
    price_per_message: float = 0.01
    currency: str = "EUR"


# --- value parsers: each takes a JSON value or a CLI string and returns the typed value ---


def _number(value: object, minimum: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError("must be a number")
    number = float(value)
    if not number >= minimum:  # also rejects NaN
        raise ValueError(f"must be >= {minimum:g}")
    return number


def _share(value: object) -> float:
    number = _number(value)
    if number > 1.0:
        raise ValueError("must be between 0 and 1")
    return number


def _integer(value: object, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError("must be an integer")
    number = int(value)
    if number < minimum:
        raise ValueError(f"must be >= {minimum}")
    return number


def _boolean(value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        return value.lower() in ("1", "true", "yes", "on")
    raise ValueError("must be a boolean")


def _seed(value: object) -> int | None:
    return None if value is None else _integer(value)


def parse_outcome_mix(value: object) -> dict[str, float]:
    """`delivered=0.9,undeliverable=0.05,...` (or a JSON object) -> normalised weights."""
    if isinstance(value, str):
        pairs: dict[str, object] = {}
        for item in value.split(","):
            name, sep, weight = item.partition("=")
            if not sep:
                raise ValueError(f"expected kind=weight, got {item!r}")
            pairs[name.strip()] = weight.strip()
        value = pairs
    if not isinstance(value, Mapping):
        raise ValueError("must be 'kind=weight,...' or an object")
    weights = {kind: 0.0 for kind in OUTCOME_KINDS}
    for kind, weight in value.items():
        if kind not in weights:
            raise ValueError(f"unknown outcome {kind!r}; known: {', '.join(OUTCOME_KINDS)}")
        weights[kind] = _number(weight)
    total = sum(weights.values())
    if total <= 0:
        raise ValueError("weights must add up to more than 0")
    return {kind: weight / total for kind, weight in weights.items()}


def _codes(value: object) -> tuple[int, ...]:
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not items:
        raise ValueError("must be a non-empty list of status codes")
    codes = tuple(_integer(item) for item in items)
    if any(code not in GATEWAY_CODES for code in codes):
        raise ValueError(f"codes must be among {GATEWAY_CODES}")
    return codes


def _keys(value: object) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not all(isinstance(item, str) for item in items):
        raise ValueError("must be a list of strings")
    return tuple(key for item in items for key in item.split(",") if key)


def _text(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError("must be a non-empty string")
    return value


@dataclass(frozen=True)
class _Knob:
    parse: Callable[[object], Any]
    help: str
    metavar: str | None = None


_KNOBS: Final[dict[str, _Knob]] = {
    "report_delay_ms": _Knob(_number, "delay between acceptance (or sendAt) and the delivery report", "MS"),
    "outcome_mix": _Knob(parse_outcome_mix, "report outcome weights, e.g. delivered=0.9,rejected=0.1", "MIX"),
    "seed": _Knob(_seed, "RNG seed: makes outcomes and fault choices reproducible", "N"),
    "latency_ms": _Knob(_number, "latency added to every POST /sms/3/messages", "MS"),
    "jitter_ms": _Knob(_number, "uniform random extra latency on top of --latency-ms", "MS"),
    "error_5xx_rate": _Knob(_share, "share of sends answered 5xx without accepting anything", "P"),
    "error_5xx_codes": _Knob(_codes, "status codes the 5xx fault draws from (500 is an ApiError)", "CODES"),
    "rate_429": _Knob(_share, "share of sends answered 429 E429 without accepting anything", "P"),
    "retry_after_share": _Knob(_share, "share of send 429s (either kind) with a Retry-After header", "P"),
    "retry_after_s": _Knob(_integer, "Retry-After value in seconds", "S"),
    "accept_then_timeout_rate": _Knob(_share, "share of sends accepted, then answered after --timeout-delay-ms", "P"),
    "timeout_delay_ms": _Knob(_number, "how long the timeout fault holds the response", "MS"),
    "drop_rate": _Knob(_share, "share of sends accepted, then the connection is cut mid-response", "P"),
    "html_body_rate": _Knob(
        _share, "share of sends accepted, then answered 200 with a proxy's HTML page instead of JSON", "P"
    ),
    "truncated_body_rate": _Knob(
        _share, "share of sends accepted, then answered 200 with the JSON cut in half (a complete response)", "P"
    ),
    "partial_results_rate": _Knob(
        _share,
        "share of sends accepted whole whose 200 lists only some results (each left out with p=0.5, at least one)",
        "P",
    ),
    "unknown_status_rate": _Knob(
        _share, "share of accepted destinations whose result has an unknown status group (7 SCHEDULED)", "P"
    ),
    "late_accept_rate": _Knob(
        _share,
        "share of sends held --late-accept-delay-ms, then accepted (even if the client left) and answered",
        "P",
    ),
    "late_accept_delay_ms": _Knob(_number, "how long the late-accept fault holds a send before accepting it", "MS"),
    "request_rate_limit": _Knob(_number, "POST /sms/3/messages requests/s before 429 (0: unlimited)", "RPS"),
    "down": _Knob(_boolean, "every API endpoint answers 503 (an outage)"),
    "logs_rate_per_min": _Knob(_integer, "GET /sms/3/logs requests per minute before 429", "N"),
    "logs_lag_ms": _Knob(_number, "an accepted message shows in GET /sms/3/logs only this long after acceptance", "MS"),
    "forbidden_keys": _Knob(_keys, "an API key that authenticates but lacks permission (403); repeatable", "KEY"),
    "reject_duplicate_ids": _Knob(_boolean, "reject an already accepted messageId with status 23"),
    "reject_text_containing": _Knob(
        lambda v: v if isinstance(v, str) else _text(v),
        "answer 400 for a whole bulk when a message text contains this string (empty: off)", "TEXT",
    ),
    "webhook_max_attempts": _Knob(lambda v: _integer(v, 1), "webhook push attempts before a batch is dropped", "N"),
    "webhook_retry_base_ms": _Knob(_number, "first webhook retry delay; doubles per attempt", "MS"),
    "webhook_timeout_ms": _Knob(_number, "timeout of one webhook push", "MS"),
    "price_per_message": _Knob(_number, "pricePerMessage in reports and logs", "PRICE"),
    "currency": _Knob(_text, "currency in reports and logs", "CODE"),
}
# Names accepted by POST /_sandbox/config besides the field names.
_ALIASES: Final = {"reports_delay_ms": "report_delay_ms", "forbidden_key": "forbidden_keys"}


def apply_updates(config: SandboxConfig, updates: Mapping[str, object]) -> list[tuple[str, str]]:
    """Validate, then apply `updates`; returns (key, problem) pairs and changes nothing on error."""
    problems: list[tuple[str, str]] = []
    parsed: dict[str, Any] = {}
    for key, value in updates.items():
        name = _ALIASES.get(key, key)
        knob = _KNOBS.get(name)
        if knob is None:
            problems.append((key, "unknown setting"))
            continue
        try:
            parsed[name] = knob.parse(value)
        except (ValueError, TypeError) as exc:
            problems.append((key, str(exc)))
    if not problems:
        for name, value in parsed.items():
            setattr(config, name, value)
    return problems


def config_as_dict(config: SandboxConfig) -> dict[str, Any]:
    """The config as plain JSON values."""
    return {
        name: list(value) if isinstance(value, tuple) else value for name, value in dataclasses.asdict(config).items()
    }


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per knob; unset flags keep the SandboxConfig default."""
    for name, knob in _KNOBS.items():
        if name == "forbidden_keys":
            parser.add_argument("--forbidden-key", dest=name, action="append", metavar=knob.metavar, help=knob.help)
        elif knob.metavar is None:
            parser.add_argument(_flag(name), dest=name, action=argparse.BooleanOptionalAction, help=knob.help)
        else:
            parser.add_argument(_flag(name), dest=name, metavar=knob.metavar, help=knob.help)


def config_from_args(namespace: argparse.Namespace) -> SandboxConfig:
    """Build the config from parsed flags; raises ValueError naming the bad flag."""
    config = SandboxConfig()
    given = {name: getattr(namespace, name) for name in _KNOBS if getattr(namespace, name, None) is not None}
    problems = apply_updates(config, given)
    if problems:
        raise ValueError("; ".join(f"{_flag(name)}: {problem}" for name, problem in problems))
    return config


def config_to_args(config: SandboxConfig) -> list[str]:
    """The CLI flags that rebuild `config` (only those that differ from the defaults)."""
    defaults = SandboxConfig()
    args: list[str] = []
    for name in _KNOBS:
        value = getattr(config, name)
        if value == getattr(defaults, name):
            continue
        if name == "forbidden_keys":
            for key in value:
                args += ["--forbidden-key", key]
        elif isinstance(value, bool):
            args.append(_flag(name) if value else "--no-" + _flag(name)[2:])
        elif isinstance(value, dict):
            args += [_flag(name), ",".join(f"{kind}={weight!r}" for kind, weight in value.items())]
        elif isinstance(value, tuple):
            args += [_flag(name), ",".join(str(item) for item in value)]
        else:
            args += [_flag(name), str(value)]
    return args


def knob_names() -> Sequence[str]:
    """Every setting name the admin endpoint accepts."""
    return tuple(_KNOBS)
