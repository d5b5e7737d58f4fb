"""The Dramatiq sink: events on the stream are relayed in batches, at least once, to a queue and actor."""

from __future__ import annotations

import dramatiq
from dramatiq.brokers.stub import StubBroker

from worker import events
from worker.events import RELAY_BATCH, EventRelay
from worker.store import Store


def _publish(store: Store, n: int) -> None:
    for i in range(n):
        store.r.xadd(store.events, {"event": events.build("accepted", f"m{i}", {"to": "41790000001", "id": f"p{i}"},
                                                          lane="bulk")})


def test_events_are_relayed_in_batches_to_the_configured_actor(store: Store) -> None:
    """250 events become three messages of at most 100 events for `handle_sms_status` on `sms_status`."""
    broker = StubBroker()
    broker.declare_queue("sms_status")
    _publish(store, 250)
    relayed = EventRelay(store, broker, "sms_status", "handle_sms_status").run("relay-1")
    messages = [dramatiq.Message.decode(m) for m in broker.queues["sms_status"].queue]
    assert relayed == 250
    assert [len(m.args[0]) for m in messages] == [RELAY_BATCH, RELAY_BATCH, 50]
    assert {m.actor_name for m in messages} == {"handle_sms_status"}
    assert messages[0].args[0][0]["event_id"] == "m0:accepted"
    assert EventRelay(store, broker, "sms_status", "handle_sms_status").run("relay-1") == 0


def test_a_relay_that_died_before_acking_is_taken_over(store: Store) -> None:
    """Entries read but never acknowledged are relayed again by another relay after the lease."""
    broker = StubBroker()
    broker.declare_queue("sms_status")
    _publish(store, 10)
    store.read_group(store.events, "dramatiq-relay", "dead-relay", 100, lease_ms=0)  # read, then "crash"
    relayed = EventRelay(store, broker, "sms_status", "handle_sms_status", lease_ms=0).run("relay-2")
    batch = dramatiq.Message.decode(broker.queues["sms_status"].queue[0]).args[0]
    assert relayed == 10
    assert [e["message_id"] for e in batch] == [f"m{i}" for i in range(10)]
