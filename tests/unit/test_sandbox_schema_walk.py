"""Schema walk: the sandbox's send-request validation accepts exactly what the vendor's JSON Schema accepts.

The walk starts at SmsRequest (the vendor's SmsRequestEnvelope). It resolves every $ref and every
allOf and oneOf branch, and it yields one *site* per property, and per array item, of every object
reachable from there. Each site gets values generated from its own schema (type, format, enum,
minimum/maximum, maxLength, pattern), from hypothesis and from a fixed list of boundary values. The
value goes at that path, or the property is removed, in an otherwise minimal valid request. Three
things are then compared:

* the oracle: jsonschema's Draft 2020-12 validator on the same schema document. It is made to assert
  `format: int32` and to read `pattern` as ECMA-262 (see the oracle section).
* validate_send_request() accepts exactly when the oracle does. The exceptions are the rejections the
  platform makes on top of the schema, each listed in DELIBERATE with where contract.md documents it.
  A rejection names the site's property path, or a path below it, in the sandbox's path style
  (`messages[0].options.tracking.shortenUrl`).
* SandboxState.accept(), the app's hot path with its inline fast path, gives the same verdict and
  the same violations. The Log entries of what it accepts are valid Log objects.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator, FormatChecker, ValidationError, validators
from jsonschema.exceptions import best_match

from worker.devtools.sandbox.config import SandboxConfig
from worker.devtools.sandbox.reports import log_of
from worker.devtools.sandbox.state import SandboxState
from worker.devtools.sandbox.validation import validate_send_request

NOW = datetime(2026, 1, 15, 12, 0, tzinfo=UTC).timestamp()
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
ROOT = "SmsRequest"  # the vendor's SmsRequestEnvelope (the schema file shortens the name)


def _schema_path() -> Path:
    shared = Path(__file__).parents[2].parent / "shared/api/sms-v3-schemas.json"
    return shared if shared.exists() else Path(__file__).parents[1] / "data/sms-v3-schemas.json"


DOCUMENT: dict[str, Any] = json.loads(_schema_path().read_text())
DEFS: dict[str, Any] = DOCUMENT["$defs"]


# --- the oracle ---------------------------------------------------------------------------


def _ecma_regex(pattern: str) -> re.Pattern[str]:
    r"""A JSON Schema `pattern` is an ECMA-262 regex (2020-12 validation §6.3.3). Python's `re`
    differs from ECMA-262 in two ways that this schema's one pattern (InfobipDateTime) runs into:
    `\d` also matches non-ASCII digits (re.ASCII stops that), and `$` also matches before a final
    newline (`\Z` does not)."""
    return re.compile(re.sub(r"(?<!\\)\$", r"\\Z", pattern), re.ASCII)


def _pattern(validator: Any, pattern: str, instance: Any, schema: Any) -> Iterator[ValidationError]:
    if validator.is_type(instance, "string") and not _ecma_regex(pattern).search(instance):
        yield ValidationError(f"{instance!r} does not match {pattern!r}")


FORMATS = FormatChecker(formats=())


@FORMATS.checks("int32")
def _int32(instance: object) -> bool:
    """OpenAPI `format: int32` is a signed 32-bit value. jsonschema has no int32 check of its own,
    and 2020-12 treats formats as annotations unless a format checker is given."""
    if isinstance(instance, bool) or not isinstance(instance, int | float):
        return True
    return INT32_MIN <= instance <= INT32_MAX


_Oracle = validators.extend(Draft202012Validator, {"pattern": _pattern})
ORACLE = _Oracle({**DOCUMENT, "$ref": f"#/$defs/{ROOT}"}, format_checker=FORMATS)
LOG_ORACLE = _Oracle({**DOCUMENT, "$ref": "#/$defs/Log"}, format_checker=FORMATS)


# --- the walk -----------------------------------------------------------------------------

Path_ = tuple[str | int, ...]


class _Absent:
    def __repr__(self) -> str:
        return "<absent>"


ABSENT: Any = _Absent()  # as a site's value: the property is removed


def resolve(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema with its $ref chain merged in. `x-def` names the $defs entry it came from."""
    name = None
    while "$ref" in schema:
        ref = schema["$ref"]
        assert ref.startswith("#/$defs/"), ref
        name = ref.removeprefix("#/$defs/")
        schema = {**DEFS[name], **{k: v for k, v in schema.items() if k != "$ref"}}
    return {**schema, "x-def": name} if name else schema


