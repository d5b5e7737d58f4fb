"""What operators read and the processes report: status snapshots, heartbeats, the instance marker."""

from __future__ import annotations

from worker.store.base import StoreBase


class OperationsOps(StoreBase):
    pass
