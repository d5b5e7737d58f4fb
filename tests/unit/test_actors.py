"""The actors' one rule beyond unwrapping arguments: a Redis outage is one warning line, not a traceback."""

from __future__ import annotations

import pytest
import redis
from structlog.testing import capture_logs

from worker.errors import StoreError
from worker.runtime import redis_outage_is_one_line
from worker.store import redis_errors


def _store_error(cause: Exception) -> StoreError:
    """What the store raises for redis-py's `cause` (its boundary names an outage StoreUnavailable)."""
    try:
        with redis_errors():
            raise cause
    except StoreError as error:
        return error
    raise AssertionError("redis_errors() let it through")


@pytest.mark.parametrize("cause", [redis.ConnectionError("refused"), redis.TimeoutError("slow"),
                                   redis.BusyLoadingError("loading")], ids=lambda e: type(e).__name__)
def test_redis_down_ends_the_message_with_one_warning(cause: Exception) -> None:
    with capture_logs() as logs, redis_outage_is_one_line("dispatch"):
        raise _store_error(cause)
    assert [(e["event"], e["log_level"], e["actor"]) for e in logs] == [
        ("actor_redis_unavailable", "warning", "dispatch")]


def test_any_other_redis_error_keeps_its_traceback() -> None:
    with pytest.raises(StoreError), redis_outage_is_one_line("dispatch"):
        raise _store_error(redis.ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"))
