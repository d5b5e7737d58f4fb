"""Phone numbers: one normal form (the job's `to`: E.164 digits without '+') and the facts about a
number (country, type, validity), both from Google's metadata through the `phonenumbers` library.

    normalise("+41 79 302 67 27")        -> "41793026727"
    normalise("079 302 67 27", "CH")     -> "41793026727"
    normalise("4407911123456")           -> "447911123456"   (the trunk 0 after the country code goes)
    facts("41900123456")                 -> NumberFacts(region="CH", number_type="PREMIUM_RATE", valid=True)

Every store of numbers (the suppression list) holds them in this form, and every lookup (the
dispatcher's, the client's, the CLI's) normalises its number the same way first, so two spellings
of one number always meet.

`normalise` is lenient on purpose: a number of a possible length for its country is kept even when
the metadata does not (yet) know its range, because refusing to store an opt-out is worse than
storing one that never matches. Whether a number is valid, and what it is, are `facts`.

The normal form of a normal form is itself (tests/unit/test_numbers.py checks it on random numbers
of every country code): a number normalised once, stored, and normalised again from a job meets
itself.

A job's `to`, or any international number written with spaces, dashes, dots or brackets, is
answered without a full parse when the library's metadata says a parse could not change its digits
(`_quick`); anything else (a national format, a trunk prefix after the country code) is parsed.
Both functions are cached per process (functools.lru_cache), because traffic repeats numbers (OTP
retries, pumping scripts). Measured in CPU time on a shared 2-core box, uncached: normalise ~4 us
(~240k/s) on the quick path, ~20 us (~50k/s) with a parse; normalise then facts ~27 us for a Swiss
or German number (~35k/s: the type is matched against each range of the country) and ~40 us for a
+1 number (~25k/s: its region is found by matching the ranges of every +1 region). Cached, 4M/s
and more. A bulk to distinct numbers pays the uncached price once each.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import phonenumbers
from phonenumbers import PhoneMetadata, PhoneNumber, PhoneNumberFormat, PhoneNumberType, ValidationResult

# Numbers remembered per process by each cache: ~12 MB for the three, full (measured with tracemalloc).
CACHE_SIZE = 16_384

# The job's `to` as worker.models checks it (without its optional '+'): a normal form outside this
# could never match a job, so it is no normal form.
_JOB_NUMBER = re.compile(r"[1-9][0-9]{6,14}\Z")
_NON_DIGITS = re.compile(r"[^0-9]")
# "+<digits>" in the job's shape: what a job's `to` becomes, answered without a parse when it can be.
_PLUS_DIGITS = re.compile(r"\+[1-9][0-9]{6,14}\Z")
_PUNCTUATION = str.maketrans("", "", " -.()/")


@dataclass(frozen=True, slots=True)
class NumberFacts:
    """What the metadata says about one number.

    region: ISO 3166 code ("CH"), "001" for a non-geographic number (+800...), None when the
        country code is unknown, or shared by several regions and the number fits none (+1 ...).
    number_type: a phonenumbers.PhoneNumberType name: MOBILE, FIXED_LINE, FIXED_LINE_OR_MOBILE,
        PREMIUM_RATE, SHARED_COST, TOLL_FREE, VOIP, PERSONAL_NUMBER, PAGER, UAN, VOICEMAIL, UNKNOWN.
    valid: the number lies in a range its country assigns (UNKNOWN type means not valid).
    """

    region: str | None
    number_type: str
    valid: bool


UNPARSEABLE = NumberFacts(region=None, number_type="UNKNOWN", valid=False)


def _text_to_parse(raw: str, default_region: str | None) -> str:
    """Without a default region every number is international, as a job's `to` is: a leading '00'
    is the international prefix, and bare digits get the '+' they lack."""
    text = raw.strip()
    if default_region is None and text[:1].isdigit():
        text = "+" + (text[2:] if text.startswith("00") else text)
    return text


def _parse(text: str, region: str | None) -> PhoneNumber | None:
    """The parsed number, or None when it is no number of a possible length for its country."""
    try:
        number = phonenumbers.parse(text, region)
    except phonenumbers.NumberParseException:
        return None
    if number.extension:
        return None  # "... ext. 12" reaches a desk phone, never an SMS
    if phonenumbers.is_possible_number_with_reason(number) != ValidationResult.IS_POSSIBLE:
        return None  # too short or long for its country, a local-only number, or no such country code
    return number


# Shared by normalise (when it must parse) and facts.
_parsed = lru_cache(maxsize=CACHE_SIZE)(_parse)


def _normal_form(number: PhoneNumber | None, text: str) -> str | None:
    """The normal form of `number`, parsed from `text`."""
    if number is None:
        return None
    normal = phonenumbers.format_number(number, PhoneNumberFormat.E164)
    # The normal form of a normal form must be itself (the dispatcher normalises jobs' numbers
    # again). When the parse dropped digits (a trunk prefix after the country code, "+41 (0)79 ...",
    # a national format), the result may read differently again: "+353 00 3798482" keeps one zero
    # that "+353 0 3798482" loses, "+375 0 8..." keeps an 8 that "+375 8..." drops. So a result whose
    # digits are not the text's is read again until it stays. A job's `to` is its own normal form
    # almost always: one parse.
    while text != normal and _NON_DIGITS.sub("", text) != normal[1:]:
        quick = _quick(normal) if _PLUS_DIGITS.match(normal) else None
        if quick is not None:  # read again without a parse (a national format ends here, mostly)
            return normal[1:] if quick else None
        again = _parse(normal, None)
        if again is None:
            return None
        text, normal = normal, phonenumbers.format_number(again, PhoneNumberFormat.E164)
    return normal[1:] if _JOB_NUMBER.match(normal, 1) else None


def _region(default_region: str | None) -> str | None:
    return default_region.upper() if default_region else None


@lru_cache(maxsize=1024)
def _national_prefix(code: int) -> re.Pattern[str] | None:
    """The national prefix a parse strips after this country code (the metadata the parse uses:
    the code's main region's, or the non-geographic entity's), None when it has none."""
    meta = PhoneMetadata.metadata_for_region_or_calling_code(code, phonenumbers.region_code_for_country_code(code))
    prefix = meta.national_prefix_for_parsing if meta is not None else None
    return re.compile(prefix) if prefix else None


def _quick(text: str) -> bool | None:
    """For "+<digits>" (_PLUS_DIGITS): True when the digits are their own normal form, False when
    they have none, None when only a parse can tell.

    What phonenumbers.parse does with such a text, without its generic string handling (~20 us ->
    ~4 us): the country code is the first 1 to 3 digits that are one (E.164 codes are prefix-free),
    the rest is the national number, unchanged unless the country's national prefix matches at its
    start (then: a parse), and its leading zeros, if any, are kept (then: a parse, too; rare). The
    possible-length check is the library's own. tests/unit/test_numbers.py compares this path with
    the parse on random numbers of every country code."""
    for size in (1, 2, 3):
        code = int(text[1 : 1 + size])
        if code in phonenumbers.COUNTRY_CODE_TO_REGION_CODE:
            break
    else:
        return None
    national = text[1 + size :]
    if national[0] == "0":
        return None
    prefix = _national_prefix(code)
    if prefix is not None and prefix.match(national):
        return None
    number = PhoneNumber(country_code=code, national_number=int(national))
    return phonenumbers.is_possible_number_with_reason(number) == ValidationResult.IS_POSSIBLE


def _normalise(raw: str, region: str | None, parse: Callable[[str, str | None], PhoneNumber | None]) -> str | None:
    text = _text_to_parse(raw, region)
    # Spaces, dashes, dots and brackets are punctuation to the parser ("+41 79 302-67-27" is read as
    # its digits), so without them a written number may take the quick path too.
    compact = text.translate(_PUNCTUATION)
    if _PLUS_DIGITS.match(compact):  # a region does not matter to a number with '+'
        quick = _quick(compact)
        if quick is not None:
            return compact[1:] if quick else None
    return _normal_form(parse(text, region), text)


@lru_cache(maxsize=CACHE_SIZE)
def normalise(raw: str, default_region: str | None = None) -> str | None:
    """The number in normal form (E.164 digits without '+', e.g. "41793026727"), or None when it
    cannot be one.

    `raw` may carry formatting ("+41 79 302 67 27", "0041-79-302-67-27", "tel:+41793026727").
    Without `default_region` it is international, with or without '+'. With one (ISO 3166, "CH"),
    a number without '+' or an international prefix is read as that region's national format
    ("079 302 67 27"). An unknown region reads every national number as None."""
    return _normalise(raw, _region(default_region), _parsed)


def normalise_many(values: Iterable[str], default_region: str | None = None) -> list[str | None]:
    """normalise for each value, without the caches: an import of a million distinct numbers
    would only churn them."""
    region = _region(default_region)
    return [_normalise(raw, region, _parse) for raw in values]


@lru_cache(maxsize=CACHE_SIZE)
def facts(number: str) -> NumberFacts:
    """Region, type and validity of a number, normally one in normal form (anything else is read
    as normalise reads it without a default region); UNPARSEABLE when it is no number."""
    parsed = _parsed(_text_to_parse(number, None), None)
    if parsed is None:
        return UNPARSEABLE
    # number_type matches the number against each of its country's ranges; is_valid_number does the
    # same match again and answers "not UNKNOWN" (tests/unit/test_numbers.py holds the two equal),
    # so the type is computed once.
    kind = phonenumbers.number_type(parsed)
    return NumberFacts(
        region=phonenumbers.region_code_for_number(parsed),
        number_type=PhoneNumberType.to_string(kind),
        valid=kind != PhoneNumberType.UNKNOWN,
    )


_POSSIBLE_PROBLEMS = {
    ValidationResult.TOO_SHORT: "too short for its country",
    ValidationResult.TOO_LONG: "too long for its country",
    ValidationResult.INVALID_LENGTH: "not a possible length for its country",
    ValidationResult.IS_POSSIBLE_LOCAL_ONLY: "a local number without its area code",
    ValidationResult.INVALID_COUNTRY_CODE: "no such country code",
}
_PARSE_PROBLEMS = {
    phonenumbers.NumberParseException.INVALID_COUNTRY_CODE: "no country code; write it internationally, like "
                                                             "41793026727 or +41 79 302 67 27, or give its region",
    phonenumbers.NumberParseException.NOT_A_NUMBER: "not a phone number",
    phonenumbers.NumberParseException.TOO_SHORT_AFTER_IDD: "too short",
    phonenumbers.NumberParseException.TOO_SHORT_NSN: "too short",
    phonenumbers.NumberParseException.TOO_LONG: "too long",
}


def problem(raw: str, default_region: str | None = None) -> str | None:
    """Why normalise(raw, default_region) is None, in a few words; None when it is not.

    For error messages only (it parses again, uncached)."""
    if normalise(raw, default_region) is not None:
        return None
    region = _region(default_region)
    if not raw.strip():
        return "empty"
    if region is not None and region not in phonenumbers.SUPPORTED_REGIONS:
        return f"unknown region {default_region!r}"
    try:
        number = phonenumbers.parse(_text_to_parse(raw, region), region)
    except phonenumbers.NumberParseException as error:
        national = region is None and raw.strip()[:1] == "0" and not raw.strip().startswith("00")
        if error.error_type == phonenumbers.NumberParseException.INVALID_COUNTRY_CODE and not national:
            return "no such country code"
        return _PARSE_PROBLEMS.get(error.error_type, "not a phone number")
    if number.extension:
        return "has an extension (an SMS reaches no extension)"
    possible = phonenumbers.is_possible_number_with_reason(number)
    if possible in _POSSIBLE_PROBLEMS:
        return _POSSIBLE_PROBLEMS[possible]
    return "not a number a job can be sent to (7 to 15 digits)"


def cache_clear() -> None:
    """Forget every cached answer (tests that measure the uncached cost)."""
    _parsed.cache_clear()
    normalise.cache_clear()
    facts.cache_clear()


# --- for the traffic policy, per job: fast -----------------------------------------------------------
# A bulk goes to distinct numbers, so the caches above do not help there, and a phonenumbers
# parse costs ~20 us: as much as the rest of the send path per message. These two answer from the
# library's own metadata (country code -> regions, national prefix, possible lengths) without a
# parse when the answer cannot differ from `normalise`'s and `facts`', and ask them otherwise
# (tests/unit/test_policy.py compares them on random numbers of every country code).


@lru_cache(maxsize=1024)
def _country(code: int) -> tuple[str | None, re.Pattern[str] | None, frozenset[int]]:
    """For a country code: its region when it has only one, the national prefix a parse would strip,
    and the possible lengths of its national numbers."""
    regions = phonenumbers.COUNTRY_CODE_TO_REGION_CODE[code]
    meta = PhoneMetadata.metadata_for_region_or_calling_code(code, regions[0])
    prefix = meta.national_prefix_for_parsing if meta is not None else None
    general = meta.general_desc if meta is not None else None
    lengths = frozenset(general.possible_length or ()) if general is not None else frozenset()
    return (regions[0] if len(regions) == 1 else None), (re.compile(prefix) if prefix else None), lengths


_CODES = {str(code): code for code in phonenumbers.COUNTRY_CODE_TO_REGION_CODE}


def _code_of(digits: str) -> tuple[int, int] | None:
    for size in (1, 2, 3):
        code = _CODES.get(digits[:size])
        if code is not None:
            return code, size
    return None


# Every number's country code is decided by its first three digits (E.164 codes are prefix-free and
# at most three digits long): one dict lookup a number, where trying 1, 2 and 3 digits was three.
_BY_FIRST_THREE = {f"{n:03d}": _code_of(f"{n:03d}") for n in range(1000)}


def _country_code(number: str) -> tuple[int, int] | None:
    """(country code, its digits) of an international number."""
    return _BY_FIRST_THREE[number[:3]] if len(number) >= 3 else _code_of(number)


def normal_or_raw(raw: str) -> str:
    """The number as `normalise` writes it (the suppression list's form), or `raw` when
    it has none. A job's `to` (digits) is its own normal form unless a parse would strip a national
    prefix after the country code: only then is it parsed."""
    if raw.isdigit() and raw[:1] != "0":
        found = _country_code(raw)
        if found is None:
            return raw  # no country code: normalise has no form for it either
        prefix = _country(found[0])[1]
        if prefix is None or prefix.match(raw, found[1]) is None:
            return raw
    return normalise(raw) or raw


def region_of(number: str) -> str | None:
    """The number's region as `facts` says, from its country code alone when that code
    has one region and the number a possible length for it (no parse)."""
    found = _country_code(number) if number.isdigit() and number[:1] != "0" else None
    if found is not None:
        region, _, lengths = _country(found[0])
        if region is not None and len(number) - found[1] in lengths:
            return region
    return facts(number).region


# phonenumbers' number_type tries a number's special ranges in this order, before fixed line and
# mobile: the first that matches is its type.
_SPECIAL_RANGES = (("PREMIUM_RATE", "premium_rate"), ("TOLL_FREE", "toll_free"), ("SHARED_COST", "shared_cost"),
                   ("VOIP", "voip"), ("PERSONAL_NUMBER", "personal_number"), ("PAGER", "pager"), ("UAN", "uan"),
                   ("VOICEMAIL", "voicemail"))
_Range = tuple[frozenset[int], re.Pattern[str]]


def _range(desc: Any) -> _Range | None:
    pattern = getattr(desc, "national_number_pattern", None) if desc is not None else None
    return (frozenset(desc.possible_length or ()), re.compile(pattern)) if pattern else None


def _in_range(national: str, found: _Range | None) -> bool:
    """phonenumbers' own test of a national number against one of its country's ranges."""
    if found is None:
        return False
    lengths, pattern = found
    return (not lengths or len(national) in lengths) and pattern.fullmatch(national) is not None


def _alternative(name: str, found: _Range | None) -> str | None:
    """One special range as a named alternative matching what `_in_range` matches: its possible
    lengths as a lookahead, then its pattern."""
    if found is None:
        return None
    lengths, pattern = found
    length = "(?=(?:" + "|".join(f".{{{n}}}" for n in sorted(lengths)) + r")\Z)" if lengths else ""
    return f"(?P<{name}>{length}(?:{pattern.pattern}))"


# (country code, blocked types) -> the screen of `_screen`, built on first use (a few hundred
# country codes and the lanes' few sets of types: bounded, and a dict is cheaper than lru_cache).
_Screen = tuple[_Range | None, re.Pattern[str] | None]
_SCREENS: dict[tuple[int, frozenset[str]], _Screen | None] = {}


def _screen(code: int, region: str, blocked: frozenset[str]) -> _Screen | None:
    """The country's general range, and its special ranges in number_type's order up to the last
    type in `blocked` as one alternation (None: the country has none of them): a regex tries the
    alternatives in order and takes the first that matches the whole number, as number_type takes
    the first range. None when `blocked` names a type that is not a special range (fixed line,
    mobile, unknown: only number_type itself answers those)."""
    key = (code, blocked)
    if key in _SCREENS:
        return _SCREENS[key]
    names = [name for name, _ in _SPECIAL_RANGES]
    meta = PhoneMetadata.metadata_for_region_or_calling_code(code, region)
    found = None
    if blocked and blocked <= set(names) and meta is not None:
        last = max(names.index(name) for name in blocked)
        alternatives = [alt for name, attr in _SPECIAL_RANGES[: last + 1]
                        if (alt := _alternative(name, _range(getattr(meta, attr)))) is not None]
        found = (_range(meta.general_desc), re.compile("|".join(alternatives)) if alternatives else None)
    _SCREENS[key] = found
    return found


def blocked_type(number: str, blocked: frozenset[str]) -> str | None:
    """`facts(number).number_type` when it is one of `blocked` (phonenumbers type names), else None.

    A number in normal form of a country code with one region, and no national prefix or leading
    zero a parse would treat specially, is matched against its country's special ranges directly,
    in number_type's order and only as far as the last blocked type: one regex match (`_screen`)
    where a parse and number_type cost ~23 us and a match per range ~4 us; any other number asks
    `facts`. tests/unit/test_numbers.py holds the two equal on random numbers of every country code."""
    found = _country_code(number) if number.isdigit() and number[:1] != "0" else None
    if found is not None:
        code, digits = found
        region, prefix, _ = _country(code)
        national = number[digits:]
        ranges = _screen(code, region, blocked) if region is not None else None
        if ranges is not None and national[:1] != "0" and (prefix is None or prefix.match(national) is None):
            return _screened(national, ranges, blocked)
    return _blocked_by_facts(number, blocked)


def _screened(national: str, ranges: _Screen, blocked: frozenset[str]) -> str | None:
    """blocked_type of a national number, from its country's `_screen`."""
    general, specials = ranges
    special = specials.fullmatch(national) if specials is not None else None
    if special is None:
        return None  # in no special range: not a blocked type
    # The first special range it falls in is its type, if it is a number at all (else UNKNOWN,
    # never in `blocked` here). The general range, the longest pattern, is matched only now: most
    # numbers fall in no special range.
    name = special.lastgroup
    return name if name in blocked and _in_range(national, general) else None


def _blocked_by_facts(number: str, blocked: frozenset[str]) -> str | None:
    if not blocked:
        return None
    kind = facts(number).number_type
    return kind if kind in blocked else None


def screen(raw: str, blocked: frozenset[str]) -> tuple[str, str | None, str | None]:
    """(normal_or_raw(raw), region_of it, blocked_type of it: None when `blocked` is empty), for a
    job's `to`: the traffic policy's three questions with the country code looked up once (they
    are asked of every message a guarded lane sends). tests/unit/test_numbers.py holds it equal to
    the three functions on numbers of every region and type."""
    if raw.isdigit() and raw[:1] != "0":
        found = _country_code(raw)
        if found is None:
            return raw, facts(raw).region, _blocked_by_facts(raw, blocked)
        code, digits = found
        single, prefix, lengths = _country(code)
        if prefix is None or prefix.match(raw, digits) is None:  # `raw` is its own normal form
            national = raw[digits:]
            region = single if single is not None and len(national) in lengths else facts(raw).region
            if not blocked:
                return raw, region, None
            ranges = _screen(code, single, blocked) if single is not None else None
            if ranges is not None and national[:1] != "0":
                return raw, region, _screened(national, ranges, blocked)
            return raw, region, _blocked_by_facts(raw, blocked)
    number = normal_or_raw(raw)
    return number, region_of(number), blocked_type(number, blocked) if blocked else None
