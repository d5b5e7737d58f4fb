"""Bad input at the doors tests/unit/test_bad_input.py does not cover yet (hypothesis, in-process).

- the webhook: whatever body it accepts, the report processor can parse without raising, and every
  report of it is accounted for (final, intermediate or dead-lettered), so no accepted call is a
  poison page;
- the Python API: whatever `enqueue_many` accepts is a job the dispatcher can turn into a wire message
  (entries written by the API skip validation in the worker), and whatever it refuses writes nothing;
- log redaction: the API key and the webhook secret never survive, wherever they sit in a value.
"""

from __future__ import annotations

from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from worker.dispatch import parse_job
from worker.errors import JobValidationError
from worker.logs import Redactor
from worker.outbox import Outbox, OutboxConfig
from worker.provider import wire_message_from_dict
from worker.reports import WebhookBodyError, parse_page, validate_webhook_body
from worker.settings import Settings
from worker.store import Store

KEY = "k3y-5f0c9d2b7a41e386"
SECRET = "whsec-8e3b1f0a7c6d2954"

scalars = (st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False)
           | st.text(max_size=20))
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)
statuses = st.fixed_dictionaries(
    {},
    optional={
        "groupName": st.sampled_from(["DELIVERED", "UNDELIVERABLE", "EXPIRED", "REJECTED", "PENDING", "ACCEPTED",
                                      "BOGUS", ""]) | scalars,
        "groupId": st.integers(-1, 9) | scalars,
        "name": st.text(max_size=20) | scalars,
    },
)
reports = st.fixed_dictionaries(
    {},
    optional={
        "messageId": st.text(max_size=20) | scalars,
        "status": statuses | json_values,
        "bulkId": st.text(max_size=10) | scalars,
        "to": st.from_regex(r"[1-9][0-9]{6,14}", fullmatch=True) | scalars,
        "doneAt": st.text(max_size=30) | scalars,
        "price": st.dictionaries(st.text(max_size=8), scalars, max_size=3) | scalars,
        "error": st.dictionaries(st.text(max_size=8), scalars, max_size=3) | scalars,
        "messageCount": st.integers(-5, 5) | scalars,
    },
)
bodies = (
    st.binary(max_size=200)
    | json_values.map(orjson.dumps)
    | st.lists(reports | json_values, max_size=6).map(lambda results: orjson.dumps({"results": results}))
)


@settings(max_examples=200, deadline=None)
@given(bodies)
def test_any_body_the_webhook_accepts_is_processed_without_a_poison_page(body: bytes) -> None:
    """An accepted webhook body parses into finals + intermediates + dead letters covering every report."""
    try:
        n = validate_webhook_body(body)
    except WebhookBodyError as error:
        assert str(error)
        return
    page = parse_page("1-0", {b"page": body, b"src": b"webhook"})
    assert len(page.finals) + page.intermediate + len(page.dead) == n
    assert all(f.message_id and f.group in {"DELIVERED", "UNDELIVERABLE", "EXPIRED", "REJECTED"} for f in page.finals)


job_like = st.fixed_dictionaries(
    {},
    optional={
        "to": st.from_regex(r"\+?[1-9][0-9]{6,14}", fullmatch=True) | scalars,
        "text": st.text(min_size=1, max_size=200) | scalars,
        "binary": st.fixed_dictionaries({"hex": st.from_regex(r"[0-9a-f]{2}( [0-9a-f]{2}){0,5}", fullmatch=True)},
                                        optional={"data_coding": st.integers(-1, 300), "esm_class": scalars})
        | json_values,
        "id": st.text(min_size=1, max_size=40) | scalars,
        "sender": st.text(max_size=20) | scalars,
        "metadata": json_values,
        "validity_period": st.fixed_dictionaries({"amount": st.integers(-2, 5000)},
                                                 optional={"time_unit": st.sampled_from(["SECONDS", "MINUTES",
                                                                                         "HOURS", "DAYS"])})
        | json_values,
        "language": st.fixed_dictionaries({"language_code": st.sampled_from(["TR", "ES", "XX"])}) | json_values,
        "transliteration": st.sampled_from(["TURKISH", "NONE", "KLINGON"]) | scalars,
        "flash": scalars,
        "delivery_time_window": st.fixed_dictionaries(
            {"days": st.lists(st.sampled_from(["MONDAY", "FRIDAY", "FUNDAY"]), max_size=3)},
            optional={"from": st.fixed_dictionaries({"hour": st.integers(-1, 25), "minute": st.integers(0, 59)}),
                      "to": st.fixed_dictionaries({"hour": st.integers(0, 23), "minute": st.integers(-1, 60)})})
        | json_values,
        "callback_data": st.text(max_size=30) | scalars,
        "colour": json_values,
    },
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(job_like, min_size=1, max_size=3))
def test_what_the_api_accepts_the_dispatcher_can_send_and_what_it_refuses_writes_nothing(
    settings: Settings, store: Store, batch: list[dict[str, Any]]
) -> None:
    """enqueue_many: a refusal names the job and writes nothing; an acceptance stores sendable jobs."""
    outbox = Outbox(OutboxConfig.from_settings(settings), store)
    before = int(store.r.xlen(store.outbox("bulk")))
    try:
        queued = outbox.enqueue_many(batch, "bulk")
    except JobValidationError as error:
        assert error.problems and all(p.field.startswith("jobs[") for p in error.problems)
        assert int(store.r.xlen(store.outbox("bulk"))) == before
        return
    entries = store.r.xrange(store.outbox("bulk"), count=before + len(batch) + 10)[before:]
    assert len(entries) == sum(1 for r in queued if r.queued)
    for _, fields in entries:
        # What the API wrote, the dispatcher must be able to send as it is. (This line asserted a
        # `src=api` mark the outbox stopped writing long ago; it ran only on the rare example that
        # queued a job, and failed on it.)
        _, problem = parse_job(fields[b"job"], max_text_parts=settings.sms_max_text_parts,
                               metadata_max_bytes=settings.sms_metadata_max_bytes)
        assert problem is None, problem
        job = orjson.loads(fields[b"job"])
        message = wire_message_from_dict(job, "m-1", default_sender="ACME", webhook_url=None)
        assert message["destinations"][0]["to"].isdigit()


def _plant(value: Any, secret: str) -> Any:
    """`value` with the secret written into every string (alone, and inside text)."""
    if isinstance(value, str):
        return f"{value}{secret}" if len(value) % 2 else f"x {secret} {value}"
    if isinstance(value, dict):
        return {k: _plant(v, secret) for k, v in value.items()}
    if isinstance(value, list):
        return [_plant(v, secret) for v in value] + [secret]
    return value


@settings(max_examples=200, deadline=None)
@given(json_values, st.sampled_from([KEY, SECRET, f"App {KEY}", f"https://icomm:{SECRET}@host/hook"]),
       st.sampled_from(["error", "to", "url", "exception", "detail"]))
def test_redaction_removes_the_key_and_the_secret_wherever_they_sit(value: Any, planted: str, key: str) -> None:
    """Redactor.clean leaves no trace of the API key or the webhook secret, in any string of any value."""
    redactor = Redactor([KEY, SECRET])
    cleaned = redactor.clean(_plant(value, planted), key)
    text = orjson.dumps(cleaned, default=str).decode()
    assert KEY not in text and SECRET not in text
    error = RuntimeError(f"request failed: {_plant(value, planted)!r}")
    assert SECRET not in str(redactor.clean(error)) and KEY not in str(redactor.clean(error))
