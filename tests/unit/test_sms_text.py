"""worker.sms_text: GSM-7 or UCS-2, units and parts as the platform bills them (160/153 septets, an
extension character two of them; 70/67 UTF-16 units, a pair two), with neither an escape nor a
surrogate pair ever split between parts; the tables are 3GPP TS 23.038's and exist only there; the
worker's validation and the sandbox count with it. And `sms-worker preview`."""

from __future__ import annotations

import subprocess
import sys
import unicodedata
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tests.unit.test_cli_errors import base_env, one_line, run
from worker import models, sms_text
from worker.cli import main
from worker.devtools.sandbox import segments as sandbox_segments
from worker.settings import ENV_FILE_VARIABLE, Settings

ROOT = Path(__file__).resolve().parents[2]
EMOJI = "\U0001f600"  # outside the BMP: a surrogate pair in UTF-16

# 3GPP TS 23.038 §6.2.1, the default alphabet by code 0x00..0x7F (0x1B: the escape), as Unicode names:
# written out here apart from the module's table, so a slip in either shows.
DEFAULT_ALPHABET_NAMES = [
    "COMMERCIAL AT", "POUND SIGN", "DOLLAR SIGN", "YEN SIGN", "LATIN SMALL LETTER E WITH GRAVE",
    "LATIN SMALL LETTER E WITH ACUTE", "LATIN SMALL LETTER U WITH GRAVE", "LATIN SMALL LETTER I WITH GRAVE",
    "LATIN SMALL LETTER O WITH GRAVE", "LATIN CAPITAL LETTER C WITH CEDILLA", "LINE FEED",
    "LATIN CAPITAL LETTER O WITH STROKE", "LATIN SMALL LETTER O WITH STROKE", "CARRIAGE RETURN",
    "LATIN CAPITAL LETTER A WITH RING ABOVE", "LATIN SMALL LETTER A WITH RING ABOVE",
    "GREEK CAPITAL LETTER DELTA", "LOW LINE", "GREEK CAPITAL LETTER PHI", "GREEK CAPITAL LETTER GAMMA",
    "GREEK CAPITAL LETTER LAMDA", "GREEK CAPITAL LETTER OMEGA", "GREEK CAPITAL LETTER PI", "GREEK CAPITAL LETTER PSI",
    "GREEK CAPITAL LETTER SIGMA", "GREEK CAPITAL LETTER THETA", "GREEK CAPITAL LETTER XI", None,
    "LATIN CAPITAL LETTER AE", "LATIN SMALL LETTER AE", "LATIN SMALL LETTER SHARP S",
    "LATIN CAPITAL LETTER E WITH ACUTE",
    "SPACE", "EXCLAMATION MARK", "QUOTATION MARK", "NUMBER SIGN", "CURRENCY SIGN", "PERCENT SIGN", "AMPERSAND",
    "APOSTROPHE", "LEFT PARENTHESIS", "RIGHT PARENTHESIS", "ASTERISK", "PLUS SIGN", "COMMA", "HYPHEN-MINUS",
    "FULL STOP", "SOLIDUS",
    *(f"DIGIT {name}" for name in ("ZERO", "ONE", "TWO", "THREE", "FOUR", "FIVE", "SIX", "SEVEN", "EIGHT", "NINE")),
    "COLON", "SEMICOLON", "LESS-THAN SIGN", "EQUALS SIGN", "GREATER-THAN SIGN", "QUESTION MARK",
    "INVERTED EXCLAMATION MARK", *(f"LATIN CAPITAL LETTER {letter}" for letter in "ABCDEFGHIJKLMNOPQRSTUVWXYZ"),
    "LATIN CAPITAL LETTER A WITH DIAERESIS", "LATIN CAPITAL LETTER O WITH DIAERESIS",
    "LATIN CAPITAL LETTER N WITH TILDE", "LATIN CAPITAL LETTER U WITH DIAERESIS", "SECTION SIGN",
    "INVERTED QUESTION MARK", *(f"LATIN SMALL LETTER {letter}" for letter in "ABCDEFGHIJKLMNOPQRSTUVWXYZ"),
    "LATIN SMALL LETTER A WITH DIAERESIS", "LATIN SMALL LETTER O WITH DIAERESIS", "LATIN SMALL LETTER N WITH TILDE",
    "LATIN SMALL LETTER U WITH DIAERESIS", "LATIN SMALL LETTER A WITH GRAVE",
]
# §6.2.1.1, the extension table: the code after the escape, as Unicode names.
EXTENSION_NAMES = {
    0x0A: "FORM FEED", 0x14: "CIRCUMFLEX ACCENT", 0x28: "LEFT CURLY BRACKET", 0x29: "RIGHT CURLY BRACKET",
    0x2F: "REVERSE SOLIDUS", 0x3C: "LEFT SQUARE BRACKET", 0x3D: "TILDE", 0x3E: "RIGHT SQUARE BRACKET",
    0x40: "VERTICAL LINE", 0x65: "EURO SIGN",
}
BASIC = frozenset(unicodedata.lookup(name) for name in DEFAULT_ALPHABET_NAMES if name is not None)
EXTENSION = frozenset(unicodedata.lookup(name) for name in EXTENSION_NAMES.values())