def object_view(schema: dict[str, Any]) -> tuple[dict[str, Any], set[str]]:
    """(properties, required) of an object schema, including the ones its allOf parts add."""
    properties = dict(schema.get("properties", {}))
    required = set(schema.get("required", ()))
    for part in schema.get("allOf", ()):
        more, needed = object_view(resolve(part))
        properties.update(more)
        required |= needed
    return properties, required


# A deliverable destination, so that minimal requests are accepted as messages and their Log checked.
_MINIMAL_VALUES: dict[tuple[str, str], Any] = {("SmsToDestination", "to"): "41793026727"}


def minimal(schema: dict[str, Any]) -> Any:
    """The smallest valid instance: required properties only, one-item arrays, first enum value."""
    schema = resolve(schema)
    if "oneOf" in schema:
        return minimal(schema["oneOf"][0])
    if "enum" in schema:
        return schema["enum"][0]
    kind = schema.get("type")
    if kind == "object":
        properties, required = object_view(schema)
        owner = schema.get("x-def") or ""
        return {name: _MINIMAL_VALUES.get((owner, name)) or minimal(properties[name]) for name in sorted(required)}
    if kind == "array":
        return [minimal(schema["items"])]  # one item: the platform refuses empty arrays (DELIBERATE)
    if kind == "string":
        return schema["examples"][0] if "examples" in schema else "x"  # hex and sendAt have a format
    if kind == "integer":
        return schema.get("minimum", 0)
    if kind == "boolean":
        return False
    raise AssertionError(f"no minimal instance for {schema}")


def put(body: Any, path: Path_, value: Any) -> Any:
    """A copy of `body` with `value` at `path` (ABSENT: with the property removed)."""
    body = copy.deepcopy(body)
    parent = body
    for key in path[:-1]:
        parent = parent[key]
    if value is ABSENT:
        parent.pop(path[-1], None)
    else:
        parent[path[-1]] = value
    return body


def dotted(path: Path_) -> str:
    """The sandbox's property path: messages[0].destinations[0].to."""
    out = ""
    for key in path:
        out += f"[{key}]" if isinstance(key, int) else (f".{key}" if out else key)
    return out


@dataclass(eq=False)
class Site:
    """One property (or array item) of the request: where it is, its schema, a body to put values in."""

    path: Path_
    schema: dict[str, Any]
    base: Any  # a valid request in which the site's parent exists
    owner: str  # the $defs entry declaring the property ("" for array items)
    required: bool
    item: bool = False  # an array item: it is replaced, never removed
    discriminator: bool = False  # a required property of a oneOf branch: without it no branch matches

    @property
    def name(self) -> str:
        return dotted(self.path)


# The platform wants deliveryTimeWindow.from and .to together (DELIBERATE). A site for one of them
# carries the other at 12:30, so its values are judged by the schema and not by that rule alone;
# generated hours of 12 (from) or 13 (to) also fall under the 1-hour rule, which is checked as well.
COMPANIONS: dict[tuple[str, str], tuple[str, dict[str, int]]] = {
    ("DeliveryTimeWindow", "from"): ("to", {"hour": 12, "minute": 30}),
    ("DeliveryTimeWindow", "to"): ("from", {"hour": 12, "minute": 30}),
}


