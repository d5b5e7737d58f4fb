"""How the platform encodes an SMS text and splits it into parts: the one place that says so, for the
worker's validation and dispatch, the sandbox and `sms-worker preview`.

GSM-7 when every character is in the GSM 7-bit default alphabet or its extension table (3GPP TS
23.038 §6.2.1 and §6.2.1.1); an extension character is sent as the escape (0x1B) and its code, so it
costs two septets. One part holds 160 septets; a longer text is concatenated, each part giving up
7 septets to the concatenation header, so 153 septets a part. Otherwise the text is UCS-2, counted
in UTF-16 code units (a character outside the BMP is a surrogate pair, two units): 70 units in one
part, 67 a part when concatenated.

A part never ends between an escape and its character, nor between the two halves of a surrogate
pair: the handset decodes each part on its own, so a split one would show two wrong characters. The
pair moves to the next part whole and the unit left over is unused: 25 parts hold 1,900 euro signs
(25 x 76 pairs, 152 septets a part), not the 1,912 that 25 x 153 septets would suggest.

An empty text is one part: the platform bills every message at least one SMS (the sandbox answers
`messageCount: 1`), though the worker's job validation refuses an empty text before it gets there.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Final, Literal

Encoding = Literal["GSM-7", "UCS-2"]
GSM7: Final = "GSM-7"
UCS2: Final = "UCS-2"

GSM7_SINGLE: Final = 160  # septets in a text sent as one part
GSM7_PER_PART: Final = 153  # septets in each part of a concatenated text
UCS2_SINGLE: Final = 70  # UTF-16 code units in one part
UCS2_PER_PART: Final = 67

# The default alphabet, 3GPP TS 23.038 §6.2.1, by code: row n holds codes 0x10*n to 0x10*n+15.
# 0x1B is the escape to the extension table, no character: "\x1b" holds its place and is left out of
# the set below (a text holding U+001B itself is UCS-2). 0x09 is the capital Ç, as the standard's
# table has it; Unicode's GSM0338.TXT maps 0x09 to the small ç instead (its intent, it argues), and
# gateways differ. Counting ç as UCS-2 is the safe side: should the platform send it as GSM-7, the
# text is billed fewer parts than counted here, never more, so the caps and the limiter never undercount.
GSM7_DEFAULT_ALPHABET: Final = (
    "@£$¥èéùìòÇ\nØø\rÅå"
    "Δ_ΦΓΛΩΠΨΣΘΞ\x1bÆæßÉ"
    " !\"#¤%&'()*+,-./"
    "0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNO"
    "PQRSTUVWXYZÄÖÑÜ§"
    "¿abcdefghijklmno"
    "pqrstuvwxyzäöñüà"
)
# The extension table, §6.2.1.1: the code after the escape, and its character. The table's other
# codes are control codes (0x0D, 0x1B) or unused; a receiver shows an unused one as its default
# alphabet character, so nothing else is sent through the escape.
GSM7_EXTENSION_TABLE: Final = {
    0x0A: "\f", 0x14: "^", 0x28: "{", 0x29: "}", 0x2F: "\\", 0x3C: "[", 0x3D: "~", 0x3E: "]", 0x40: "|", 0x65: "€",
}

GSM7_BASIC: Final = frozenset(GSM7_DEFAULT_ALPHABET) - {"\x1b"}
GSM7_EXTENSION: Final = frozenset(GSM7_EXTENSION_TABLE.values())
GSM7_CHARACTERS: Final = GSM7_BASIC | GSM7_EXTENSION

# ASCII texts (most of them) are checked with bytes.translate, ~10x cheaper than a set or a regex:
# deleting every basic character leaves the extension characters and the ASCII that is no GSM-7.
_ASCII_BASIC: Final = bytes(sorted(ord(ch) for ch in GSM7_BASIC if ch.isascii()))
_ASCII_EXTENSION: Final = bytes(sorted(ord(ch) for ch in GSM7_EXTENSION if ch.isascii()))
_ASCII_GSM7: Final = _ASCII_BASIC + _ASCII_EXTENSION
_EXTENSION_CHARS: Final = "".join(sorted(GSM7_EXTENSION))
_EXTENSION_RE: Final = re.compile("[" + re.escape(_EXTENSION_CHARS) + "]")
_NOT_GSM7_RE: Final = re.compile("[^" + re.escape("".join(sorted(GSM7_CHARACTERS))) + "]")


@dataclass(frozen=True, slots=True)
class TextInfo:
    """A text as the platform sends and bills it.

    `characters` counts code points (a surrogate pair is one character; an emoji built of several
    code points, e.g. with a skin tone, counts each). `units` are septets in GSM-7 (an extension
    character two), UTF-16 code units in UCS-2. `per_part` is the limit of this text's parts: 160 or
    70 when it fits one part, else 153 or 67.
    """

    encoding: Encoding
    characters: int
    units: int
    parts: int
    per_part: int
    text: str = field(repr=False)

    @property
    def unit_name(self) -> str:
        return "septets" if self.encoding == GSM7 else "UTF-16 code units"

    @property
    def ucs2_because(self) -> tuple[str, ...]:
        """The characters in neither GSM-7 table, each once, in order of first appearance: what made
        the text UCS-2 (empty for GSM-7). Worked out when asked: the dispatcher never asks."""
        if self.encoding == GSM7:
            return ()
        if self.text.isascii():
            return tuple(dict.fromkeys(self.text.encode("ascii").translate(None, _ASCII_GSM7).decode("ascii")))
        return tuple(dict.fromkeys(_NOT_GSM7_RE.findall(self.text)))

    def segments(self) -> tuple[str, ...]:
        """The text split into its parts (see `segments`)."""
        return segments(self.text)


def analyse(text: str) -> TextInfo:
    """Encoding, size and parts of `text` (see the module's docstring)."""
    gsm7, units, pairs = _measure(text)
    parts, per_part = _parts(text, gsm7, units, pairs)
    return TextInfo(GSM7 if gsm7 else UCS2, len(text), units, parts, per_part, text)


def sms_parts(text: str) -> int:
    """How many parts the platform bills for `text`: `analyse(text).parts` without building a
    TextInfo (~0.5 us of the ~1 us analyse costs), for the job validation and the dispatcher."""
    gsm7, units, pairs = _measure(text)
    return _parts(text, gsm7, units, pairs)[0]


def encoding_and_parts(text: str) -> tuple[Encoding, int]:
    """`analyse(text)`'s encoding and parts without building a TextInfo, for the traffic policy's
    per-job check."""
    gsm7, units, pairs = _measure(text)
    return GSM7 if gsm7 else UCS2, _parts(text, gsm7, units, pairs)[0]


def _measure(text: str) -> tuple[bool, int, bool]:
    """(GSM-7?, size in septets or UTF-16 code units, whether it holds two-unit characters: extension
    characters in GSM-7, surrogate pairs in UCS-2)."""
    if text.isascii():
        rest = text.encode("ascii").translate(None, _ASCII_BASIC)
        if not rest:
            return True, len(text), False
        if not rest.translate(None, _ASCII_EXTENSION):
            return True, len(text) + len(rest), True
        return False, len(text), False
    if _NOT_GSM7_RE.search(text) is None:
        if _EXTENSION_RE.search(text) is None:
            return True, len(text), False
        escapes = len(_EXTENSION_RE.findall(text))
        return True, len(text) + escapes, True
    # Two bytes a UTF-16 code unit. (surrogatepass: a lone surrogate, which the job validation
    # refuses, is one unit here rather than an exception.)
    units = len(text.encode("utf-16-le", "surrogatepass")) >> 1
    return False, units, units != len(text)


def _parts(text: str, gsm7: bool, units: int, pairs: bool) -> tuple[int, int]:
    """(parts, units per part) of a text `_measure` measured."""
    single, per_part = (GSM7_SINGLE, GSM7_PER_PART) if gsm7 else (UCS2_SINGLE, UCS2_PER_PART)
    if units <= single:
        return 1, single
    parts = -(-units // per_part)
    # A boundary inside a pair moves one unit to the next part: with one unit lost at each of the
    # parts - 1 boundaries the text still fits `parts` parts, so only then are the boundaries looked at.
    if not pairs or units + parts - 1 <= parts * per_part:
        return parts, per_part
    if gsm7:
        # The text as septets go, each extension character after its escape: a part boundary
        # falls inside a pair when the septet before it is an escape.
        septets = text
        for char in _EXTENSION_CHARS:
            septets = septets.replace(char, "\x1b" + char)

        def pair_starts(unit: int) -> bool:
            return septets[unit] == "\x1b"
    else:
        # UTF-16-LE: the high byte of a pair's first unit is 0xD8 to 0xDB.
        encoded = text.encode("utf-16-le", "surrogatepass")

        def pair_starts(unit: int) -> bool:
            return 0xD8 <= encoded[2 * unit + 1] <= 0xDB
    parts, start = 1, 0
    while units - start > per_part:
        end = start + per_part
        if pair_starts(end - 1):  # the pair would straddle the boundary: it starts the next part
            end -= 1
        start = end
        parts += 1
    return parts, per_part


def units_in(text: str, encoding: Encoding) -> int:
    """The size of `text` in `encoding` (a part of a UCS-2 text is UCS-2 even when its own characters
    are all GSM-7): septets, or UTF-16 code units."""
    if encoding == GSM7:
        return len(text) + len(_EXTENSION_RE.findall(text))
    return len(text.encode("utf-16-le", "surrogatepass")) >> 1


def segments(text: str) -> tuple[str, ...]:
    """`text` split into the parts the platform sends (joined, they are the text again). A plain
    walk over the characters, apart from `analyse`'s arithmetic: the tests check they agree."""
    info = analyse(text)
    if info.parts == 1:
        return (text,)
    gsm7 = info.encoding == GSM7
    pieces: list[str] = []
    start, room = 0, info.per_part
    for index, char in enumerate(text):
        need = 2 if (char in GSM7_EXTENSION if gsm7 else char > "\uffff") else 1
        if need > room:
            pieces.append(text[start:index])
            start, room = index, info.per_part
        room -= need
    pieces.append(text[start:])
    return tuple(pieces)
