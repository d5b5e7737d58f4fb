"""worker.numbers: one normal form for every spelling of a number, and the facts the guards decide on."""

from __future__ import annotations

import random

import phonenumbers
import pytest

from worker import numbers
from worker.models import validate_job
from worker.numbers import UNPARSEABLE, NumberFacts, facts, normalise, normalise_many, problem


@pytest.fixture(autouse=True)
def _fresh_caches() -> None:
    numbers.cache_clear()


@pytest.mark.parametrize(("raw", "region"), [
    ("41793026727", None),  # the job's `to`: already in normal form
    ("+41793026727", None),
    ("+41 79 302 67 27", None),
    ("0041 79 302 67 27", None),
    ("+41 (0)79 302-67-27", None),
    ("410793026727", None),  # a trunk 0 kept after the country code
    ("tel:+41-79-302-67-27", None),
    ("  41793026727\n", None),
    ("079 302 67 27", "CH"),
    ("079 302 67 27", "ch"),
    ("0041793026727", "CH"),
    ("+41 79 302 67 27", "DE"),  # an international number ignores the region
    ("41793026727", "CH"),  # the region's own country code without '+'
])
def test_every_spelling_of_a_swiss_mobile_is_one_normal_form(raw: str, region: str | None) -> None:
    assert normalise(raw, region) == "41793026727"


@pytest.mark.parametrize(("raw", "region", "normal"), [
    ("+49 151 23456789", None, "4915123456789"),
    ("0151 23456789", "DE", "4915123456789"),
    ("0049 30 1234567", None, "49301234567"),
    ("+1 (650) 253-0000", None, "16502530000"),
    ("(650) 253-0000", "US", "16502530000"),
    ("1 650 253 0000", None, "16502530000"),
    ("+800 1234 5678", None, "80012345678"),  # non-geographic (international freephone)
])
def test_german_us_and_global_numbers(raw: str, region: str | None, normal: str) -> None:
    assert normalise(raw, region) == normal


@pytest.mark.parametrize(("raw", "region", "why"), [
    ("", None, "empty"),
    ("abc", None, "not a phone number"),
    ("0793026727", None, "no country code"),  # national without a region: it cannot be placed
    ("+999 1234567", None, "no such country code"),
    ("+41 79", None, "too short"),
    ("+41 79 302 67 27 12345", None, "too long"),
    ("+41 79 302 67 27 ext. 12", None, "extension"),
    ("079 302 67 27", "XX", "unknown region"),
    ("0151 23456789", "US", "too long"),  # a German national number read as American
])
def test_what_is_no_number_is_none_with_the_reason(raw: str, region: str | None, why: str) -> None:
    assert normalise(raw, region) is None
    assert why in (problem(raw, region) or ""), problem(raw, region)
    assert normalise_many([raw], region) == [None]


def test_problem_is_none_for_a_number() -> None:
    assert problem("+41 79 302 67 27") is None


@pytest.mark.parametrize(("number", "expected"), [
    ("41793026727", NumberFacts("CH", "MOBILE", True)),
    ("41215551234", NumberFacts("CH", "FIXED_LINE", True)),
    ("41900123456", NumberFacts("CH", "PREMIUM_RATE", True)),  # Swiss 0900: premium rate
    ("41906123456", NumberFacts("CH", "PREMIUM_RATE", True)),
    ("41840123456", NumberFacts("CH", "SHARED_COST", True)),  # Swiss 0840/0842/0844/0848: shared cost
    ("41848123456", NumberFacts("CH", "SHARED_COST", True)),
    ("41800123456", NumberFacts("CH", "TOLL_FREE", True)),
    ("4915123456789", NumberFacts("DE", "MOBILE", True)),
    ("49301234567", NumberFacts("DE", "FIXED_LINE", True)),
    ("499001234567", NumberFacts("DE", "PREMIUM_RATE", True)),
    ("491801234567", NumberFacts("DE", "SHARED_COST", True)),
    ("16502530000", NumberFacts("US", "FIXED_LINE_OR_MOBILE", True)),
    ("80012345678", NumberFacts("001", "TOLL_FREE", True)),
    # Possible lengths but no assigned range: kept in normal form, not valid.
    ("41101234567", NumberFacts("CH", "UNKNOWN", False)),
    # +1 is shared by many regions; a number in none of their ranges has no region.
    ("19995550123", NumberFacts(None, "UNKNOWN", False)),
])
def test_facts(number: str, expected: NumberFacts) -> None:
    assert normalise(number) == number
    assert facts(number) == expected