def _walk(schema: dict[str, Any], path: Path_, body: Any, sites: list[Site], in_branch: bool = False) -> None:
    schema = resolve(schema)
    if "oneOf" in schema:
        for branch in schema["oneOf"]:
            _walk(branch, path, put(body, path, minimal(branch)), sites, in_branch=True)
        return
    kind = schema.get("type")
    if kind == "array":
        items = resolve(schema["items"])
        sites.append(Site((*path, 0), items, body, owner="", required=True, item=True))
        _walk(items, (*path, 0), body, sites)
    elif kind == "object":
        owner = schema.get("x-def") or ""
        properties, required = object_view(schema)
        for name, prop in properties.items():
            site_path = (*path, name)
            companion = COMPANIONS.get((owner, name))
            base = put(body, (*path, companion[0]), companion[1]) if companion else body
            child = resolve(prop)
            sites.append(
                Site(site_path, child, base, owner, name in required, discriminator=in_branch and name in required)
            )
            _walk(child, site_path, put(base, site_path, minimal(child)), sites)


def walk() -> list[Site]:
    """Every site of the send request, in schema order."""
    sites: list[Site] = []
    root = {"$ref": f"#/$defs/{ROOT}"}
    _walk(root, (), minimal(root), sites)
    return sites


SITES = walk()


# --- deliberate rejections: the platform refuses these although the schema allows them ----


@dataclass(frozen=True)
class Deliberate:
    """A rejection the sandbox makes on top of the schema, because the platform does."""

    name: str
    source: str  # where contract.md (or the schema's own text) documents it
    find: Callable[[Any], Iterator[str]]  # the violation paths it causes in a schema-valid body
    example: dict[str, Any] = field(hash=False)  # a schema-valid body it rejects


def _messages(body: Any) -> Iterator[tuple[str, Any]]:
    for i, message in enumerate(body["messages"]):
        yield f"messages[{i}]", message


def _windows(body: Any) -> Iterator[tuple[str, Any]]:
    for path, message in _messages(body):
        window = message.get("options", {}).get("deliveryTimeWindow")
        if window is not None:
            yield path + ".options.deliveryTimeWindow", window


def _empty_messages(body: Any) -> Iterator[str]:
    if not body["messages"]:
        yield "messages"


def _empty_destinations(body: Any) -> Iterator[str]:
    for path, message in _messages(body):
        if not message["destinations"]:
            yield path + ".destinations"


def _empty_days(body: Any) -> Iterator[str]:
    for path, window in _windows(body):
        if not window["days"]:
            yield path + ".days"


def _lone_bound(body: Any) -> Iterator[str]:
    for path, window in _windows(body):
        if ("from" in window) != ("to" in window):
            yield path


def _short_window(body: Any) -> Iterator[str]:
    for path, window in _windows(body):
        if "from" in window and "to" in window:
            start = window["from"]["hour"] * 60 + window["from"]["minute"]
            end = window["to"]["hour"] * 60 + window["to"]["minute"]
            if (end - start) % 1440 < 60:
                yield path


def _both_contents(body: Any) -> Iterator[str]:
    for path, message in _messages(body):
        content = message["content"]
        if content.get("text") is not None and content.get("hex") is not None:
            yield path + ".content"


def _bad_hex(body: Any) -> Iterator[str]:
    for path, message in _messages(body):
        content = message["content"]
        hex_data = content.get("hex")
        if content.get("text") is not None or hex_data is None:
            continue  # text content (the sandbox ignores a hex beside it), or no hex at all
        if not re.fullmatch(r"[0-9A-Fa-f ]*", hex_data) or len(hex_data.replace(" ", "")) % 2:
            yield path + ".content.hex"


_STAMP = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})T([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.[0-9]+)?(Z|([+-])([0-9]{2}):?([0-9]{2}))"
)


def _instant(stamp: str) -> float | None:
    """Unix seconds of a pattern-valid stamp, or None when it names no real date, time or offset."""
    match = _STAMP.fullmatch(stamp)
    assert match is not None, stamp  # only called on schema-valid stamps
    year, month, day, hour, minute, second, zone, sign, off_h, off_m = match.groups()
    try:
        offset = (
            timedelta(0)
            if zone == "Z"
            else (-1 if sign == "-" else 1) * timedelta(hours=int(off_h), minutes=int(off_m))
        )
        tz = timezone(offset)
        return datetime(int(year), int(month), int(day), int(hour), int(minute), int(second), tzinfo=tz).timestamp()
    except ValueError:
        return None


