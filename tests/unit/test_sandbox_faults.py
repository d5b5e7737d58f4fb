"""Unit tests of the sandbox's provider-misbehaviour knobs: parsing, seeded draws, result reshaping,
lagging logs, and a late acceptance that outlives its request."""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from worker.devtools.sandbox.app import SandboxApp
from worker.devtools.sandbox.codes import PENDING_ACCEPTED, REJECTED_DESTINATION, SCHEDULED_ACCEPTED
from worker.devtools.sandbox.config import SandboxConfig, add_arguments, apply_updates, config_from_args, config_to_args
from worker.devtools.sandbox.faults import After, FaultInjector, SendFaults, reshape_results
from worker.devtools.sandbox.state import SandboxState
from worker.devtools.sandbox.validation import format_datetime, parse_logs_query

NOW = datetime(2026, 1, 15, 12, 0, tzinfo=UTC).timestamp()
NEW_KNOBS = {
    "html_body_rate": 0.0,
    "truncated_body_rate": 0.0,
    "partial_results_rate": 0.0,
    "unknown_status_rate": 0.0,
    "late_accept_rate": 0.0,
    "late_accept_delay_ms": 30000.0,
    "logs_lag_ms": 0.0,
}


def _body(*ids: str, **extra: Any) -> dict[str, Any]:
    destinations = [{"to": f"4179302670{i}", "messageId": mid} for i, mid in enumerate(ids)]
    return {"messages": [{"destinations": destinations, "content": {"text": "hi"}}], **extra}


# --- knobs ----------------------------------------------------------------------------------


def test_new_knobs_default_off() -> None:
    """Every new fault is off by default (the delay only matters once late_accept_rate is set)."""
    config = SandboxConfig()
    assert {name: getattr(config, name) for name in NEW_KNOBS} == NEW_KNOBS


def test_new_knobs_as_flags_of_sms_worker_sandbox() -> None:
    """`sms-worker sandbox` takes each knob as a flag, and config_to_args writes them back."""
    from worker.cli import build_parser

    argv = [
        "sandbox", "--api-key", "k",
        "--html-body-rate", "0.1", "--truncated-body-rate", "0.2", "--partial-results-rate", "0.3",
        "--unknown-status-rate", "0.4", "--late-accept-rate", "0.5", "--late-accept-delay-ms", "1200",
        "--logs-lag-ms", "750",
    ]  # fmt: skip
    config = config_from_args(build_parser().parse_args(argv))
    assert (config.html_body_rate, config.truncated_body_rate, config.partial_results_rate) == (0.1, 0.2, 0.3)
    assert (config.unknown_status_rate, config.late_accept_rate, config.late_accept_delay_ms) == (0.4, 0.5, 1200)
    assert config.logs_lag_ms == 750
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert config_from_args(parser.parse_args(config_to_args(config))) == config


def test_new_knobs_are_validated() -> None:
    """Shares must lie in [0, 1] and delays be >= 0; a bad update changes nothing."""
    config = SandboxConfig()
    problems = apply_updates(
        config, {"html_body_rate": 1.5, "unknown_status_rate": -0.1, "logs_lag_ms": -1, "late_accept_rate": 0.5}
    )
    assert dict(problems).keys() == {"html_body_rate", "unknown_status_rate", "logs_lag_ms"}
    assert config.late_accept_rate == 0
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    with pytest.raises(ValueError, match="--late-accept-delay-ms"):
        config_from_args(parser.parse_args(["--late-accept-delay-ms", "soon"]))


# --- draws ----------------------------------------------------------------------------------


def _draws(config: SandboxConfig, n: int = 200) -> list[SendFaults]:
    injector = FaultInjector(config, random.Random(f"{config.seed}:faults"), NOW)
    return [injector.draw_send(NOW) for _ in range(n)]


def test_draws_are_seeded_and_follow_the_rates() -> None:
    """The same seed draws the same faults; each knob hits about its share of sends."""
    config = SandboxConfig(
        seed=4, html_body_rate=0.3, truncated_body_rate=0.5, late_accept_rate=0.25, late_accept_delay_ms=900,
        partial_results_rate=0.5,
    )  # fmt: skip
    first = _draws(config, 2000)
    assert first == _draws(config, 2000)
    afters = Counter(draw.after for draw in first)
    assert 0.25 < afters[After.HTML_BODY] / 2000 < 0.35
    assert 0.3 < afters[After.TRUNCATED_BODY] / 2000 < 0.4  # half of the 70% left by html_body
    held = [draw.hold_s for draw in first if draw.hold_s]
    assert set(held) == {0.9} and 0.2 < len(held) / 2000 < 0.3
    assert 0.45 < sum(draw.partial_results for draw in first) / 2000 < 0.55
    assert all((draw.results_seed is None) == (not draw.partial_results) for draw in first)


def test_refused_sends_get_no_acceptance_fault() -> None:
    """A send answered 429/5xx is not accepted, so it is never held, reshaped or spoilt on top."""
    config = SandboxConfig(
        seed=2, rate_429=1, html_body_rate=1, late_accept_rate=1, partial_results_rate=1, unknown_status_rate=1
    )
    for draw in _draws(config, 20):
        assert (draw.after, draw.hold_s, draw.partial_results, draw.results_seed) == (None, 0.0, False, None)


