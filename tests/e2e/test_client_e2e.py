"""The producer client against the deployed pipeline: real Redis, the sandbox, worker and clock processes.

A message sent through either flavour is sent once and reaches ACCEPTED, and `status` follows it
there; a scheduled one is held until its time, then sent; a cancelled one is never POSTed.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from tests.support.system import jobs, running
from worker.client import AsyncClient, CancelOutcome, Client, State
from worker.devtools.devstack import wait_until


def test_messages_sent_through_the_clients_are_accepted_once() -> None:
    with running() as system:
        with Client.from_settings(system.settings) as sms:
            otp = sms.send("41793026727", "Your code is 123456", lane="otp", id="otp-e2e-1")
            bulk = sms.send_many(jobs(500, id_prefix="bulk-e2e"), lane="bulk")

        async def produce() -> list[str]:
            async with AsyncClient.from_settings(system.settings) as aio:
                one = await aio.send("41793026799", "from asyncio", lane="otp")
                many = await aio.send_many(jobs(500, start=500), lane="bulk")
                return [one.message_id, *(m.message_id for m in many)]

        from_async = asyncio.run(produce())
        outcomes = system.wait_for_send_outcomes(1002, 90)
        stats = system.stats()

        with Client.from_settings(system.settings) as sms:
            wait_until(lambda: sms.status(otp.message_id).state is State.ACCEPTED, 10, "the otp status")
            by_id = sms.status(id="bulk-e2e-7")
            assert (by_id.message_id, by_id.state) == (bulk[7].message_id, State.ACCEPTED)
            assert by_id.fields is not None and int(by_id.fields["attempts"]) == 1

    expected = {otp.message_id, *(b.message_id for b in bulk), *from_async}
    assert set(outcomes) == expected and set(outcomes.values()) == {"accepted"}
    assert stats["messages_accepted"] == 1002
    assert stats["duplicates"] == 0


def test_a_scheduled_message_waits_and_a_cancelled_one_is_never_sent() -> None:
    with running() as system, Client.from_settings(system.settings) as sms:
        soon = sms.send("41793026727", "in two seconds", lane="otp",
                        send_at=datetime.now(UTC) + timedelta(seconds=2))
        later = sms.send("41793026728", "tomorrow", lane="otp", id="cancel-me",
                         send_at=datetime.now(UTC) + timedelta(days=1))
        assert sms.status(soon.message_id).state is State.SCHEDULED
        assert sms.cancel(id="cancel-me").outcome is CancelOutcome.CANCELLED

        wait_until(lambda: sms.status(soon.message_id).state is State.ACCEPTED, 30, "the scheduled send")
        stats = system.stats()
        assert sms.status(later.message_id).state is State.CANCELLED
        assert sms.cancel(soon.message_id).outcome is CancelOutcome.NOT_CANCELLABLE
        types = {e["message_id"]: e["type"] for e in system.events()}
    assert types == {soon.message_id: "accepted", later.message_id: "cancelled"}
    assert stats["messages_accepted"] == 1
