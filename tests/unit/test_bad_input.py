"""Bad input at every door gets a clear, typed error, never a crash (property-based, hypothesis)."""

from __future__ import annotations

from typing import Any

import httpx
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from worker.dispatch import parse_job
from worker.errors import JobValidationError, ProviderError
from worker.models import encode_plain_job, plain_job, validate_job
from worker.outbox import Outbox, OutboxConfig
from worker.provider import Provider, ProviderConfig, wire_message_from_dict, wire_request
from worker.reports.parse import parse_page
from worker.settings import Settings

SETTINGS = Settings(icomm_api_key="unit-test-key-0123456789", icomm_base_url="http://127.0.0.1:9")
LIMITS = {"max_text_parts": 25, "metadata_max_bytes": 2048}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)
job_like = st.fixed_dictionaries(
    {},
    optional={
        "to": st.one_of(st.text(max_size=20), st.from_regex(r"\+?[1-9][0-9]{6,14}", fullmatch=True), st.integers()),
        "text": st.one_of(st.text(max_size=300), st.none(), st.integers()),
        "id": st.one_of(st.text(max_size=250), st.integers()),
        "sender": st.one_of(st.text(max_size=80), st.none()),
        "metadata": json_values,
        "validity_period": json_values,
        "binary": json_values,
        "flash": json_values,
        "colour": json_values,
    },
)


@settings(max_examples=300, deadline=None)
@given(job_like)
def test_any_job_is_accepted_or_refused_with_named_fields(data: dict[str, Any]) -> None:
    """validate_job either returns a Job or raises JobValidationError naming at least one field."""
    try:
        job = validate_job(data, **LIMITS)
    except JobValidationError as error:
        assert error.problems
        assert all(p.field and p.message for p in error.problems)
    else:
        assert job.to.isdigit()


@settings(max_examples=300, deadline=None)
@given(job_like)
def test_the_fast_path_never_accepts_what_validation_refuses(data: dict[str, Any]) -> None:
    """encode_plain_job's answer agrees with the full validation whenever it gives one."""
    fast = encode_plain_job(data, **LIMITS)
    if fast is None:
        return
    job = validate_job(orjson.loads(fast), **LIMITS)
    assert orjson.loads(fast)["to"] == job.to


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200) | json_values.map(orjson.dumps))
def test_raw_outbox_entries_never_crash_the_dispatcher(raw: bytes) -> None:
    """Whatever bytes a producer put in `job`, parsing yields a job or a reason to dead-letter it."""
    job, problem = parse_job(raw, max_text_parts=SETTINGS.sms_max_text_parts,
                             metadata_max_bytes=SETTINGS.sms_metadata_max_bytes)
    if problem is None:
        message = wire_message_from_dict(job, "sw-bulk-1-0", default_sender=None, webhook_url=None)
        assert message["destinations"][0]["to"] == job["to"]
    else:
        assert isinstance(problem, str) and problem


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300) | json_values.map(orjson.dumps))
def test_any_reports_page_is_parsed_or_dead_lettered(raw: bytes) -> None:
    """A malformed reports body never raises: it is one dead letter; bad items are dead-lettered
    with a reason, never dropped (every item is a final, an intermediate or a dead letter)."""
    page = parse_page("1-0", {b"src": b"drain", b"page": raw})
    assert all(r.message_id for r in page.finals)
    assert all(orjson.loads(letter)["reason"] for _, letter in page.dead)
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        data = None
    results = data.get("results") if isinstance(data, dict) else None
    items = len(results) if isinstance(results, list) else 1  # a malformed page: dead-lettered whole
    assert len(page.finals) + page.intermediate + len(page.dead) == items


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    status=st.sampled_from([200, 201, 400, 401, 403, 404, 413, 429, 500, 502, 503, 504]),
    body=st.binary(max_size=200) | json_values.map(orjson.dumps),
)
def test_any_provider_answer_to_a_send_is_a_result_or_a_typed_error(status: int, body: bytes) -> None:
    """Whatever the API answers, send returns a result or raises a ProviderError subclass."""
    transport = httpx.MockTransport(lambda request: httpx.Response(status, content=body))
    config = ProviderConfig.from_settings(SETTINGS.model_copy(update={"icomm_send_retry_attempts": 1}))
    provider = Provider(config, transport=transport, sleep=lambda _: None)
    request = wire_request([wire_message_from_dict({"to": "41793026727", "text": "x"}, "m1",
                                                   default_sender=None, webhook_url=None)])
    try:
        response = provider.send(request)
    except ProviderError as error:
        assert "unit-test-key-0123456789" not in str(error)
    else:
        assert status < 300
        assert isinstance(response.messages, list)
    finally:
        provider.close()


# A string with a lone surrogate (half of a UTF-16 pair, e.g. "\ud800"): a valid Python str with no UTF-8 form.
lone_surrogate = st.integers(0xD800, 0xDFFF).map(chr)
# At most 51 characters: within every field's length limit, so the surrogate is the only problem.
broken_text = st.builds(lambda a, s, b: a + s + b, st.text(max_size=25), lone_surrogate, st.text(max_size=25))
plain_base = {"to": "41793026727", "text": "hello", "id": "order-1", "sender": "Shop", "metadata": {"k": "v"}}
where = st.sampled_from(["text", "id", "sender", "campaign_reference_id", "callback_data", "metadata value",
                         "metadata key", "nested metadata value", "regional.south_korea.title"])


def _with_broken_string(place: str, bad: str) -> tuple[dict[str, Any], str]:
    """A valid job with `bad` put at `place`, and the field a problem must name."""
    job: dict[str, Any] = {**plain_base, "metadata": {"k": "v"}}
    if place == "metadata value":
        job["metadata"] = {"k": bad}
        return job, "metadata.k"
    if place == "metadata key":
        job["metadata"] = {bad: 1}
        return job, "metadata"
    if place == "nested metadata value":
        job["metadata"] = {"k": [1, {"deep": bad}]}
        return job, "metadata.k.1.deep"
    if place == "regional.south_korea.title":
        job["regional"] = {"south_korea": {"title": bad}}
        return job, place
    job[place] = bad
    return job, place


@settings(max_examples=300, deadline=None)
@given(where, broken_text)
def test_a_lone_surrogate_in_any_string_is_refused_naming_its_field(place: str, text: str) -> None:
    """Every string of a job (and every metadata key) is checked: a lone surrogate is a
    JobValidationError naming the field, on the fast path and the full one, never a UnicodeEncodeError."""
    job, field = _with_broken_string(place, text)
    assert encode_plain_job(job, **LIMITS) is None
    assert plain_job(job, **LIMITS, json_size=100) is None
    with pytest.raises(JobValidationError) as caught:
        validate_job(job, **LIMITS)
    assert any(p.field == field and "lone surrogate" in p.message for p in caught.value.problems), caught.value
    outbox = Outbox(OutboxConfig.from_settings(SETTINGS), None)  # type: ignore[arg-type]  # refused before anything is written
    with pytest.raises(JobValidationError) as caught:
        outbox.enqueue_many([plain_base, job], "bulk")
    assert any(p.field == f"jobs[1].{field}" for p in caught.value.problems), caught.value