def _send_at(body: Any) -> str | None:
    send_at: str | None = body.get("options", {}).get("schedule", {}).get("sendAt")
    return send_at


def _unreal_send_at(body: Any) -> Iterator[str]:
    send_at = _send_at(body)
    if send_at is not None and _instant(send_at) is None:
        yield "options.schedule.sendAt"


def _far_send_at(body: Any) -> Iterator[str]:
    send_at = _send_at(body)
    instant = None if send_at is None else _instant(send_at)
    if instant is not None and instant > NOW + 180 * 86400:
        yield "options.schedule.sendAt"


def _request(**message: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"destinations": [{"to": "41793026727"}], "content": {"text": "hi"}}
    return {"messages": [{**base, **message}]}


def _window(**window: Any) -> dict[str, Any]:
    return _request(options={"deliveryTimeWindow": {"days": ["MONDAY"], **window}})


DELIBERATE: tuple[Deliberate, ...] = (
    # NOT documented: contract.md §2 says "No minItems or maxItems is stated". Kept, pending a decision
    # (raised with issue "First contact" item 10), because an empty bulk sends nothing and the sandbox
    # has always refused it with "must not be empty".
    Deliberate("empty messages", "undocumented (contract.md §2: no minItems)", _empty_messages, {"messages": []}),
    # contract.md §2 SmsMessage: destinations is required; the schema's own description says "A valid
    # destination is required", and [SC] MISSING_TO says "there must be a valid recipient".
    Deliberate(
        "empty destinations", "contract.md §2, schema description", _empty_destinations, _request(destinations=[])
    ),
    # contract.md §2 SmsMessageOptions: days is "an array of enum MONDAY … SUNDAY, at least one"
    # (the schema's description too: "At least one day must be provided").
    Deliberate("empty days", "contract.md §2 deliveryTimeWindow", _empty_days, _window(days=[])),
    # contract.md §2: "from and to must be given together with at least 1 hour between them, or both omitted".
    Deliberate(
        "from without to",
        "contract.md §2 deliveryTimeWindow",
        _lone_bound,
        _window(**{"from": {"hour": 9, "minute": 0}}),
    ),
    Deliberate(
        "window under an hour",
        "contract.md §2 deliveryTimeWindow, §8",
        _short_window,
        _window(**{"from": {"hour": 9, "minute": 0}, "to": {"hour": 9, "minute": 59}}),
    ),
    # contract.md §2 SmsMessage.content: "An object with both text and hex matches both branches, so it
    # is invalid." The schema's oneOf still accepts such an object when one of the two branches fails
    # for some other reason (e.g. {"text": 5, "hex": "48"} is valid binary content).
    Deliberate(
        "both text and hex",
        "contract.md §2 SmsMessage.content",
        _both_contents,
        _request(content={"text": 5, "hex": "48"}),
    ),
    # contract.md §2 binary content: hex is "Two hex digits per byte, separated by spaces".
    Deliberate("hex not hex digit pairs", "contract.md §2 binary content", _bad_hex, _request(content={"hex": "zz"})),
    # contract.md §2 and §8: sendAt is a date-time "no later than 180 days in advance".
    Deliberate(
        "sendAt over 180 days ahead",
        "contract.md §2 schedule.sendAt, §8",
        _far_send_at,
        {**_request(), "options": {"schedule": {"sendAt": "2026-07-15T12:00:01.000+0000"}}},
    ),
    # contract.md §2/§8: sendAt has the format yyyy-MM-dd'T'HH:mm:ss.SSSZ, the vendor's `format:
    # date-time`; the schema's pattern only approximates it with digits, so it lets month 13,
    # February 30, hour 24 or a 24-hour offset through. None of those is a date-time.
    Deliberate(
        "sendAt not a real date-time",
        "contract.md §2 schedule.sendAt, §8; schema InfobipDateTime description",
        _unreal_send_at,
        {**_request(), "options": {"schedule": {"sendAt": "2026-02-30T10:00:00.000+0000"}}},
    ),
)


