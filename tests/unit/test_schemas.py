"""The published job schema (worker/schemas/job-v1.schema.json) and the worker's validators agree.

Jobs are generated from the schema itself (tests/support/schema_strategies.py): every one must pass
worker.models.validate_job and, when it is a plain job, the Outbox's fast path encode_plain_job.
Then one key anywhere in a job is set to any JSON value (or removed), and the schema and the
validator must give the same verdict. The only disagreements allowed are the rules JSON Schema
cannot state, which the schema's description names (see `_beyond_the_schema`), and only in one
direction: the schema accepts, the worker refuses.
"""

from __future__ import annotations

import copy
import re
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from tests.support.schema_strategies import SchemaStrategies, json_values
from worker import schemas
from worker.errors import JobValidationError
from worker.models import encode_job, encode_plain_job, sms_parts, validate_job

JOB = schemas.load("job")
CHECK = Draft202012Validator(JOB)
GEN = SchemaStrategies(JOB)
MAX_PARTS = 255  # SMS_MAX_TEXT_PARTS at its maximum: the schema's maxLength is this bound
METADATA_MAX = 1 << 20
FAST_KEYS = {"to", "text", "id", "sender", "metadata", "v"}
DELETE = object()
PROFILE = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _worker_accepts(job: Any) -> bool:
    try:
        validate_job(job, max_text_parts=MAX_PARTS, metadata_max_bytes=METADATA_MAX)
    except JobValidationError:
        return False
    return True


