"""Test support: what several test suites share, so each piece exists once.

- `sandbox`: the one sandbox API key, the no-faults knobs, `SandboxAdmin` (the sandbox's admin endpoints).
- `system`: a whole running system of real processes (`running()`, `launch()`, `System`, `jobs()`);
  the reliability suites extend it in tests/reliability/harness.py.
- `redis_server`: a private redis-server for the session (tests/conftest.py).

Ports come from worker.devtools.devstack.free_port; the in-process sandbox fixtures (`sandbox`,
`sbx`, `sandbox_config`) live in tests/integration/conftest.py.
"""
