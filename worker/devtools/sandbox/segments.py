"""SMS part counting: text as worker.sms_text counts it (GSM-7 160/153 septets or UCS-2 70/67 units),
binary 140/134 bytes; and the platform's too-long rule."""

from __future__ import annotations

import re
from typing import Final

from worker.sms_text import analyse, sms_parts

_HEX: Final = re.compile(r"[0-9A-Fa-f ]*")

MAX_PARTS: Final = 25
MAX_TEXT_BYTES: Final = 4000


def _parts(units: int, single: int, multi: int) -> int:
    if units <= single:
        return 1
    return -(-units // multi)


def text_parts(text: str) -> int:
    """How many SMS parts the text needs: the worker's own count (worker.sms_text), so the sandbox
    bills what the worker predicts, and a test of one is a test of the other."""
    return sms_parts(text)


def _encoded_bytes(text: str) -> int:
    """The text's size in its SMS encoding: a septet per GSM-7 character (two for an extension
    character), two bytes per UTF-16 code unit in UCS-2."""
    info = analyse(text)
    return info.units if info.encoding == "GSM-7" else 2 * info.units


def text_too_long(text: str, parts: int) -> bool:
    """True when the platform would reject the text with REJECTED_MESSAGE_TOO_LONG: more than 25
    parts, or more than 4000 bytes in its SMS encoding (not UTF-8: 25 parts of euro signs, 1,900 of
    them, are 5,700 bytes of UTF-8 but 3,800 septets, and the platform sends them)."""
    # Up to 2 bytes a character, so texts of up to half the cap are not measured.
    return parts > MAX_PARTS or (len(text) * 2 > MAX_TEXT_BYTES and _encoded_bytes(text) > MAX_TEXT_BYTES)


def is_hex(data: str) -> bool:
    """True when the string is hex digit pairs, optionally separated by spaces."""
    return _HEX.fullmatch(data) is not None and len(data.replace(" ", "")) % 2 == 0


def binary_parts(hex_data: str) -> int:
    """How many SMS parts a binary payload needs (140 bytes single, 134 with a concatenation UDH)."""
    return _parts(len(hex_data.replace(" ", "")) // 2, 140, 134)
