"""Reports lost before they were stored are recovered from the provider's logs, not expired as no_report."""

from __future__ import annotations

import httpx
import orjson

from worker.devtools.devstack import wait_until
from worker.devtools.sandbox.config import SandboxConfig
from worker.devtools.sandbox.process import SandboxProcess
from worker.provider import Provider, ProviderConfig
from worker.reports import ProcessConfig, Processor, SweepConfig, Sweeper
from worker.settings import Settings
from worker.store import Store

API_KEY = "recovery-test-key-0123"


def test_a_report_lost_after_the_get_is_recovered_from_the_logs(redis_url: str, store: Store) -> None:
    """A report fetched and lost (a drain killed before storing it) still becomes its real final event."""
    with SandboxProcess(api_key=API_KEY, config=SandboxConfig(report_delay_ms=0, seed=5,
                                                              outcome_mix={"delivered": 1.0})) as sandbox:
        settings = Settings(redis_url=redis_url, icomm_base_url=sandbox.url, icomm_api_key=API_KEY,
                            sms_logs_rate_per_min=6000, log_format="console")
        mids = [f"lost-{i}" for i in range(3)] + ["never-sent"]
        body = {"messages": [{"destinations": [{"to": f"4179000000{i}", "messageId": mid}], "content": {"text": "x"}}
                             for i, mid in enumerate(mids[:3])]}
        answer = httpx.post(f"{sandbox.url}/sms/3/messages", json=body, headers=sandbox.auth_header, timeout=5)
        answer.raise_for_status()
        for mid in mids:
            job = orjson.dumps({"to": "41790000001", "text": "x", "id": mid})
            store.r.hset(store.msg(mid), mapping={"state": "ACCEPTED", "lane": "bulk", "job": job})
            store.r.zadd(store.awaiting, {mid: 1})  # its report deadline is long past
        with Provider(ProviderConfig.from_settings(settings)) as provider:
            # The drain that fetched these reports died before storing the page: they are gone.
            wait_until(lambda: b'"lost-2"' in provider.reports_raw(limit=1000) or sandbox.stats()["reports"][
                "fetched"] == 3, 10, "the reports to be handed out (and lost)")
            processor = Processor(ProcessConfig.from_settings(settings), store)
            result = Sweeper(SweepConfig.from_settings(settings), store, processor, provider=provider).sweep()
            processor.process()
            again = Sweeper(SweepConfig.from_settings(settings), store, processor, provider=provider).sweep()
    types = {}
    for _, fields in store.r.xrange(store.events):
        event = orjson.loads(fields[b"event"])
        types[event["message_id"]] = (event["type"], event["reason"])
    assert result["recovered_from_logs"] == 3
    assert result["expired_no_report"] == 1  # not in the logs: nothing to recover
    assert again["recovered_from_logs"] == 0 and again["expired_no_report"] == 0
    assert types == {"lost-0": ("delivered", None), "lost-1": ("delivered", None), "lost-2": ("delivered", None),
                     "never-sent": ("expired", "no_report")}


def test_a_status_in_the_logs_whose_group_is_unknown_is_not_taken_for_a_final_one(settings: Settings,
                                                                                  store: Store) -> None:
    """The sweep's logs lookup applies final statuses only: a group it does not know (here SCHEDULED,
    with the groupId DELIVERED has) is not guessed into `delivered`."""
    scheduled = {"groupId": 3, "groupName": "SCHEDULED", "id": 99, "name": "SCHEDULED_ACCEPTED",
                 "description": "Message accepted and scheduled"}

    def logs(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/sms/3/logs"
        return httpx.Response(200, json={"results": [{"messageId": "m-1", "destination": "41790000001",
                                                      "status": scheduled}]})

    job = orjson.dumps({"to": "41790000001", "text": "x", "id": "m-1"})
    store.r.hset(store.msg("m-1"), mapping={"state": "ACCEPTED", "lane": "bulk", "job": job})
    store.r.zadd(store.awaiting, {"m-1": 1})  # its report deadline is long past
    with Provider(ProviderConfig.from_settings(settings), transport=httpx.MockTransport(logs)) as provider:
        processor = Processor(ProcessConfig.from_settings(settings), store)
        result = Sweeper(SweepConfig.from_settings(settings), store, processor, provider=provider).sweep()
        processor.process()

    types = [orjson.loads(f[b"event"])["type"] for _, f in store.r.xrange(store.events)]
    assert result["recovered_from_logs"] == 0
    assert "delivered" not in types