def deliberate_paths(body: Any) -> set[str]:
    """The violation paths the deliberate rejections cause in a schema-valid body."""
    return {path for rule in DELIBERATE for path in rule.find(body)}


# --- the comparison -----------------------------------------------------------------------


def _under(prop: str, anchor: str) -> bool:
    return prop == anchor or prop.startswith((anchor + ".", anchor + "["))


def judge(site: Site, value: Any) -> None:
    """Put `value` at `site` and check that the oracle, the validator and accept() all agree."""
    body = put(site.base, site.path, value)
    schema_ok = ORACLE.is_valid(body)
    violations = validate_send_request(body, NOW)
    props = {prop for prop, _ in violations}
    where = f"{site.name} = {value!r}"
    if schema_ok:
        expected = deliberate_paths(body)
        assert props == expected, f"{where}: the schema accepts it, the sandbox says {violations}"
    else:
        error = best_match(ORACLE.iter_errors(body))
        assert violations, f"{where}: the schema rejects it ({error.message}), the sandbox accepts it"
        # Without the required property of its oneOf branch, content matches no branch: the sandbox
        # reports that at the content object ("must contain either text or hex").
        anchor = dotted(site.path[:-1]) if value is ABSENT and site.discriminator else site.name
        assert all(_under(prop, anchor) for prop in props), f"{where}: violations {violations} not at {anchor}"
    state = SandboxState(SandboxConfig(seed=1), NOW)
    response, problems = state.accept(body, NOW)
    if violations:
        assert response is None and problems == violations, f"{where}: accept() says {response or problems}"
    else:
        assert response is not None and problems == [], f"{where}: accept() says {problems}"
        for record in state.log:
            LOG_ORACLE.validate(log_of(record, 0.01, "EUR"))


# --- values -------------------------------------------------------------------------------

_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=8)
)
ANY_JSON = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)


def _int_bounds(schema: dict[str, Any]) -> tuple[int, int]:
    assert schema.get("format") == "int32", schema  # every request integer is an int32
    return max(INT32_MIN, schema.get("minimum", INT32_MIN)), min(INT32_MAX, schema.get("maximum", INT32_MAX))


