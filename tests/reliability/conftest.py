"""Size (SMS_RELIABILITY=short|full), per-trial parametrisation, and the results table of the suites.

Each suite fills a Row through the `record` fixture; the row is written as JSON into
SMS_RELIABILITY_RESULTS (a temporary directory when unset) with the test's outcome, and the table of
the session is printed at the end. scripts/reliability renders the same rows into docs/reliability.md.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.reliability.harness import Recorder, Row, Size, size_from_env
from tests.reliability.report import load_rows, render_table

_RESULTS_KEY = pytest.StashKey[Path]()
_OUTCOME_KEY = pytest.StashKey[str]()


def _size() -> Size:
    try:
        return size_from_env(os.environ)
    except ValueError as error:
        raise pytest.UsageError(str(error)) from None


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """One test item per crash trial, so each has its own timeout and result."""
    if "trial" in metafunc.fixturenames:
        metafunc.parametrize("trial", range(_size().crash_trials), ids=lambda t: f"trial{t + 1}")
    if "pause_trial" in metafunc.fixturenames:
        metafunc.parametrize("pause_trial", range(_size().pause_trials), ids=lambda t: f"trial{t + 1}")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The full runs are long: give each reliability test the size's timeout."""
    here = Path(__file__).parent
    timeout = _size().test_timeout_s
    for item in items:
        if here in item.path.parents:
            item.add_marker(pytest.mark.timeout(timeout))


def pytest_configure(config: pytest.Config) -> None:
    directory = os.environ.get("SMS_RELIABILITY_RESULTS")
    path = Path(directory) if directory else Path(tempfile.mkdtemp(prefix="sms-reliability-"))
    path.mkdir(parents=True, exist_ok=True)
    config.stash[_RESULTS_KEY] = path


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    report = yield
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        item.stash[_OUTCOME_KEY] = report.outcome
    return report


@pytest.fixture(scope="session")
def size() -> Size:
    """The run's size: short (CI, default) or full (SMS_RELIABILITY=full)."""
    return _size()


@pytest.fixture
def record(request: pytest.FixtureRequest, size: Size) -> Iterator[Row]:
    """A results row for this test, saved with the test's outcome when it ends."""
    row = Row(suite=request.node.name, mode=size.mode)
    recorder = Recorder(request.config.stash[_RESULTS_KEY], request.node.nodeid, row)
    yield row
    recorder.save(request.node.stash.get(_OUTCOME_KEY, "error"))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    """Print the table of this session's rows."""
    rows = load_rows(config.stash[_RESULTS_KEY])
    if rows:
        terminalreporter.section("reliability results")
        terminalreporter.write_line(render_table(rows))
        terminalreporter.write_line(f"(rows in {config.stash[_RESULTS_KEY]})")