def test_the_tables_are_those_of_3gpp_ts_23_038() -> None:
    assert len(DEFAULT_ALPHABET_NAMES) == 128
    for code, name in enumerate(DEFAULT_ALPHABET_NAMES):
        expected = "\x1b" if name is None else unicodedata.lookup(name)
        assert sms_text.GSM7_DEFAULT_ALPHABET[code] == expected, hex(code)
    assert {code: unicodedata.lookup(name) for code, name in EXTENSION_NAMES.items()} == sms_text.GSM7_EXTENSION_TABLE
    assert sms_text.GSM7_BASIC == BASIC and len(BASIC) == 127  # the escape is no character
    assert sms_text.GSM7_EXTENSION == EXTENSION and not BASIC & EXTENSION


def test_the_tables_are_written_once() -> None:
    """No other module of the worker keeps its own copy of the alphabet (the sandbox and models.py
    each had one): they count with worker.sms_text."""
    holders = [path.relative_to(ROOT).as_posix() for path in (ROOT / "worker").rglob("*.py")
               if "ΦΓΛΩΠΨΣΘΞ" in path.read_text(encoding="utf-8")]
    assert holders == ["worker/sms_text.py"]
    assert models.sms_parts is sms_text.sms_parts


# (text, encoding, characters, units, parts, per_part)
CASES = [
    pytest.param("", "GSM-7", 0, 0, 1, 160, id="empty: one part, as the platform bills it"),
    pytest.param("a" * 160, "GSM-7", 160, 160, 1, 160, id="gsm-160"),
    pytest.param("a" * 161, "GSM-7", 161, 161, 2, 153, id="gsm-161"),
    pytest.param("a" * 306, "GSM-7", 306, 306, 2, 153, id="gsm-306"),
    pytest.param("a" * 307, "GSM-7", 307, 307, 3, 153, id="gsm-307"),
    pytest.param("€" * 80, "GSM-7", 80, 160, 1, 160, id="euro-80: two septets each"),
    pytest.param("€" * 81, "GSM-7", 81, 162, 2, 153, id="euro-81"),
    pytest.param("é" * 160, "GSM-7", 160, 160, 1, 160, id="é is in the default alphabet"),
    pytest.param("ΔΦΓΛΩΠΨΣΘΞ", "GSM-7", 10, 10, 1, 160, id="greek capitals are GSM-7"),
    pytest.param("Grüße {x} ~ [y]", "GSM-7", 15, 20, 1, 160, id="non-ASCII with extension characters"),
    pytest.param("ç", "UCS-2", 1, 1, 1, 70, id="only the capital Ç is GSM-7"),
    pytest.param("`" + "a" * 69, "UCS-2", 70, 70, 1, 70, id="a backtick is not GSM-7"),
    pytest.param("\t" + "a" * 70, "UCS-2", 71, 71, 2, 67, id="nor is a tab"),
    pytest.param("\x1b", "UCS-2", 1, 1, 1, 70, id="nor the escape itself"),
    pytest.param("ж" * 134, "UCS-2", 134, 134, 2, 67, id="ucs2-134"),
    pytest.param("ж" * 135, "UCS-2", 135, 135, 3, 67, id="ucs2-135"),
    pytest.param(EMOJI * 35, "UCS-2", 35, 70, 1, 70, id="pairs-35"),
    pytest.param(EMOJI * 36, "UCS-2", 36, 72, 2, 67, id="pairs-36"),
    pytest.param("👍🏽", "UCS-2", 2, 4, 1, 70, id="a skin-toned emoji is two code points"),
    pytest.param("a" * 159 + "中", "UCS-2", 160, 160, 3, 67, id="one character makes it all UCS-2"),
]


