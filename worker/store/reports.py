"""Report pages and their bookkeeping: the raw stream, parked reports, counters, the logs lookup."""

from __future__ import annotations

from worker.store.base import StoreBase


class ReportOps(StoreBase):
    pass
