"""`sms-worker preview`: how a text would go out (encoding, size, parts, what forced UCS-2) before
anyone pays for it, and with --lane whether that lane would refuse it. Reads no Redis; the settings
only with --lane."""

from __future__ import annotations

import argparse
import sys
import unicodedata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from worker import sms_text
from worker.cli import common
from worker.cli.errors import UsageError

if TYPE_CHECKING:
    from worker.settings import LaneConfig, Settings

EPILOG = """examples:
  sms-worker preview --text 'Your code is 123456'
  sms-worker preview --file message.txt --lane bulk
  printf '%s' "$TEXT" | sms-worker preview --file - --json

Prints the encoding: GSM-7 when every character is in the GSM 7-bit default alphabet or its
extension table (3GPP TS 23.038), else UCS-2. Then the characters (code points), the units
(septets, where an extension character such as € [ ] { } ~ ^ | \\ counts two; or UTF-16 code
units, where an emoji counts two), the parts and the limit of each: 160 septets or 70 units in one
part, 153 or 67 a part once the text needs several (an escape and its character, or the two
halves of an emoji, never go to different parts). For UCS-2 it lists the characters that forced
it, with their code points, and what replacing them would give.

A file (or stdin, `--file -`) is read as UTF-8; its one final newline and a leading byte-order
mark are not part of the text.

--lane L also says whether lane L would refuse the text: UCS-2 on a lane with "allow_ucs2": false
(reason ucs2_refused), more parts than the lane's "max_parts" (too_many_parts); and a text the
job validation refuses at enqueue, before any lane (empty, or more parts than SMS_MAX_TEXT_PARTS).
Exit status 0, or 1 when the lane would refuse it; 2 for a usage mistake.
"""

# Characters that often slip into texts written in word processors, and the GSM-7 character that
# reads the same: replacing them keeps a text GSM-7 (about twice as many characters a part).
LOOKALIKES = {
    "\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'", "\u2032": "'", "\u00b4": "'", "`": "'",
    "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u2033": '"', "\u00ab": '"', "\u00bb": '"',
    "\u2010": "-", "\u2011": "-", "\u2012": "-", "\u2013": "-", "\u2014": "-", "\u2212": "-",
    "\u2026": "...", "\u00a0": " ", "\u2007": " ", "\u2009": " ", "\u202f": " ", "\t": " ",
    "\u2022": "*", "\u00b7": ".", "\u00e7": "\u00c7",  # the alphabet has the capital Ç only
}


def register(sub: Any, command: Any) -> None:
    """Add `preview` to the `sms-worker` parser (`command` is its subcommand maker)."""
    p = command(sub, "preview", "show a text's encoding, parts and what forced UCS-2, before sending it", EPILOG)
    given = p.add_mutually_exclusive_group(required=True)
    given.add_argument("--text", help="the SMS text")
    given.add_argument("--file", metavar="PATH", help="read the text from PATH (UTF-8), or stdin with -")
    p.add_argument("--lane", metavar="L", help="also say whether lane L (SMS_LANES) would refuse it")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_preview)


def cmd_preview(args: argparse.Namespace) -> int:
    text = args.text if args.text is not None else _read(args.file)
    _check_unicode(text, "--text" if args.text is not None else args.file)
    info = sms_text.analyse(text)
    verdict = None
    if args.lane is not None:
        settings = common.settings()
        lane = settings.sms_lanes.get(args.lane)
        if lane is None:
            raise UsageError(f"preview: --lane {args.lane!r} is not one of SMS_LANES ({', '.join(settings.sms_lanes)})")
        verdict = lane_verdict(info, args.lane, lane, settings)
    report = describe(info, verdict)
    if args.json:
        common.print_json(report)
    else:
        sys.stdout.write(render(report))
    return 1 if verdict is not None and verdict["refused"] else 0


def _read(path: str) -> str:
    raw = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    text = raw.decode("utf-8-sig")  # not UTF-8: main says so in one line (worker.cli.errors)
    if text.endswith("\n"):  # the newline a file ends with is the file's, not the message's
        text = text[:-2] if text.endswith("\r\n") else text[:-1]
    return text