@pytest.mark.parametrize(("text", "encoding", "characters", "units", "parts", "per_part"), CASES)
def test_encoding_units_and_parts(text: str, encoding: str, characters: int, units: int, parts: int,
                                  per_part: int) -> None:
    info = sms_text.analyse(text)
    assert (info.encoding, info.characters, info.units, info.parts, info.per_part) == (
        encoding, characters, units, parts, per_part)
    assert sms_text.sms_parts(text) == parts == len(info.segments())
    assert info.unit_name == ("septets" if encoding == "GSM-7" else "UTF-16 code units")


def test_an_escape_and_its_character_stay_in_one_part() -> None:
    """152 septets, then €: its escape would be the 153rd septet and the € the next part's first, so
    the whole pair starts the next part and the 153rd septet stays unused."""
    text = "a" * 152 + "€" + "b" * 10
    assert sms_text.segments(text) == ("a" * 152, "€" + "b" * 10)
    assert sms_text.segments("a" * 151 + "€" + "b" * 10) == ("a" * 151 + "€", "b" * 10)  # fits exactly
    # 25 parts hold 1,900 euro signs (76 a part), not 1,912 (3,824 septets of 25 x 153).
    assert [sms_text.sms_parts("€" * n) for n in (1900, 1901, 1912)] == [25, 26, 26]


def test_a_surrogate_pair_stays_in_one_part() -> None:
    text = "中" * 66 + EMOJI + "中" * 10
    assert sms_text.segments(text) == ("中" * 66, EMOJI + "中" * 10)
    assert sms_text.analyse(EMOJI * 826).parts == 26  # 1652 units: 25 parts only if a pair could be split
    assert sms_text.analyse(EMOJI * 825 + "中").parts == 25


def test_what_forced_ucs2_each_once_in_order() -> None:
    text = "It\u2019s 5 € — it\u2019s \u201cfine\u201d"
    assert sms_text.analyse(text).ucs2_because == ("\u2019", "—", "\u201c", "\u201d")
    assert sms_text.analyse("tab\there `and` tab\t").ucs2_because == ("\t", "`")  # the ASCII path
    assert sms_text.analyse(f"Grüße {EMOJI} ç").ucs2_because == (EMOJI, "ç")
    assert sms_text.analyse("Grüße [€]").ucs2_because == ()


# --- properties ------------------------------------------------------------------------------
def reference_parts(text: str) -> int:
    """The parts of `text` worked out unit by unit from this file's own tables: each character as
    the units it is sent as, cut every 153 (67) units, a cut between an escape and its character
    (or a pair's halves) moved one unit back."""
    gsm7 = BASIC.union(EXTENSION).issuperset(text)
    units: list[str] = []
    for char in text:
        if gsm7:
            units += ["ESC", char] if char in EXTENSION else [char]
        else:
            units += ["HIGH", "low"] if ord(char) > 0xFFFF else [char]
    single, per_part = (160, 153) if gsm7 else (70, 67)
    if len(units) <= single:
        return 1
    parts = start = 0
    while start < len(units):
        end = min(start + per_part, len(units))
        if end < len(units) and units[end - 1] in ("ESC", "HIGH"):
            end -= 1
        parts, start = parts + 1, end
    return parts


def units_of(text: str, gsm7: bool) -> int:
    if gsm7:
        return sum(2 if char in EXTENSION else 1 for char in text)
    return sum(2 if ord(char) > 0xFFFF else 1 for char in text)


# Every kind of character: basic (ASCII and not), extension (ASCII and not), other BMP, astral.
MIXED = st.sampled_from(["a", " ", "é", "Δ", "\n", "€", "[", "~", "\f", "\u2019", "中", "ç", "`", EMOJI, "𝄞"])
MOSTLY_GSM = st.sampled_from(["a", "b", "é", "€", "{", "|"])
TEXTS = (st.text(MIXED, max_size=1200) | st.text(MOSTLY_GSM, min_size=140, max_size=800)
         | st.text(st.sampled_from(["中", EMOJI, "ж"]), min_size=60, max_size=600)
         | st.text(st.characters(max_codepoint=127), max_size=700) | st.text(max_size=400))