def test_facts_of_what_is_no_number() -> None:
    assert facts("abc") == UNPARSEABLE
    assert facts("0793026727") == UNPARSEABLE
    assert facts("+41 79 302 67 27") == facts("41793026727")  # read as normalise reads it


def _sample(count: int) -> list[str]:
    """Random digits behind every country code, zeros over-represented (trunk prefixes are where
    parsing gets subtle: "+353 00 ...", "+375 0 8 ...")."""
    rng = random.Random(15)
    codes = sorted(phonenumbers.COUNTRY_CODE_TO_REGION_CODE)
    return [f"{rng.choice(codes)}" + "".join(rng.choice("0000123456789") for _ in range(rng.randint(5, 12)))
            for _ in range(count)]


def test_valid_is_what_is_valid_number_says() -> None:
    """facts computes the type once and derives validity from it; it must agree with the library."""
    checked = 0
    for raw in _sample(6000):
        normal = normalise(raw)
        if normal is None:
            continue
        parsed = phonenumbers.parse("+" + normal)
        about = facts(normal)
        assert about.valid == phonenumbers.is_valid_number(parsed), normal
        assert about.region == phonenumbers.region_code_for_number(parsed), normal
        checked += 1
    assert checked > 1000  # the sample is not all refused


def test_every_normal_form_is_a_job_number_and_a_fixed_point() -> None:
    """Stored numbers must be what a job's `to` can be, and normalising again changes nothing
    (the dispatcher normalises jobs' numbers that came from these)."""
    sample = _sample(6000)
    normals = normalise_many(sample)
    assert normals == [normalise(raw) for raw in sample]
    # The same numbers written nationally, with a region, and with punctuation.
    rng = random.Random(16)
    regions = sorted(phonenumbers.SUPPORTED_REGIONS)
    normals += [normalise("0" + raw[2:], rng.choice(regions)) for raw in sample[:3000]]
    normals += [normalise(f"+{raw[:2]} ({raw[2]}) {raw[3:6]}-{raw[6:]}") for raw in sample[3000:]]
    kept = [n for n in normals if n is not None]
    assert len(kept) > 1500
    for normal in kept:
        assert normalise(normal) == normal
        assert validate_job({"to": normal, "text": "hi"}, max_text_parts=10, metadata_max_bytes=4096).to == normal


def _parsed_normal(raw: str) -> str | None:
    """normalise by the library's parse alone (no quick path): the reference."""
    text = numbers._text_to_parse(raw, None)
    return numbers._normal_form(numbers._parse(text, None), text)


def _spelt(digits: str, rng: random.Random) -> str:
    """The digits as people write them: '+', '00' or nothing first, punctuation anywhere."""
    out = [rng.choice(["+", "+", "00", ""])]
    for digit in digits:
        if rng.random() < 0.3:
            out.append(rng.choice([" ", "-", ".", "/", " (", ") ", "  "]))
        out.append(digit)
    return "".join(out)