def _check_unicode(text: str, where: str) -> None:
    """A lone surrogate (bytes that are no UTF-8 in an argument) has no UTF-8 form: the worker
    would refuse the job, so say so here rather than count it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise UsageError(f"preview: {where}: not valid Unicode text (U+{ord(text[error.start]):04X} at character "
                         f"{error.start}); give UTF-8 text") from None


def lane_verdict(info: sms_text.TextInfo, name: str, lane: LaneConfig, settings: Settings) -> dict[str, Any]:
    """Whether lane `name` would refuse the text, and why: the job validation at enqueue (an empty
    text, more parts than SMS_MAX_TEXT_PARTS: reason `invalid`), then the lane's rules in the order
    worker.policy applies them (allow_ucs2, then max_parts; reasons as in its `rejected` events)."""
    from worker.models import text_problem

    reasons: list[dict[str, str]] = []
    # The job validation comes first: such a text never reaches the lane.
    if not info.text.strip():
        reasons.append({"reason": "invalid", "rule": "text", "message": "refused at enqueue: text is empty"})
    elif (problem := text_problem(info.text, settings.sms_max_text_parts)) is not None:
        reasons.append({"reason": "invalid", "rule": f"SMS_MAX_TEXT_PARTS:{settings.sms_max_text_parts}",
                        "message": f"refused at enqueue: text {problem}"})
    # getattr: the lane options come with the traffic policy (worker.policy); a LaneConfig without
    # them allows everything, as those defaults do.
    allow_ucs2 = getattr(lane, "allow_ucs2", True)
    max_parts = getattr(lane, "max_parts", None)
    if not allow_ucs2 and info.encoding == sms_text.UCS2:
        reasons.append({"reason": "ucs2_refused", "rule": "allow_ucs2:false",
                        "message": f"UCS-2, and lane {name} has \"allow_ucs2\": false"})
    elif max_parts is not None and info.parts > max_parts:
        reasons.append({"reason": "too_many_parts", "rule": f"max_parts:{max_parts}",
                        "message": f"{info.parts} parts, lane {name} allows at most {max_parts} (\"max_parts\")"})
    return {"name": name, "refused": bool(reasons), "reasons": reasons,
            "allow_ucs2": allow_ucs2, "max_parts": max_parts, "sms_max_text_parts": settings.sms_max_text_parts}


def describe(info: sms_text.TextInfo, verdict: dict[str, Any] | None) -> dict[str, Any]:
    """The preview as JSON-ready data (the text itself is not repeated)."""
    report: dict[str, Any] = {
        "encoding": info.encoding, "characters": info.characters, "units": info.units, "unit": info.unit_name,
        "parts": info.parts, "per_part": info.per_part,
        "ucs2_because": [_character(char) for char in info.ucs2_because],
        # The size of each part: where the text is cut (never inside an escape or a surrogate pair).
        "part_units": [sms_text.units_in(part, info.encoding) for part in info.segments()],
    }
    if info.encoding == sms_text.UCS2:
        # What the text would be with the lookalikes replaced and every other such character
        # counted as one GSM-7 character (e.g. '?'): an estimate only when some have no lookalike.
        replaced = "".join(LOOKALIKES.get(char, char) for char in info.text)
        rest = {char for char in info.ucs2_because if char not in LOOKALIKES}
        as_gsm7 = sms_text.analyse("".join("?" if char in rest else char for char in replaced))
        report["as_gsm7"] = {"units": as_gsm7.units, "parts": as_gsm7.parts, "exact": not rest}
    if verdict is not None:
        report["lane"] = verdict
    return report


def _character(char: str) -> dict[str, Any]:
    return {"character": char, "code_point": f"U+{ord(char):04X}", "name": unicodedata.name(char, _control_name(char)),
            "gsm7_lookalike": LOOKALIKES.get(char)}


def _control_name(char: str) -> str:
    # unicodedata has no names for control characters; the common ones get theirs.
    return {"\t": "CHARACTER TABULATION", "\v": "LINE TABULATION", "\x1b": "ESCAPE", "\x00": "NULL"}.get(
        char, "(a control or unassigned character)")


def _shown(char: str) -> str:
    """The character itself when it prints, else its escape (a raw control character would act on
    the terminal)."""
    return char if char.isprintable() and not char.isspace() else ascii(char)[1:-1]


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _sizes(units: list[int]) -> str:
    """Part sizes, e.g. `152 + 12`; a long text's run of equal parts as `153 x 24 + 100`."""
    runs: list[list[int]] = []
    for size in units:
        if runs and runs[-1][0] == size:
            runs[-1][1] += 1
        else:
            runs.append([size, 1])
    return " + ".join(f"{size} x {times}" if times > 2 else " + ".join([str(size)] * times) for size, times in runs)


_PER_PART = {sms_text.GSM7: sms_text.GSM7_PER_PART, sms_text.UCS2: sms_text.UCS2_PER_PART}


def render(report: dict[str, Any]) -> str:
    unit = report["unit"]
    lines = [
        f"encoding:    {report['encoding']}",
        f"characters:  {report['characters']}",
        f"units:       {report['units']} {unit}",
        f"parts:       {report['parts']}"
        + (f" ({_sizes(report['part_units'])} {unit})" if report["parts"] > 1 else ""),
        f"per part:    {report['per_part']} {unit}" + (
            f" (in one part; {_PER_PART[report['encoding']]} a part once it needs several)"
            if report["parts"] == 1 else ""),
    ]
    because = report["ucs2_because"]
    if because:
        lines.append(f"forced UCS-2 by {_count(len(because), 'character')}:")
        for item in because:
            lookalike = item["gsm7_lookalike"]
            hint = f"  (GSM-7 has {_shown(lookalike) if lookalike.strip() else ascii(lookalike)})" if lookalike else ""
            lines.append(f"  {_shown(item['character']):<4} {item['code_point']:<8} {item['name']}{hint}")
        gsm7 = report["as_gsm7"]
        about = "" if gsm7["exact"] else "about "
        lines.append(f"hint: replace them with GSM-7 characters and the text stays GSM-7: {about}{gsm7['units']} "
                     f"septets in {_count(gsm7['parts'], 'part')}, instead of {report['units']} {unit} in "
                     f"{_count(report['parts'], 'part')}")
    lane = report.get("lane")
    if lane is not None:
        if lane["refused"]:
            lines += [f"lane {lane['name']}: refused: {item['message']}" for item in lane["reasons"]]
        else:
            lines.append(f"lane {lane['name']}: accepted")
    return "\n".join(lines) + "\n"