@settings(max_examples=600, deadline=None)
@given(TEXTS)
@example("a" * 152 + "€" * 5).via("an escape at the first boundary")
@example("中" * 66 + EMOJI * 40).via("a pair at the first boundary")
def test_parts_and_segments_agree_and_keep_every_rule(text: str) -> None:
    info = sms_text.analyse(text)
    gsm7 = info.encoding == "GSM-7"
    assert gsm7 == BASIC.union(EXTENSION).issuperset(text)
    assert info.units == units_of(text, gsm7)
    assert info.characters == len(text)
    pieces = info.segments()
    assert info.parts == len(pieces) == sms_text.sms_parts(text) == reference_parts(text)
    assert "".join(pieces) == text
    assert info.per_part == ((160 if gsm7 else 70) if info.parts == 1 else (153 if gsm7 else 67))
    sizes = [units_of(piece, gsm7) for piece in pieces]
    assert [sms_text.units_in(piece, info.encoding) for piece in pieces] == sizes
    # Counting a pair's two units inside one part: none is split, and no part is over its limit.
    assert all(size <= info.per_part for size in sizes)
    # Each part but the last is full: its next character (with both of its units) would not fit.
    for piece, size, following in zip(pieces, sizes, pieces[1:], strict=False):
        assert piece and size + units_of(following[0], gsm7) > info.per_part
    # Every part encodes on its own (a lone surrogate would not).
    assert all(piece.encode("utf-16-le") for piece in pieces if piece)
    assert models.text_size(text) == (info.parts, info.encoding, info.units)
    assert sandbox_segments.text_parts(text) == info.parts


