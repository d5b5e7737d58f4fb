"""A text is refused only for more SMS parts than SMS_MAX_TEXT_PARTS (GSM-7 160/153 septets with the
extension table at two septets, else UCS-2 70/67 UTF-16 units, neither an escape nor a surrogate pair
ever split), or for an absurd size; the message says which, truly. (worker.sms_text counts; its own
tests are tests/unit/test_sms_text.py.)"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.errors import JobValidationError
from worker.models import (
    TEXT_MAX_BYTES,
    encode_plain_job,
    plain_job,
    sms_parts,
    text_problem,
    text_size,
    validate_job,
)
from worker.outbox import Outbox, OutboxConfig
from worker.settings import Settings

LIMITS = {"max_text_parts": 25, "metadata_max_bytes": 2048}
SETTINGS = Settings(icomm_api_key="unit-test-key-0123456789", icomm_base_url="http://127.0.0.1:9")
EMOJI = "\U0001f600"  # outside the BMP: a surrogate pair in UTF-16

# (text, parts): each at exactly the 25-part limit, and one unit more.
AT_THE_LIMIT = [
    # 3800 septets (each € is escape + character, 76 a part: a pair is never split), 5700 UTF-8 bytes
    pytest.param("€" * 1900, 25, id="euro-25"),
    pytest.param("€" * 1900 + "a", 25, id="euro-3801-septets"),  # the last part's spare septet
    pytest.param("a" + "€" * 1900, 25, id="euro-shifted-25"),  # 153 + 24 x 152 septets
    pytest.param("€" * 1901, 26, id="euro-26"),
    pytest.param("€" * 1912, 26, id="euro-3824-septets-26"),  # 25 x 153 septets only if pairs could be split
    pytest.param("中" * 1675, 25, id="cjk-25"),  # 1675 UTF-16 units, 5025 UTF-8 bytes
    pytest.param("中" * 1676, 26, id="cjk-26"),
    pytest.param("a" * 3825, 25, id="gsm-25"),
    pytest.param("a" * 3826, 26, id="gsm-26"),
    pytest.param("é" * 3825, 25, id="gsm-2-byte-25"),  # one septet, two UTF-8 bytes each: 7650 bytes
    pytest.param(EMOJI * 825 + "中", 25, id="pairs-25"),  # 25 parts of 33 pairs (66 units), 中 in the last unit
    pytest.param(EMOJI * 826, 26, id="pairs-26"),  # 1652 units: 25 parts only if a pair could be split
]


def _job(text: str) -> dict[str, Any]:
    return {"to": "41793026727", "text": text, "id": "order-1"}


@pytest.mark.parametrize(("text", "parts"), AT_THE_LIMIT)
def test_parts_are_counted_as_the_platform_bills_them(text: str, parts: int) -> None:
    assert sms_parts(text) == parts


def test_single_part_limits_and_encodings() -> None:
    assert text_size("a" * 160) == (1, "GSM-7", 160)
    assert text_size("a" * 161) == (2, "GSM-7", 161)
    assert text_size("€" * 80) == (1, "GSM-7", 160)
    assert text_size("€" * 81) == (2, "GSM-7", 162)
    assert text_size("中" * 70) == (1, "UCS-2", 70)
    assert text_size("中" * 71) == (2, "UCS-2", 71)
    assert text_size(EMOJI * 35) == (1, "UCS-2", 70)
    assert text_size("a" * 159 + "中") == (3, "UCS-2", 160)  # one non-GSM character makes it all UCS-2


def test_a_surrogate_pair_is_never_split_between_parts() -> None:
    """66 units, then a pair: the pair does not fit the 67th unit, so it starts the next part."""
    text = "中" * 66 + EMOJI + "中" * (25 * 67 - 68)  # 1675 units: 25 parts if the pair could be split
    assert text_size(text) == (26, "UCS-2", 1675)
    assert text_size("中" * 65 + EMOJI + "中" * (25 * 67 - 67)) == (25, "UCS-2", 1675)


@pytest.mark.parametrize(("text", "parts"), AT_THE_LIMIT)
def test_texts_up_to_the_parts_limit_are_accepted_and_longer_ones_refused_truly(text: str, parts: int) -> None:
    """€ and CJK texts of 25 parts pass (whatever their UTF-8 size); 26 parts are refused, and the
    message gives the real count and the setting."""
    fast = encode_plain_job(_job(text), **LIMITS)
    if parts <= 25:
        assert fast is not None
        assert validate_job(_job(text), **LIMITS).text == text
        return
    assert fast is None
    assert plain_job(_job(text), **LIMITS, json_size=len(text) * 3) is None
    with pytest.raises(JobValidationError) as caught:
        validate_job(_job(text), **LIMITS)
    [problem] = caught.value.problems
    encoding, units = text_size(text)[1:]
    assert problem.field == "text"
    assert problem.message.startswith(f"too long: 26 SMS parts ({units} ")
    assert encoding in problem.message and "at most 25 allowed (SMS_MAX_TEXT_PARTS)" in problem.message


def test_the_parts_limit_is_the_setting() -> None:
    """SMS_MAX_TEXT_PARTS is the limit, also below the platform's 25 (and 35 characters can be 2 parts)."""
    limits = {**LIMITS, "max_text_parts": 1}
    assert encode_plain_job(_job(EMOJI * 35), **limits) is not None
    for text in (EMOJI * 36, "a" * 161):
        assert encode_plain_job(_job(text), **limits) is None
        with pytest.raises(JobValidationError, match="too long: 2 SMS parts"):
            validate_job(_job(text), **limits)
    outbox = Outbox(OutboxConfig.from_settings(SETTINGS.model_copy(update={"sms_max_text_parts": 3})), None)  # type: ignore[arg-type]
    with pytest.raises(JobValidationError, match=r"jobs\[0\].text: too long: 4 SMS parts"):
        outbox.enqueue_many([_job("€" * 300)], "bulk")


def test_an_absurdly_large_text_is_refused_for_its_size() -> None:
    text = "a" * (TEXT_MAX_BYTES + 1)
    with pytest.raises(JobValidationError) as caught:
        validate_job(_job(text), **{**LIMITS, "max_text_parts": 255})
    message = f"too long: {TEXT_MAX_BYTES + 1:,} bytes as UTF-8, at most 100,000 accepted"
    assert caught.value.problems[0].message == message
    assert encode_plain_job(_job(text), **{**LIMITS, "max_text_parts": 255}) is None


def test_the_size_cap_never_refuses_a_text_the_parts_limit_allows() -> None:
    """The most UTF-8 bytes a text of 255 parts (the setting's maximum) can have stays under the cap."""
    for text in ("é" * (255 * 153), "中" * (255 * 67), EMOJI * (255 * 33)):
        assert sms_parts(text) <= 255
        assert validate_job(_job(text), **{**LIMITS, "max_text_parts": 255}).text == text


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(["a", "€", "é", "中", EMOJI, "{"]), max_size=400), st.integers(1, 6))
def test_the_shortcut_for_short_texts_agrees_with_the_count(text: str, max_parts: int) -> None:
    """text_problem skips counting texts too short to exceed the limit: never wrongly."""
    assert (text_problem(text, max_parts) is None) == (text_size(text)[0] <= max_parts)
    fast = encode_plain_job(_job(text or "x"), **{**LIMITS, "max_text_parts": max_parts})
    assert (fast is not None) == (text_size(text or "x")[0] <= max_parts)