def _integers(schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    low, high = _int_bounds(schema)
    near = st.sampled_from([low, high]).flatmap(lambda bound: st.integers(bound - 2, bound + 2))
    return st.one_of(
        st.integers(low, high),
        st.integers(low, high).map(float),  # 3.0 IS an integer
        near,
        near.map(float),
        st.integers(),
        st.floats(allow_nan=False, allow_infinity=False),
        st.floats(low - 1, high + 1),
    )


def _sized(limit: int) -> st.SearchStrategy[str]:
    """Strings of about `limit` characters (any characters, astral ones included)."""
    return st.tuples(st.text(min_size=1, max_size=4), st.integers(max(0, limit - 2), limit + 2)).map(
        lambda chunk_n: (chunk_n[0] * (chunk_n[1] // len(chunk_n[0]) + 1))[: chunk_n[1]]
    )


def _stamp(moment: datetime, offset_min: int, digits: int, style: str) -> str:
    """`moment` written at a UTC offset of `offset_min`: Z, +HH:MM or +HHMM, 0 to 9 fraction digits."""
    local = moment + timedelta(minutes=offset_min)
    text = f"{local.year:04d}-{local.month:02d}-{local.day:02d}T{local.hour:02d}:{local.minute:02d}:{local.second:02d}"
    if digits:
        text += "." + f"{local.microsecond:06d}000"[:digits]
    if style == "Z" and offset_min == 0:
        return text + "Z"
    sign = "+" if offset_min >= 0 else "-"
    hours, minutes = divmod(abs(offset_min), 60)
    return f"{text}{sign}{hours:02d}{':' if style == 'colon' else ''}{minutes:02d}"


_MOMENTS = st.datetimes(
    min_value=datetime(2026, 1, 10), max_value=datetime(2026, 8, 1), timezones=st.just(UTC)
) | st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=st.just(UTC))
STAMPS = st.builds(
    _stamp, _MOMENTS, st.integers(-14 * 60, 14 * 60), st.integers(0, 9), st.sampled_from(["Z", "colon", "plain"])
)


# Near misses of a valid stamp: blanks, a final newline, the query-string '+' damage, other digits...
_MANGLES: dict[str, Callable[[str], str]] = {
    "lead": lambda stamp: " " + stamp,
    "trail": lambda stamp: stamp + " ",
    "newline": lambda stamp: stamp + "\n",
    "space-for-plus": lambda stamp: stamp.replace("+", " "),
    "lower": str.lower,
    "cut": lambda stamp: stamp[:-1],
    "arabic-digit": lambda stamp: stamp.replace("1", "\u0661", 1),
    "no-seconds": lambda stamp: stamp[:16] + stamp[19:],
    "ten-digits": lambda stamp: stamp[:19] + ".0123456789Z",
}


def _datetimes(schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    return st.one_of(
        STAMPS,
        st.builds(lambda stamp, mangle: mangle(stamp), STAMPS, st.sampled_from(list(_MANGLES.values()))),
        st.from_regex(schema["pattern"], fullmatch=False),  # Python semantics: non-ASCII digits, a final newline
        st.text(max_size=30),
    )


def _contents() -> st.SearchStrategy[Any]:
    """Content objects mixing both branches' properties, valid and not (oneOf is easy to get wrong)."""
    return st.fixed_dictionaries(
        {},
        optional={
            "text": st.text(max_size=5) | _SCALARS,
            "hex": st.sampled_from(["48 69", "4869", "zz", "4", ""]) | _SCALARS,
            "transliteration": st.sampled_from(["NONE", "TURKISH", "KLINGON"]) | _SCALARS,
            "language": st.sampled_from([{"languageCode": "TR"}, {"languageCode": "XX"}, {}]) | _SCALARS,
            "dataCoding": st.sampled_from([0, 8, 8.0, 2**31, 1.5]) | _SCALARS,
            "esmClass": st.sampled_from([0, 64, 64.0, -(2**31) - 1]) | _SCALARS,
        },
    )


def conforming(schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Instances built from the schema: every property optional or present, in range, from its enum.
    For objects, arrays and content they test combinations of fields; the oracle judges each one."""
    schema = resolve(schema)
    if "oneOf" in schema:
        return st.one_of([conforming(branch) for branch in schema["oneOf"]])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    kind = schema.get("type")
    if kind == "object":
        owner = schema.get("x-def") or ""
        properties, required = object_view(schema)

        def field(name: str) -> st.SearchStrategy[Any]:
            known = _MINIMAL_VALUES.get((owner, name))
            return conforming(properties[name]) | (st.just(known) if known is not None else st.nothing())

        return st.fixed_dictionaries(
            {name: field(name) for name in sorted(required)},
            optional={name: field(name) for name in sorted(properties) if name not in required},
        )
    if kind == "array":
        return st.lists(conforming(schema["items"]), min_size=1, max_size=2)
    if kind == "string":
        if "pattern" in schema:
            return STAMPS
        examples = st.sampled_from(schema["examples"]) if "examples" in schema else st.nothing()
        return examples | st.text(max_size=min(schema.get("maxLength", 12), 12))
    if kind == "integer":
        low, high = _int_bounds(schema)
        return st.integers(low, high) | st.integers(low, high).map(float)
    if kind == "boolean":
        return st.booleans()
    raise AssertionError(schema)


def values(site: Site) -> st.SearchStrategy[Any]:
    """Values for `site` from its schema, plus arbitrary JSON and (when optional or required) removal."""
    schema = site.schema
    kind = schema.get("type")
    if "oneOf" in schema:
        typed = _contents() | conforming(schema)
    elif "enum" in schema:
        names = st.sampled_from(schema["enum"])
        typed = st.one_of(names, names.map(str.lower), names.map(lambda name: name + " "), st.text(max_size=12))
    elif kind == "string" and "pattern" in schema:
        typed = _datetimes(schema)
    elif kind == "string":
        typed = st.text(max_size=20) | (_sized(schema["maxLength"]) if "maxLength" in schema else st.nothing())
    elif kind == "integer":
        typed = _integers(schema)
    elif kind == "boolean":
        typed = st.booleans()
    elif kind == "object":
        typed = conforming(schema) | st.dictionaries(st.sampled_from(sorted(object_view(schema)[0])), _SCALARS)
    elif kind == "array":
        typed = st.lists(conforming(schema["items"]), max_size=3)
    else:
        raise AssertionError(schema)
    return st.one_of(typed, ANY_JSON, st.nothing() if site.item else st.just(ABSENT))


_CONTENT_EDGES: list[Any] = [
    {"text": "a"},
    {"hex": "48 69"},
    {"text": "a", "hex": "48"},
    {"text": "a", "hex": None},
    {"text": None, "hex": "48"},
    {"text": None},
    {"hex": None},
    {"text": None, "hex": None},
    {"text": 5},
    {"hex": 5},
    {"text": 5, "hex": "48"},
    {"text": "a", "hex": 5},
    {"text": "a", "hex": "zz"},
    {"text": 5, "hex": "zz"},
    {"text": "a", "dataCoding": 1.5},
    {"hex": "48", "transliteration": "KLINGON"},
    {"text": "a", "transliteration": "KLINGON", "hex": "48"},
    {"hex": "48", "dataCoding": 8.0, "esmClass": 64.0},
    {"hex": "48", "dataCoding": 2**31},
    {"text": "a", "transliteration": None},
    {"text": "a", "language": None},
    {"text": "a", "language": {"languageCode": None}},
    {},
]


def boundaries(site: Site) -> list[Any]:
    """The values worth trying every time: limits, just past them, and every JSON type."""
    schema = site.schema
    kind = schema.get("type")
    edges: list[Any] = [None, True, 0, 1.5, "x", [], {}]
    if not site.item:
        edges.append(ABSENT)
    if "oneOf" in schema:
        edges += _CONTENT_EDGES
    elif "enum" in schema:
        edges += list(schema["enum"]) + [name.lower() for name in schema["enum"]] + ["", schema["enum"][0] + " "]
    elif kind == "string" and "pattern" in schema:
        edges += [
            "2026-01-16T10:00:00.000+0000",
            "2026-01-16T10:00:00.000+00:00",
            "2026-01-16T10:00:00Z",
            "2026-01-16T10:00:00.123456789-0530",
            "2026-07-14T12:00:00.000+0000",  # 180 days ahead, to the second
            "2026-07-14T12:00:01.000+0000",  # one second more
            "2026-07-14T13:00:00.000+01:00",  # the same instant as 180 days ahead
            "2020-02-30T10:00:00Z",
            "2026-13-01T10:00:00Z",
            "2026-01-16T24:00:00Z",
            "2026-01-16T10:60:00Z",
            "2026-01-16T10:00:60Z",
            "2026-01-16T10:00:00+2400",
            "2026-01-16T10:00:00+0199",
            "0000-01-01T00:00:00Z",
            "0001-01-01T00:00:00+0100",
            "2026-01-16T10:00:00.000 0000",
            " 2026-01-16T10:00:00Z",
            "2026-01-16T10:00:00Z ",
            "2026-01-16T10:00:00Z\n",
            "\u0662026-01-16T10:00:00Z",
            "2026-01-16 10:00:00Z",
            "2026-01-16T10:00:00.0000000000Z",
            "2026-01-16T10:00:00",
        ]
    elif kind == "string":
        limit = schema.get("maxLength")
        if limit is None:
            edges += ["", "\U0001f600", "a" * 5000]
        else:
            edges += ["", "a" * limit, "a" * (limit + 1), "é" * limit, "\U0001f600" * limit, "\U0001f600" * (limit + 1)]
    elif kind == "integer":
        low, high = _int_bounds(schema)
        edges += [low, high, low - 1, high + 1, float(low), float(high), float(low - 1), float(high + 1), low + 0.5]
        edges += [-0.0, 3.0, 2**31 - 1, 2**31, -(2**31), -(2**31) - 1, 2.0**31, 2**63, 2**64, 1e300, -1e300]
        edges += [False, "1"]
    elif kind == "boolean":
        edges += [False, 1, 0.0, "true", "false"]
    elif kind == "object":
        edges += [minimal(schema), {"somethingNew": 1}]
    elif kind == "array":
        edges += [[minimal(schema["items"])], [minimal(schema["items"])] * 2, [None], [5]]
    return edges


# --- tests --------------------------------------------------------------------------------


def _site_id(site: Site) -> str:
    return site.name


@pytest.mark.parametrize("site", SITES, ids=_site_id)
def test_boundary_values_agree_with_the_schema(site: Site) -> None:
    """Limits, values just past them and every JSON type: the sandbox accepts exactly what the schema does."""
    for value in boundaries(site):
        judge(site, value)


@pytest.mark.parametrize("site", SITES, ids=_site_id)
@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
@given(data=st.data())
def test_generated_values_agree_with_the_schema(site: Site, data: st.DataObject) -> None:
    """Values generated from each site's schema: the sandbox accepts exactly what the schema does."""
    judge(site, data.draw(values(site), label=site.name))


def _reachable_properties(name: str, seen: set[str] | None = None) -> set[tuple[str, str]]:
    """(def, property) for every property of every $defs entry reachable from `name`."""
    seen = set() if seen is None else seen
    if name in seen:
        return set()
    seen.add(name)
    found: set[tuple[str, str]] = set()

    def visit(node: Any, owner: str) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("$ref"), str):
                found.update(_reachable_properties(node["$ref"].removeprefix("#/$defs/"), seen))
            for prop, sub in node.get("properties", {}).items():
                found.add((owner, prop))
                visit(sub, owner)
            for key, sub in node.items():
                if key != "properties":
                    visit(sub, owner)
        elif isinstance(node, list):
            for sub in node:
                visit(sub, owner)

    visit(DEFS[name], name)
    return found


def test_the_walk_reaches_every_request_property() -> None:
    """Every property of every schema reachable from SmsRequest is a site, valid at its minimal value."""
    walked = {(site.owner, str(site.path[-1])) for site in SITES if not site.item}
    assert walked == _reachable_properties(ROOT)
    assert len(SITES) >= 60
    for site in SITES:
        body = put(site.base, site.path, minimal(site.schema))
        assert ORACLE.is_valid(body), site.name
        assert validate_send_request(body, NOW) == [], site.name


@pytest.mark.parametrize("rule", DELIBERATE, ids=lambda rule: rule.name)
def test_deliberate_rejections_are_schema_valid_and_rejected(rule: Deliberate) -> None:
    """Each deliberate rejection: the schema accepts its example, the sandbox refuses it at the rule's path."""
    assert ORACLE.is_valid(rule.example)
    paths = set(rule.find(rule.example))
    assert paths
    assert {prop for prop, _ in validate_send_request(rule.example, NOW)} == paths


def test_the_oracle_asserts_int32_and_reads_patterns_as_ecma() -> None:
    """Guards the oracle set-up: 3.0 is an integer, 2**31 is not an int32, and the pattern is ECMA-262."""
    amount = {"validityPeriod": {"amount": 3.0}}
    assert ORACLE.is_valid(_request(options=amount))
    assert not ORACLE.is_valid(_request(options={"validityPeriod": {"amount": 2**31}}))
    assert not ORACLE.is_valid(_request(options={"validityPeriod": {"amount": True}}))

    def schedule(send_at: str) -> dict[str, Any]:
        return {**_request(), "options": {"schedule": {"sendAt": send_at}}}

    assert ORACLE.is_valid(schedule("2026-01-16T10:00:00Z"))
    assert not ORACLE.is_valid(schedule("2026-01-16T10:00:00Z\n"))
    assert not ORACLE.is_valid(schedule("\u0662026-01-16T10:00:00Z"))
