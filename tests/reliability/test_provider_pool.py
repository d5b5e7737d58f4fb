"""httpcore's sync pool losing its connection slots to a race, and the Provider healing from it.

The race (encode/httpcore#550, still in httpcore 1.0.9) needs many concurrent pool and read timeouts
and happens within seconds on an idle machine, but not within any fixed time on a loaded one: so these
two run at the full size only (`./scripts/reliability -k pool`). The CI suite proves the healing on a
pool put into the state the race leaves (tests/integration/test_provider_socket.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import orjson
import pytest

from tests.integration.test_provider_socket import (  # noqa: F401 - fixtures used by name
    STORM,
    WireServer,
    _leaked,
    _no_proxy,
    _pool,
    _stalls_some,
    _storm,
    accepted_reply,
    one_request,
    providers,
    servers,
)
from tests.reliability.harness import Size
from worker.provider import Provider


def _full_only(size: Size) -> None:
    if size.mode != "full":
        pytest.skip("needs the race within its time budget: full size only (./scripts/reliability -k pool)")


def test_httpcore_pool_loses_its_slots_under_concurrent_timeouts(
    size: Size, servers: Callable[..., WireServer],  # noqa: F811 - the fixture
) -> None:
    """The root cause, with plain httpx: threads sharing one client, read and pool timeouts firing
    together. A request whose pool wait times out just as a releasing thread assigns it a NEW
    connection leaves that connection in the pool, never connected and never released. Once every
    slot is lost, the client fails every request with PoolTimeout although nothing is in flight and
    the server is healthy, for good."""
    _full_only(size)
    server = servers(_stalls_some(3))
    client = httpx.Client(
        base_url=server.url, timeout=httpx.Timeout(0.1, pool=0.05),
        limits=httpx.Limits(max_connections=2, max_keepalive_connections=2),
    )
    pool = _pool(client)
    try:
        outcomes = _storm(lambda: client.post("/sms/3/messages", content=orjson.dumps(one_request())),
                          until=lambda: len(_leaked(pool)) >= 2)
        assert len(_leaked(pool)) == 2, f"no slot leaked in 30 s of {outcomes}: is httpcore fixed?"
        assert "PoolTimeout" in outcomes and "ReadTimeout" in outcomes
        server.answer = accepted_reply
        seen = len(server.requests)
        for _ in range(3):
            with pytest.raises(httpx.PoolTimeout):
                client.post("/sms/3/messages", content=orjson.dumps(one_request()))
        assert len(server.requests) == seen  # nothing left the client
        assert [c.info() for c in pool.connections] == ["CONNECTING", "CONNECTING"]
    finally:
        client.close()


def test_provider_heals_from_the_race_itself(
    size: Size,
    servers: Callable[..., WireServer],  # noqa: F811 - the fixture
    providers: Callable[..., Provider],  # noqa: F811 - the fixture
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The reproduction with a Provider: 8 threads share one, every 3rd request stalls past the read
    timeout, 2 connections, 50 ms pool timeout. The same storm poisons a plain client (above); the
    Provider finds the lost slots at a PoolTimeout and replaces its client, and once the storm is
    over every send succeeds."""
    _full_only(size)
    server = servers(_stalls_some(3))
    provider = providers(server, **STORM)
    lost: list[int] = []
    close_retired = Provider._close_retired

    def spy(self: Provider, generation: Any) -> None:  # what the replaced pool had lost
        lost.append(len(_leaked(_pool(generation.client))))
        close_retired(self, generation)

    monkeypatch.setattr(Provider, "_close_retired", spy)
    outcomes = _storm(lambda: provider.send(one_request()), until=lambda: any(lost))
    assert any(lost), f"no poisoned pool in 30 s of {outcomes}"
    assert provider._generation.number >= 2

    server.answer = accepted_reply
    for n in range(20):
        provider.send(one_request(f"after-{n}"))
    assert _leaked(_pool(provider._generation.client)) == []
