"""SMS part counting: GSM-7 (160/153 septets) or UCS-2 (70/67 units), binary 140/134 bytes."""

from __future__ import annotations

import re
from typing import Final

# GSM 03.38 default alphabet (without ESC) and its extension table (each costs two septets).
_GSM_BASIC: Final = (
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
_GSM_EXTENSION: Final = "^{}\\[~]|€\f"
_NOT_GSM: Final = re.compile("[^" + re.escape(_GSM_BASIC + _GSM_EXTENSION) + "]")
_EXTENSION: Final = re.compile("[" + re.escape(_GSM_EXTENSION) + "]")
_ASCII_BASIC: Final = bytes(ch for ch in _GSM_BASIC.encode("latin-1", "ignore") if ch < 128)
_ASCII_EXTENSION: Final = bytes(ch for ch in _GSM_EXTENSION.encode("latin-1", "ignore") if ch < 128)
_HEX: Final = re.compile(r"[0-9A-Fa-f ]*")

MAX_PARTS: Final = 25
MAX_TEXT_BYTES: Final = 4000


def _parts(units: int, single: int, multi: int) -> int:
    if units <= single:
        return 1
    return -(-units // multi)


def text_parts(text: str) -> int:
    """How many SMS parts the text needs (GSM-7 when every character fits, UCS-2 otherwise)."""
    if text.isascii():
        # Fast path for the common case (~10x cheaper than the regex): delete every basic-table
        # byte; what is left is either extension characters (two septets each) or non-GSM ASCII.
        rest = text.encode("ascii").translate(None, _ASCII_BASIC)
        if not rest:
            return _parts(len(text), 160, 153)
        if not rest.translate(None, _ASCII_EXTENSION):
            return _parts(len(text) + len(rest), 160, 153)
        return _parts(len(text), 70, 67)
    if _NOT_GSM.search(text) is None:
        septets = len(text)
        if _EXTENSION.search(text) is not None:
            septets += len(_EXTENSION.findall(text))
        return _parts(septets, 160, 153)
    # UCS-2 counts UTF-16 code units: characters outside the BMP take two.
    units = len(text) if max(text) <= "\uffff" else len(text.encode("utf-16-le")) // 2
    return _parts(units, 70, 67)


def _encoded_bytes(text: str) -> int:
    """The text's size in its SMS encoding: a septet per GSM-7 character (two for an extension
    character), two bytes per UTF-16 code unit in UCS-2."""
    if _NOT_GSM.search(text) is None:
        return len(text) + len(_EXTENSION.findall(text))
    return len(text.encode("utf-16-le", "surrogatepass"))


def text_too_long(text: str, parts: int) -> bool:
    """True when the platform would reject the text with REJECTED_MESSAGE_TOO_LONG: more than 25
    parts, or more than 4000 bytes in its SMS encoding (not UTF-8: a 25-part text of euro signs is
    5,736 bytes of UTF-8 but 3,825 septets, and the platform sends it)."""
    # Up to 2 bytes a character, so texts of up to half the cap are not measured.
    return parts > MAX_PARTS or (len(text) * 2 > MAX_TEXT_BYTES and _encoded_bytes(text) > MAX_TEXT_BYTES)


def is_hex(data: str) -> bool:
    """True when the string is hex digit pairs, optionally separated by spaces."""
    return _HEX.fullmatch(data) is not None and len(data.replace(" ", "")) % 2 == 0


def binary_parts(hex_data: str) -> int:
    """How many SMS parts a binary payload needs (140 bytes single, 134 with a concatenation UDH)."""
    return _parts(len(hex_data.replace(" ", "")) // 2, 140, 134)
