"""report_apply.lua and worker.reports.ops agree: every op code and answer has one name on both sides."""

from __future__ import annotations

import re
from importlib import resources

from worker.reports.ops import ApplyResult, OpCode

SOURCE = (resources.files("worker") / "lua" / "report_apply.lua").read_text()
HEADER = "\n".join(line for line in SOURCE.splitlines() if line.startswith("--"))
BODY = "\n".join(line for line in SOURCE.splitlines() if not line.startswith("--"))


def _section(title: str) -> str:
    """The header lines from the one starting with `title` up to the next unindented comment line."""
    start = HEADER.index(title)
    lines = HEADER[start:].splitlines()
    end = next((i for i, line in enumerate(lines[1:], 1) if not line.startswith("--  ")), len(lines))
    return "\n".join(lines[1:end])


def test_the_header_names_each_op_code_as_python_does() -> None:
    table = dict(re.findall(r"^--   ([A-Z])  ([A-Z_]+) ", _section("-- Op codes"), re.M))
    assert table == {code.value: code.name for code in OpCode}


def test_the_header_names_each_result_as_python_does() -> None:
    table = {int(n): name for n, name in re.findall(r"^--   (\d)  ([A-Z_]+)", _section("-- Returns"), re.M)}
    assert table == {result.value: result.name for result in ApplyResult}


def test_the_script_handles_exactly_the_python_op_codes() -> None:
    [accepted] = re.findall(r"local CODES = \{([^}]*)\}", BODY)
    assert set(re.findall(r"([A-Z]) = true", accepted)) == {code.value for code in OpCode}
    handled = set(re.findall(r"code == '([A-Z])'", BODY))
    assert handled == {code.value for code in OpCode}


def test_the_script_answers_exactly_the_python_results() -> None:
    answered = {int(n) for n in re.findall(r"\bresult = (\d)\b", BODY)}
    assert answered == {result.value for result in ApplyResult}
