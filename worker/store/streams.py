"""Consumer groups on streams other than the outboxes (the events relay reads the events stream)."""

from __future__ import annotations

from collections.abc import Sequence

import redis

from worker.store import resp
from worker.store.base import StoreBase


class StreamOps(StoreBase):
    def read_group(
        self, stream: str, group: str, consumer: str, count: int, lease_ms: int
    ) -> list[tuple[str, dict[bytes, bytes]]]:
        """Up to `count` entries for `consumer`: a dead consumer's stale ones first, then new ones.

        The group is created from the start of the stream on first use.
        """
        with resp.redis_errors():
            try:
                self.r.xgroup_create(stream, group, id="0", mkstream=True)
            except redis.ResponseError as error:
                if "BUSYGROUP" not in str(error):
                    raise
            _, stale, _ = self.r.xautoclaim(stream, group, consumer, lease_ms, "0-0", count=count)
            entries = [(e[0], e[1]) for e in stale if e[1]]
            if not entries:
                reply = self.r.xreadgroup(group, consumer, {stream: ">"}, count=count)
                entries = reply[0][1] if reply else []
        return [(entry_id.decode(), fields) for entry_id, fields in entries]

    def ack(self, stream: str, group: str, entry_ids: Sequence[str]) -> None:
        if entry_ids:
            with resp.redis_errors():
                self.r.xack(stream, group, *entry_ids)