def test_the_quick_path_answers_as_the_parse_does() -> None:
    """A job's `to` ("+<digits>", also written with spaces, dashes, dots or brackets) is answered
    without a parse when it can be: the same answers as the library's parse, on random numbers of
    every country code (national prefixes after the code, leading zeros, impossible lengths)."""
    rng = random.Random(17)
    codes = sorted(phonenumbers.COUNTRY_CODE_TO_REGION_CODE)
    sample = _sample(15_000) + [f"{code}{rng.randint(10**6, 10**10)}" for code in codes for _ in range(20)]
    sample += [_spelt(raw, rng) for raw in sample[:10_000]]
    answered = 0
    for raw in sample:
        numbers.cache_clear()
        assert normalise(raw) == _parsed_normal(raw), raw
        answered += numbers._parsed.cache_info().misses == 0
    assert answered > len(sample) // 3  # the quick path does answer (most job numbers)


def test_a_job_number_needs_no_parse() -> None:
    assert normalise("41793026727") == "41793026727"
    assert normalise("+4915123456789") == "4915123456789"
    assert numbers._parsed.cache_info().misses == 0
    assert normalise("410793026727") == "41793026727"  # a national prefix after the code: parsed
    assert numbers._parsed.cache_info().misses == 1


def test_answers_are_cached() -> None:
    normalise("+41 79 302 67 27")
    normalise("+41 79 302 67 27")
    facts("41793026727")
    facts("41793026727")
    assert normalise.cache_info().hits == 1
    assert facts.cache_info().hits == 1


def _typed_examples(rng: random.Random) -> list[str]:
    """Numbers of every region and type (the library's examples, and each with its last digits
    changed), so the special ranges are really hit, plus random digits behind every code."""
    found = []
    for region in sorted(phonenumbers.SUPPORTED_REGIONS):
        for kind in range(12):  # every PhoneNumberType but UNKNOWN (99)
            example = phonenumbers.example_number_for_type(region, kind)
            if example is None:
                continue
            digits = f"{example.country_code}{phonenumbers.national_significant_number(example)}"
            found.append(digits)
            found += [digits[:-2] + f"{rng.randint(0, 99):02d}" for _ in range(3)]
    return found + _sample(10_000)


@pytest.mark.parametrize("blocked", [frozenset({"PREMIUM_RATE", "SHARED_COST"}), frozenset({"TOLL_FREE"}),
                                     frozenset({"VOIP", "UAN"}), frozenset({"MOBILE"})])
def test_blocked_type_answers_as_number_type_does(blocked: frozenset[str]) -> None:
    """The policy's quick check of blocked number types agrees with facts() (number_type) on numbers
    of every type and region; and it does answer without a parse for most job numbers."""
    sample = _typed_examples(random.Random(18))
    hits = 0
    for number in sample:
        kind = numbers.facts(number).number_type
        assert numbers.blocked_type(number, blocked) == (kind if kind in blocked else None), number
        hits += kind in blocked
    assert hits > 20  # the sample does hold blocked numbers
    numbers.cache_clear()
    swiss = [f"4179{i:07d}" for i in range(1000)]
    assert all(numbers.blocked_type(n, frozenset({"PREMIUM_RATE"})) is None for n in swiss)
    assert numbers.facts.cache_info().currsize == 0  # answered from the ranges, no parse
    assert numbers.blocked_type("41900123456", frozenset({"PREMIUM_RATE"})) == "PREMIUM_RATE"


@pytest.mark.parametrize("blocked", [frozenset({"PREMIUM_RATE", "SHARED_COST"}), frozenset({"VOIP"}), frozenset()])
def test_screen_answers_as_its_three_questions_do(blocked: frozenset[str]) -> None:
    """screen() (the policy's one call per job) equals normal_or_raw, region_of and blocked_type on
    numbers of every region and type, in job form and written other ways."""
    sample = _typed_examples(random.Random(7))
    written = [f"+{n}" for n in sample[:500]] + [f"{n[:2]}0{n[2:]}" for n in sample[:500]] + ["0791234567", "12"]
    for raw in sample + written:
        number = numbers.normal_or_raw(raw)
        expected = (number, numbers.region_of(number), numbers.blocked_type(number, blocked) if blocked else None)
        assert numbers.screen(raw, blocked) == expected, raw
