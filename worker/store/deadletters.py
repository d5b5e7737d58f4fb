"""The dead-letter stream: reading, replaying and purging dead letters."""

from __future__ import annotations

from worker.store.base import StoreBase


class DeadLetterOps(StoreBase):
    pass