# --- sms-worker preview -------------------------------------------------------------------------
@pytest.fixture
def cli_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No setting from this machine's environment or a .env: main() sees only what a test sets."""
    for name in Settings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)
    monkeypatch.delenv(ENV_FILE_VARIABLE, raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def preview(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(["preview", *args])
    return code, capsys.readouterr().out


def test_preview_names_what_forced_ucs2(cli_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = preview(capsys, "--text", "It\u2019s 5 € " + "x" * 60 + EMOJI)
    assert code == 0
    assert "encoding:    UCS-2\n" in out and "characters:  70\n" in out and "units:       71 UTF-16 code units\n" in out
    assert "parts:       2 (67 + 4 UTF-16 code units)\n" in out
    assert "\u2019    U+2019   RIGHT SINGLE QUOTATION MARK  (GSM-7 has ')" in out
    assert f"{EMOJI}    U+1F600  GRINNING FACE\n" in out
    assert ("hint: replace them with GSM-7 characters and the text stays GSM-7: about 71 septets in 1 part, "
            "instead of 71 UTF-16 code units in 2 parts\n") in out


def test_preview_of_gsm7_text(cli_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = preview(capsys, "--text", "a" * 152 + "€" + "b" * 10)
    assert code == 0
    assert out == ("encoding:    GSM-7\ncharacters:  163\nunits:       164 septets\n"
                   "parts:       2 (152 + 12 septets)\nper part:    153 septets\n")


def test_preview_json(cli_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = preview(capsys, "--text", "tab\tand \u2019quotes\u2019", "--json")
    report = orjson.loads(out)
    assert code == 0
    assert {k: report[k] for k in ("encoding", "characters", "units", "unit", "parts", "per_part", "part_units")} == {
        "encoding": "UCS-2", "characters": 16, "units": 16, "unit": "UTF-16 code units", "parts": 1, "per_part": 70,
        "part_units": [16]}
    assert report["ucs2_because"] == [
        {"character": "\t", "code_point": "U+0009", "name": "CHARACTER TABULATION", "gsm7_lookalike": " "},
        {"character": "\u2019", "code_point": "U+2019", "name": "RIGHT SINGLE QUOTATION MARK", "gsm7_lookalike": "'"},
    ]
    assert report["as_gsm7"] == {"units": 16, "parts": 1, "exact": True}
    assert "lane" not in report


def test_preview_reads_a_file_without_its_final_newline(cli_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = cli_env / "message.txt"
    path.write_bytes("\ufeff".encode() + ("a" * 160 + "\n").encode())  # a BOM, 160 septets, a newline
    code, out = preview(capsys, "--file", str(path), "--json")
    assert code == 0 and orjson.loads(out)["units"] == 160 and orjson.loads(out)["parts"] == 1
    path.write_text("a" * 160 + "\n\n", encoding="utf-8")  # only one newline is the file's
    assert orjson.loads(preview(capsys, "--file", str(path), "--json")[1])["parts"] == 2


LANES = orjson.dumps({"otp": {}, "bulk": {"allow_ucs2": False, "max_parts": 2}}).decode()


@pytest.mark.parametrize(("text", "reasons"), [
    pytest.param("plain GSM-7", [], id="accepted"),
    pytest.param("it\u2019s UCS-2", ["ucs2_refused"], id="ucs2"),
    pytest.param("a" * 307, ["too_many_parts"], id="three-parts"),
    pytest.param("a" * 500, ["invalid", "too_many_parts"], id="over-SMS_MAX_TEXT_PARTS-too"),
    pytest.param(" ", ["invalid"], id="blank"),
])
def test_preview_says_whether_a_lane_would_refuse_it(cli_env: Path, capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch, text: str,
                                                     reasons: list[str]) -> None:
    monkeypatch.setenv("SMS_LANES", LANES)
    monkeypatch.setenv("SMS_MAX_TEXT_PARTS", "3")
    code, out = preview(capsys, "--text", text, "--lane", "bulk", "--json")
    lane = orjson.loads(out)["lane"]
    assert [item["reason"] for item in lane["reasons"]] == reasons
    assert (code, lane["refused"]) == ((1, True) if reasons else (0, False))
    code, out = preview(capsys, "--text", text, "--lane", "otp")  # the default lane options allow it all
    assert (code == 1) == ("invalid" in reasons)
    assert out.splitlines()[-1].startswith("lane otp: refused: refused at enqueue" if code else "lane otp: accepted")


def test_preview_agrees_with_the_traffic_policy(cli_env: Path, capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The reason and rule preview gives are those the dispatcher's policy rejects the job with."""
    policy = pytest.importorskip("worker.policy")
    from worker.settings import load_settings

    monkeypatch.setenv("SMS_LANES", LANES)
    lane = load_settings().sms_lanes["bulk"]
    for text in ("plain", "it\u2019s UCS-2", "a" * 307, "ж" * 500):
        rejection: Any = policy.examine(policy.LanePolicy.of("bulk", lane), {"to": "41793026727", "text": text})
        expected = [] if rejection.rejection is None else [(str(rejection.rejection.reason),
                                                            rejection.rejection.rule)]
        lane_report = orjson.loads(preview(capsys, "--text", text, "--lane", "bulk", "--json")[1])["lane"]
        assert [(item["reason"], item["rule"]) for item in lane_report["reasons"]] == expected, text


def test_preview_mistakes_are_one_line(cli_env: Path) -> None:
    env = base_env(SMS_LANES=LANES)
    assert "SMS_LANES (otp, bulk)" in one_line(run("preview", "--text", "x", "--lane", "nope", env=env, cwd=cli_env), 2)
    assert "required" in one_line(run("preview", env=env, cwd=cli_env), 2)
    assert "not allowed with" in one_line(run("preview", "--text", "x", "--file", "-", env=env, cwd=cli_env), 2)
    (cli_env / "latin1.txt").write_bytes("café".encode("latin-1"))
    assert "not UTF-8" in one_line(run("preview", "--file", "latin1.txt", env=env, cwd=cli_env), 1)
    assert "No such file" in one_line(run("preview", "--file", "missing.txt", env=env, cwd=cli_env), 1)


def test_preview_reads_stdin_and_needs_no_settings(tmp_path: Path) -> None:
    """`--file -` reads stdin; without --lane no setting is needed (not even the API key)."""
    done = subprocess.run([sys.executable, "-m", "worker.cli", "preview", "--file", "-", "--json"],
                          input="Grüße \u2019x\u2019\n".encode(), env=base_env(), cwd=tmp_path, capture_output=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    report = orjson.loads(done.stdout)
    assert (report["encoding"], report["characters"], report["ucs2_because"][0]["code_point"]) == ("UCS-2", 9, "U+2019")