def test_reshape_gives_unknown_statuses_to_accepted_results_only() -> None:
    """unknown_status_rate=1 turns every PENDING_ACCEPTED result into SCHEDULED; rejections stay as they are."""
    config = SandboxConfig(unknown_status_rate=1)
    response: dict[str, Any] = {
        "bulkId": "b",
        "messages": [
            {"messageId": "a", "status": PENDING_ACCEPTED},
            {"messageId": "r", "status": REJECTED_DESTINATION},
            {"messageId": "c", "status": PENDING_ACCEPTED},
        ],
    }
    counts: Counter[str] = Counter()
    reshape_results(response, SendFaults(0.0, None, 200, None, None, results_seed=1), config, counts)
    assert [m["status"]["name"] for m in response["messages"]] == [
        "SCHEDULED_ACCEPTED",
        "REJECTED_DESTINATION",
        "SCHEDULED_ACCEPTED",
    ]
    assert counts == {"unknown_status": 2}
    assert PENDING_ACCEPTED["name"] == "PENDING_ACCEPTED" and SCHEDULED_ACCEPTED["groupId"] == 7  # shared, unmutated


@pytest.mark.parametrize("size", [1, 2, 10, 100])
def test_reshape_leaves_out_at_least_one_result(size: int) -> None:
    """A partial response keeps the order of what it lists and always lists fewer than were sent."""
    for seed in range(20):
        results = [{"messageId": str(i), "status": PENDING_ACCEPTED} for i in range(size)]
        response: dict[str, Any] = {"bulkId": "b", "messages": list(results)}
        counts: Counter[str] = Counter()
        faults = SendFaults(0.0, None, 200, None, None, partial_results=True, results_seed=seed)
        reshape_results(response, faults, SandboxConfig(), counts)
        kept = response["messages"]
        assert len(kept) < size
        assert kept == [r for r in results if r in kept]
        assert counts == {"partial_results": 1, "partial_results_dropped": size - len(kept)}


def test_reshape_does_nothing_without_a_results_seed() -> None:
    """With no per-result fault drawn the response is left as it is."""
    response: dict[str, Any] = {"bulkId": "b", "messages": [{"messageId": "a", "status": PENDING_ACCEPTED}]}
    counts: Counter[str] = Counter()
    reshape_results(response, SendFaults(0.0, None, 200, None, None), SandboxConfig(unknown_status_rate=1), counts)
    assert response["messages"][0]["status"] is PENDING_ACCEPTED and not counts


# --- lagging logs ---------------------------------------------------------------------------


def test_logs_lag_hides_a_send_until_it_is_old_enough() -> None:
    """With logs_lag_ms a send is absent from the logs, then present; the lag runs from acceptance."""
    state = SandboxState(SandboxConfig(seed=1, logs_lag_ms=1000), NOW)
    state.accept(_body("now"), NOW)
    later = format_datetime(NOW + 3600)
    state.accept(_body("scheduled", options={"schedule": {"sendAt": later}}), NOW + 0.5)
    query, _ = parse_logs_query(b"")

    def logged(at: float) -> list[str]:
        return sorted(record[0] for record in state.query_logs(query, at))

    assert logged(NOW + 0.9) == []
    assert logged(NOW + 1.0) == ["now"]
    assert logged(NOW + 1.5) == ["now", "scheduled"]  # not an hour later, at its sendAt
    assert state.faults_injected["logs_lag"] == 3  # two entries held back, then one, then none
    state.config.logs_lag_ms = 0
    assert logged(NOW) == ["now", "scheduled"]


# --- a late acceptance outlives its request -------------------------------------------------


async def _until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s}s")
        await asyncio.sleep(0.005)


def test_late_acceptance_survives_a_cancelled_request() -> None:
    """The request is cancelled during the hold (the client left): the messages are accepted at its end."""

    async def scenario() -> None:
        app = SandboxApp("k", SandboxConfig(seed=3, late_accept_rate=1, late_accept_delay_ms=100))
        to_app: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        from_app: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        lifespan = asyncio.create_task(app({"type": "lifespan"}, to_app.get, from_app.put))
        await to_app.put({"type": "lifespan.startup"})
        assert (await from_app.get())["type"] == "lifespan.startup.complete"

        body = orjson.dumps(_body("gone"))
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {
            "type": "http",
            "method": "POST",
            "path": "/sms/3/messages",
            "headers": [(b"authorization", b"App k")],
            "query_string": b"",
        }
        request = asyncio.create_task(app(scope, receive, send))
        await _until(lambda: app.state.faults_injected["late_accept"] == 1)
        assert app.state.messages_accepted == 0
        request.cancel()
        await _until(lambda: app.state.messages_accepted == 1)
        assert request.cancelled() and sent == []
        assert "gone" in app.state.by_message_id

        await to_app.put({"type": "lifespan.shutdown"})
        assert (await from_app.get())["type"] == "lifespan.shutdown.complete"
        await lifespan

    asyncio.run(scenario())
