"""The in-process sandbox of the integration tests: one per test module, reset to no faults for each test.

A module that needs another sandbox overrides `sandbox_config` (module scope) with its own
SandboxConfig; `sandbox` and `sbx` stay the same.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.sandbox import API_KEY, NO_FAULTS
from worker.devtools.sandbox.config import SandboxConfig
from worker.devtools.sandbox.process import SandboxProcess


@pytest.fixture(scope="module")
def sandbox_config() -> SandboxConfig:
    """Reports an hour away, so send-side tests see only send outcomes."""
    return SandboxConfig(report_delay_ms=600_000, seed=1)


@pytest.fixture(scope="module")
def sandbox(sandbox_config: SandboxConfig) -> Iterator[SandboxProcess]:
    with SandboxProcess(api_key=API_KEY, config=sandbox_config) as proc:
        yield proc


@pytest.fixture
def sbx(sandbox: SandboxProcess) -> SandboxProcess:
    """The module's sandbox with no messages, no counters and no faults."""
    sandbox.reset()
    sandbox.configure(**NO_FAULTS)
    return sandbox
