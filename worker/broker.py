"""The worker process's entry: owns the only import-time effects (settings, logging, the broker).

The `dramatiq` CLI imports worker.actors, which imports this: the settings are read and validated
(a wrong one stops the process with a clear message), logging is configured, and the broker is
set. What it wires is defined, effect-free, in worker.runtime (the composition root).
"""

from __future__ import annotations

import sys

import dramatiq

from worker import logs
from worker.errors import ConfigError
from worker.runtime import Runtime, make_broker
from worker.settings import load_settings

try:
    SETTINGS = load_settings()
except ConfigError as error:
    print(f"sms-worker: {error}", file=sys.stderr)
    raise SystemExit(2) from None
logs.configure_from(SETTINGS)
BROKER, RESOURCES = make_broker(SETTINGS)
dramatiq.set_broker(BROKER)


def runtime() -> Runtime:
    """The current worker process's Runtime (only inside actors)."""
    if RESOURCES.runtime is None:
        raise RuntimeError("the worker's resources are not built yet (actors run only in a worker process)")
    return RESOURCES.runtime