def _paths(node: dict[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every key path the schema names, read from it (through $ref and anyOf)."""
    if "$ref" in node:
        node = JOB["$defs"][node["$ref"].removeprefix("#/$defs/")]
    for branch in node.get("anyOf", ()):
        if "type" not in branch or branch["type"] != "null":
            return _paths(branch, prefix)
    found = []
    for name, child in node.get("properties", {}).items():
        found.append((*prefix, name))
        found += _paths(child, (*prefix, name))
    if node.get("properties"):
        found.append((*prefix, "no_such_option"))
    return found


PATHS = _paths(JOB)


def _set(job: dict[str, Any], path: tuple[str, ...], value: Any) -> dict[str, Any]:
    """A copy of `job` with `path` set to `value` (parents made as objects) or removed (DELETE)."""
    out = copy.deepcopy(job)
    node = out
    for key in path[:-1]:
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
    if value is DELETE:
        node.pop(path[-1], None)
    else:
        node[path[-1]] = value
    return out


_SEND_AT = re.compile(r"^(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.\d+)?(?:[Zz]|([+-])(\d{2}):(\d{2}))$")


def _real_moment(value: str) -> bool:
    """Whether a send_at the schema's pattern admits is a real moment (the calendar rule)."""
    found = _SEND_AT.match(value)
    if found is None:
        return False
    year, month, day, hour, minute, second = (int(found.group(i)) for i in range(1, 7))
    try:
        datetime(year, month, day, hour, minute, second)
    except ValueError:
        return False
    return found.group(7) is None or timedelta(hours=int(found.group(8)), minutes=int(found.group(9))) < timedelta(
        hours=24)


def _walk(value: Any) -> list[Any]:
    """Every value nested in `value`, itself included."""
    out = [value]
    if isinstance(value, dict):
        for item in value.values():
            out += _walk(item)
    elif isinstance(value, list):
        for item in value:
            out += _walk(item)
    return out


def _beyond_the_schema(job: Any) -> str | None:
    """Which rule the schema's description names as beyond JSON Schema this job breaks, or None."""
    if not isinstance(job, dict):
        return None
    text, metadata, window, send_at = job.get("text"), job.get("metadata"), job.get("delivery_time_window"), job.get(
        "send_at")
    if isinstance(text, str) and sms_parts(text) > MAX_PARTS:
        return "SMS parts"
    if isinstance(metadata, dict):
        try:
            if len(orjson.dumps(metadata)) > METADATA_MAX:
                return "metadata size"
        except orjson.JSONEncodeError:
            return "metadata numbers beyond 64 bits"
    if isinstance(window, dict) and isinstance(window.get("from"), dict) and isinstance(window.get("to"), dict):
        start, end = window["from"], window["to"]
        if (end["hour"] * 60 + end["minute"] - start["hour"] * 60 - start["minute"]) % 1440 < 60:
            return "delivery window under an hour"
    if isinstance(send_at, str) and not _real_moment(send_at):
        return "send_at calendar"
    others = {k: v for k, v in job.items() if k != "metadata"}
    if any(type(v) is float and v.is_integer() for v in _walk(others)):
        return "an integer written as a float"
    return None


# --- the schema itself -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["job", "event"])
def test_the_shipped_schemas_are_valid_draft_2020_12(name: str) -> None:
    schema = schemas.load(name)
    Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema" and schema["description"]


def test_the_schema_names_every_option_of_the_job_model() -> None:
    """A field added to worker.models.Job without the schema (or the other way round) fails here."""
    from worker.models import Job

    wire_names = {field.alias or name for name, field in Job.model_fields.items()}
    assert wire_names == set(JOB["properties"])


# --- generated from the schema: the worker accepts ---------------------------------------------------
@PROFILE
@given(GEN.valid())
def test_every_job_the_schema_accepts_the_worker_accepts(job: dict[str, Any]) -> None:
    beyond = _beyond_the_schema(job)
    try:
        valid = validate_job(job, max_text_parts=MAX_PARTS, metadata_max_bytes=METADATA_MAX)
    except JobValidationError as error:
        assert beyond is not None, f"the schema accepts {job!r} but the worker refuses it: {error}"
        return
    # What the worker writes to the outbox is itself a job the schema accepts, meaning the same.
    canonical = orjson.loads(encode_job(valid))
    assert CHECK.is_valid(canonical), list(CHECK.iter_errors(canonical))
    assert validate_job(canonical, max_text_parts=MAX_PARTS, metadata_max_bytes=METADATA_MAX) == valid
    fast = encode_plain_job(job, max_text_parts=MAX_PARTS, metadata_max_bytes=METADATA_MAX)
    plain = job.keys() <= FAST_KEYS and isinstance(job.get("text"), str) and all(
        job.get(k, "") is not None for k in ("id", "sender", "v"))
    if plain:
        assert fast is not None, f"a plain job the schema accepts missed the fast path: {job!r}"
    if fast is not None:
        assert validate_job(orjson.loads(fast), max_text_parts=MAX_PARTS, metadata_max_bytes=METADATA_MAX) == valid


# --- mutated: the schema and the worker refuse the same ------------------------------------------------
def _at(job: dict[str, Any], path: tuple[str, ...]) -> Any:
    node: Any = job
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _near_misses(value: Any) -> list[Any]:
    """Values a validator is tempted to coerce or let through: the value with a newline, another
    type that reads the same ("5" for 5, 1 for true), at a bound, or emptied."""
    if isinstance(value, bool):
        return [int(value), str(value).lower(), "yes", None]
    if isinstance(value, int):
        return [str(value), float(value), value + 1, value - 1, -value, bool(value), 2**63, -(2**63) - 1]
    if isinstance(value, str):
        return [value + "\n", "\n" + value, value + " ", " " + value, value * 2, "", value.upper(), value[1:],
                int(value) if value.isascii() and value.isdigit() else value + "0"]
    if isinstance(value, dict):
        return [{}, {**value, "no_such_option": 1}, list(value.values()), None]
    if isinstance(value, list):
        return [[], value + value, [None], value[:1], {str(i): v for i, v in enumerate(value)}]
    return [0, "", {}, [], False]


@PROFILE
@given(GEN.valid(), st.sampled_from(PATHS), st.data())
def test_a_job_with_any_key_set_to_anything_gets_the_same_verdict(job: dict[str, Any], path: tuple[str, ...],
                                                                   data: st.DataObject) -> None:
    value = data.draw(st.one_of(st.sampled_from(_near_misses(_at(job, path))), json_values, st.just(DELETE)),
                      label="value")
    mutated = _set(job, path, value)
    schema_says, worker_says = CHECK.is_valid(mutated), _worker_accepts(mutated)
    if worker_says:
        assert schema_says, f"the worker accepts {mutated!r}, the schema refuses: {list(CHECK.iter_errors(mutated))}"
    elif schema_says:
        assert _beyond_the_schema(mutated) is not None, f"the schema accepts {mutated!r}, the worker refuses it"


GOOD = {"to": "41793026727", "text": "hello"}
# Named mutations, each refused by both (deterministic, and readable as the rules' list).
REFUSED = {
    "to missing": {"text": "hello"},
    "to a number": {**GOOD, "to": 41793026727},
    "to with a trailing newline": {**GOOD, "to": "41793026727\n"},
    "to with a leading zero": {**GOOD, "to": "041793026727"},
    "to too short": {**GOOD, "to": "123456"},
    "to too long": {**GOOD, "to": "1234567890123456"},
    "to with spaces": {**GOOD, "to": "41 79 302 67 27"},
    "to in other digits": {**GOOD, "to": "٤١٧٩٣٠٢٦٧٢٧"},
    "neither text nor binary": {"to": "41793026727"},
    "text and binary": {**GOOD, "binary": {"hex": "0f"}},
    "text only whitespace": {**GOOD, "text": " \n\t"},
    "text empty": {**GOOD, "text": ""},
    "text a list": {**GOOD, "text": ["hello"]},
    "text beyond any parts limit": {**GOOD, "text": "a" * 39016},
    "an unknown key": {**GOOD, "colour": "red"},
    "a snake_case typo": {**GOOD, "validity": {"amount": 5}},
    "from_ instead of from": {**GOOD, "delivery_time_window": {"days": ["MONDAY"], "from_": {"hour": 1, "minute": 0},
                                                                "to": {"hour": 3, "minute": 0}}},
    "from without to": {**GOOD, "delivery_time_window": {"days": ["MONDAY"], "from": {"hour": 1, "minute": 0}}},
    "no days": {**GOOD, "delivery_time_window": {"days": []}},
    "hour 24": {**GOOD, "delivery_time_window": {"days": ["MONDAY"], "from": {"hour": 24, "minute": 0},
                                                  "to": {"hour": 3, "minute": 0}}},
    "sender empty": {**GOOD, "sender": ""},
    "sender too long": {**GOOD, "sender": "s" * 65},
    "id too long": {**GOOD, "id": "i" * 201},
    "id a number": {**GOOD, "id": 7},
    "metadata a list": {**GOOD, "metadata": [1]},
    "flash a string": {**GOOD, "flash": "yes"},
    "flash a number": {**GOOD, "flash": 1},
    "data_coding a string": {"to": "41793026727", "binary": {"hex": "0f", "data_coding": "5"}},
    "data_coding a boolean": {"to": "41793026727", "binary": {"hex": "0f", "data_coding": True}},
    "data_coding beyond 64 bits": {"to": "41793026727", "binary": {"hex": "0f", "data_coding": 2**63}},
    "hex with a trailing newline": {"to": "41793026727", "binary": {"hex": "0f\n"}},
    "hex without spaces": {"to": "41793026727", "binary": {"hex": "0fc2"}},
    "amount zero": {**GOOD, "validity_period": {"amount": 0}},
    "amount a string": {**GOOD, "validity_period": {"amount": "5"}},
    "time unit DAYS": {**GOOD, "validity_period": {"amount": 5, "time_unit": "DAYS"}},
    "language code unknown": {**GOOD, "language": {"language_code": "FR"}},
    "transliteration unknown": {**GOOD, "transliteration": "LATIN"},
    "india_dlt without principal": {**GOOD, "regional": {"india_dlt": {}}},
    "telemarketer_id a string": {**GOOD, "regional": {"india_dlt": {"principal_entity_id": "p",
                                                                     "telemarketer_id": "12"}}},
    "title too long": {**GOOD, "regional": {"south_korea": {"title": "t" * 67}}},
    "callback_data too long": {**GOOD, "callback_data": "c" * 4001},
    "campaign id too long": {**GOOD, "campaign_reference_id": "c" * 256},
    "send_at without offset": {**GOOD, "send_at": "2026-12-01T09:30:00"},
    "send_at without seconds": {**GOOD, "send_at": "2026-12-01T09:30Z"},
    "send_at a number": {**GOOD, "send_at": 1796117400},
    "send_at with a trailing newline": {**GOOD, "send_at": "2026-12-01T09:30:00Z\n"},
    "v 2": {**GOOD, "v": 2},
    "v true": {**GOOD, "v": True},
    "v null": {**GOOD, "v": None},
    "not an object": ["41793026727", "hello"],
}
# The rules JSON Schema cannot state: the schema accepts these, the worker refuses them.
BEYOND = {
    "too many SMS parts for the setting": {**GOOD, "text": "ж" * 20_000},
    "metadata over SMS_METADATA_MAX_BYTES": {**GOOD, "metadata": {"k": "m" * METADATA_MAX}},
    "a delivery window under an hour": {**GOOD, "delivery_time_window": {
        "days": ["MONDAY"], "from": {"hour": 1, "minute": 0}, "to": {"hour": 1, "minute": 59}}},
    "send_at on 30 February": {**GOOD, "send_at": "2026-02-30T09:30:00Z"},
    "an integer written as 2.0": {**GOOD, "validity_period": {"amount": 2.0}},
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_named_mutations_are_refused_by_both(name: str) -> None:
    job = REFUSED[name]
    assert not CHECK.is_valid(job), f"the schema accepts {name}"
    assert not _worker_accepts(job), f"the worker accepts {name}"
    if isinstance(job, dict) and job.keys() <= FAST_KEYS:
        assert encode_plain_job(job, max_text_parts=MAX_PARTS, metadata_max_bytes=METADATA_MAX) is None


@pytest.mark.parametrize("name", sorted(BEYOND))
def test_the_rules_beyond_json_schema_are_the_only_disagreements(name: str) -> None:
    job = BEYOND[name]
    assert CHECK.is_valid(job) and not _worker_accepts(job)
    assert _beyond_the_schema(job) is not None


@pytest.mark.parametrize("job", [
    GOOD, {**GOOD, "to": "+41793026727", "id": "o-1", "sender": "Shop", "metadata": {"a": [1, {"b": None}]}, "v": 1},
    {"to": "41793026727", "binary": {"hex": "0f c2 4a", "data_coding": 8, "esm_class": 64}},
    {**GOOD, "send_at": "2026-12-01T09:30:00.5+01:00", "campaign_reference_id": "black-friday", "flash": False,
     "validity_period": {"amount": 30}, "delivery_time_window": {"days": ["MONDAY", "FRIDAY"], "from": {
         "hour": 22, "minute": 30}, "to": {"hour": 6, "minute": 0}}, "sender": None},
])
def test_everyday_jobs_pass_both(job: dict[str, Any]) -> None:
    assert CHECK.is_valid(job), list(CHECK.iter_errors(job))
    assert _worker_accepts(job)


def test_the_generator_covers_every_option() -> None:
    """The property tests only prove something for the keys they generate: all of them, here."""
    seen: set[str] = set()

    # Derandomized: the same 150 jobs every run, so coverage cannot flicker with the seed.
    @settings(max_examples=150, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(GEN.valid())
    def collect(job: dict[str, Any]) -> None:
        seen.update(job)

    collect()
    assert seen == set(JOB["properties"])


def test_the_readme_wire_format_table_names_the_schemas_keys() -> None:
    """README "From any language" documents the same keys the schema has."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    section = readme.split("### From any language", 1)[1].split("\n#", 1)[0]
    rows = [line.split("|")[1] for line in section.splitlines() if line.startswith("| `")]
    documented = {key for row in rows for key in re.findall(r"`([a-z_]+)`", row)}
    assert documented == set(JOB["properties"])
