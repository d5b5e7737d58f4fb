"""Several icomm accounts (worker.accounts) against two sandboxes, one per account, and real Redis.

Lane otp sends through `default` (sandbox A, key A), lane bulk through `marketing` (sandbox B, key B):
each lane's requests reach its own sandbox with its own key, a 401/403 pauses only the lanes of the
account that got it, each account's rate-limit buckets and report drain are its own, and the
default account keeps today's key names.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import orjson
import pytest

from tests.integration.test_dispatch import RecordingWake
from tests.support.sandbox import API_KEY, NO_FAULTS
from worker.accounts import Accounts, Wired, wire
from worker.devtools.devstack import wait_until
from worker.devtools.sandbox.config import SandboxConfig
from worker.devtools.sandbox.process import SandboxProcess
from worker.dispatch import DispatchConfig, Dispatcher
from worker.outbox import Outbox, OutboxConfig
from worker.reports import DrainConfig, Drainer, ProcessConfig, Processor
from worker.settings import Settings
from worker.status import StatusConfig, collect, render
from worker.store import Store

KEY_B = "marketing-key-3c1e9f27b8d40a65"
KEY_B_VARIABLE = "MARKETING_ICOMM_KEY"


@pytest.fixture(scope="module")
def sandbox_b() -> Iterator[SandboxProcess]:
    with SandboxProcess(api_key=KEY_B, config=SandboxConfig(report_delay_ms=600_000, seed=2)) as proc:
        yield proc


@pytest.fixture
def sbx_b(sandbox_b: SandboxProcess) -> SandboxProcess:
    sandbox_b.reset()
    sandbox_b.configure(**NO_FAULTS)
    return sandbox_b


def _two_account_settings(redis_url: str, a: SandboxProcess, b: SandboxProcess, **overrides: Any) -> Settings:
    base: dict[str, Any] = {
        "redis_url": redis_url, "icomm_base_url": a.url, "icomm_api_key": API_KEY,
        "icomm_read_timeout_s": 0.5, "icomm_connect_timeout_s": 0.5, "icomm_write_timeout_s": 0.5,
        "icomm_retry_backoff_base_s": 0.01, "icomm_retry_backoff_max_s": 0.05, "sms_lease_s": 10,
        "sms_reconcile_delay_s": 0, "sms_logs_rate_per_min": 6000, "log_format": "console",
        "sms_rate_limit_mps": 1000,
        "sms_accounts": json.dumps({"marketing": {"base_url": b.url, "api_key_env": KEY_B_VARIABLE,
                                                  "rate_limit_mps": 500}}),
        "sms_lanes": {"otp": {"batch_size": 10, "max_wait_ms": 0},
                      "bulk": {"batch_size": 1000, "max_wait_ms": 0, "account": "marketing"}},
    }
    return Settings.model_validate({**base, **overrides})


def _jobs(n: int, lane: str) -> list[dict[str, Any]]:
    """Jobs with producer ids of their own lane (the same id on two lanes is one job)."""
    return [{"to": f"4179{i:07d}", "text": f"hello {i}", "id": f"{lane}-{i}"} for i in range(n)]


class TwoAccounts:
    """A dispatcher and a drainer per account, wired as worker.runtime wires a worker process."""

    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings, self.store = settings, store
        self.wired: Wired = wire(settings, store)
        self.wake = RecordingWake()
        self.outbox = Outbox(OutboxConfig.from_settings(settings), store)
        config = replace(DispatchConfig.from_settings(settings), recover_every_s=0, listen=False)
        main = self.wired.main
        self.dispatcher = Dispatcher(config, store, self.wired.providers[main], self.wired.limiters[main], self.wake,
                                     "t1", routes=self.wired.routes)
        self.processor = Processor(ProcessConfig.from_settings(settings), store, None)
        self.drainers = {
            name: Drainer(DrainConfig.from_settings(settings, None if account.is_default else account), store,
                          self.wired.providers[name])
            for name, account in self.wired.accounts.accounts.items()
        }

    def events(self) -> list[dict[str, Any]]:
        return [orjson.loads(f[b"event"]) for _, f in self.store.r.xrange(self.store.events)]


@pytest.fixture
def rig(redis_url: str, sbx: SandboxProcess, sbx_b: SandboxProcess, store: Store,
        monkeypatch: pytest.MonkeyPatch) -> Iterator[TwoAccounts]:
    monkeypatch.setenv(KEY_B_VARIABLE, KEY_B)
    rig = TwoAccounts(_two_account_settings(redis_url, sbx, sbx_b), store)
    yield rig
    rig.wired.close()


def test_each_lane_sends_to_its_own_account_with_its_own_key(rig: TwoAccounts, sbx: SandboxProcess,
                                                           sbx_b: SandboxProcess) -> None:
    """otp's jobs reach sandbox A (key A) only, bulk's sandbox B (key B) only; each sandbox refuses
    the other's key, so a request with the wrong key could not have been accepted."""
    rig.outbox.enqueue_many(_jobs(3, "otp"), "otp")
    rig.outbox.enqueue_many(_jobs(7, "bulk"), "bulk")
    rig.dispatcher.run("otp")
    rig.dispatcher.run("bulk")
    assert {e["type"] for e in rig.events()} == {"accepted"} and len(rig.events()) == 10
    assert sbx.stats()["messages_accepted"] == 3
    assert sbx_b.stats()["messages_accepted"] == 7
    # Each account's own messages/s bucket was charged; the default keeps today's key name.
    keys = {k.decode() for k in rig.store.r.keys("sms:rl:*")}
    assert {"sms:rl:mps", "sms:rl:acct:marketing:mps"} <= keys


def test_a_401_on_one_account_pauses_only_its_lanes(rig: TwoAccounts, sbx: SandboxProcess,
                                                    sbx_b: SandboxProcess) -> None:
    """Key B refused: bulk pauses with reason auth and keeps its jobs; otp (key A) sends, and its
    accepted request does not lift bulk's pause (it proves key A, not key B)."""
    sbx_b.configure(forbidden_keys=[KEY_B])
    rig.outbox.enqueue_many(_jobs(5, "bulk"), "bulk")
    rig.dispatcher.run("bulk")
    assert rig.store.paused("bulk") == "auth"
    assert rig.store.r.xlen(rig.store.outbox("bulk")) == 5
    rig.outbox.enqueue_many(_jobs(4, "otp"), "otp")
    rig.dispatcher.run("otp")
    assert rig.store.paused("otp") is None
    assert sbx.stats()["messages_accepted"] == 4
    assert rig.store.paused("bulk") == "auth"  # still: another account's success says nothing of key B
    assert sbx_b.stats()["messages_accepted"] == 0
    status = collect(StatusConfig.from_settings(rig.settings), rig.store)
    [marketing] = [a for a in status.accounts if a["account"] == "marketing"]
    assert marketing["paused"] == {"bulk": "auth"}
    assert "marketing: lanes bulk" in render(status) and "PAUSED bulk auth" in render(status)


def test_reports_of_both_accounts_are_drained_with_their_own_lease_and_source(
    rig: TwoAccounts, sbx: SandboxProcess, sbx_b: SandboxProcess
) -> None:
    sbx.configure(report_delay_ms=0)
    sbx_b.configure(report_delay_ms=0)
    rig.outbox.enqueue_many(_jobs(2, "otp"), "otp")
    rig.outbox.enqueue_many(_jobs(3, "bulk"), "bulk")
    rig.dispatcher.run("otp")
    rig.dispatcher.run("bulk")
    # The sandbox makes a report due a moment after the acceptance: drain each account until it has all.
    drained = {name: 0 for name in rig.drainers}

    def all_drained() -> bool:
        for name, drainer in rig.drainers.items():
            drained[name] += drainer.drain().reports
        return drained == {"default": 2, "marketing": 3}

    wait_until(all_drained, 10, "2 reports from account default and 3 from marketing", interval_s=0.05)
    sources = sorted(f[b"src"].decode() for _, f in rig.store.r.xrange(rig.store.reports_raw))
    assert sources == ["drain", "drain:marketing"]
    rig.processor.process()
    finals = [e for e in rig.events() if e["type"] != "accepted"]
    assert len(finals) == 5
    # Each account's last drain is recorded under its own key (the polling above drains idle ones too).
    assert rig.store.last_drain_record()["outcome"] == "drained"
    assert rig.store.last_drain_record("marketing")["outcome"] == "drained"
    assert rig.store.r.exists("sms:reports:last_drain", "sms:reports:last_drain:marketing") == 2


def test_keys_never_appear_in_reprs_status_or_metrics(rig: TwoAccounts) -> None:
    """The accounts, the settings, status (JSON and text) and the metrics scrape carry no key."""
    from worker import metrics

    accounts = Accounts.from_settings(rig.settings)
    status = collect(StatusConfig.from_settings(rig.settings), rig.store)
    body, _ = metrics.render(metrics.registries(rig.settings, rig.store))
    shown = [repr(accounts), repr(rig.settings), repr(rig.wired), json.dumps(status.as_dict()), render(status),
             body.decode()]
    for text in shown:
        assert KEY_B not in text and API_KEY not in text
    assert 'sms_account_lanes{account="marketing"} 1.0' in body.decode()


def test_a_missing_key_variable_is_one_line_naming_it(rig: TwoAccounts, monkeypatch: pytest.MonkeyPatch) -> None:
    from worker.errors import ConfigError

    monkeypatch.delenv(KEY_B_VARIABLE)
    with pytest.raises(ConfigError) as caught:
        Accounts.from_settings(rig.settings).require_keys()
    [line] = str(caught.value).splitlines()
    assert line.startswith(f"{KEY_B_VARIABLE} is not set") and "'marketing'" in line


def test_worker_processes_send_and_drain_both_accounts(sandbox_b: SandboxProcess) -> None:
    """Real worker and clock processes with two accounts: every job is sent once through its lane's
    account, every report of both is drained and applied, and neither key is in any process's log."""
    from tests.support.system import BASE_ENV, System, launch

    sandbox_b.reset()
    sandbox_b.configure(**{**NO_FAULTS, "report_delay_ms": 50})
    env = {
        **BASE_ENV, KEY_B_VARIABLE: KEY_B,
        "SMS_ACCOUNTS": json.dumps({"marketing": {"base_url": sandbox_b.url, "api_key_env": KEY_B_VARIABLE,
                                                  "rate_limit_mps": 2000}}),
        "SMS_LANES": json.dumps({"otp": {"batch_size": 100, "max_wait_ms": 0},
                                 "bulk": {"batch_size": 500, "max_wait_ms": 50, "account": "marketing"}}),
    }
    flags = ("--report-delay-ms", "50", "--logs-rate-per-min", "100000", "--seed", "3")
    with launch(System, env, flags, workers=1, clocks=1, web=False) as system:
        system.outbox.enqueue_many(_jobs(20, "otp"), "otp")
        system.outbox.enqueue_many(_jobs(300, "bulk"), "bulk")

        def finals() -> int:
            return sum(1 for e in system.events() if e["type"] not in ("accepted", "queued"))

        try:
            wait_until(lambda: finals() >= 320, 20, "a final report for each of the 320 messages", interval_s=0.1)
        finally:
            logs = system.stack.logs()
        stats_a, stats_b = system.stats(), sandbox_b.stats()
        sources = {f[b"src"].decode() for _, f in system.client.xrange(system.store.reports_raw)}
        lanes_by_type = {(e["lane"], e["type"]) for e in system.events()}
    assert (stats_a["messages_accepted"], stats_b["messages_accepted"]) == (20, 300)
    assert stats_a["duplicates"] == 0 and stats_b["duplicates"] == 0
    assert {lane for lane, _ in lanes_by_type} == {"otp", "bulk"}
    # Processed pages are deleted from the raw stream; whatever is left must be tagged by its account.
    assert sources <= {"drain", "drain:marketing"}
    assert KEY_B not in logs and API_KEY not in logs


def test_the_webhook_takes_each_account_s_secret_and_tags_its_pages(
    settings: Settings, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A call with SMS_WEBHOOK_SECRET is stored as `webhook`, one with marketing's own secret as
    `webhook:marketing`; any other is 401 and stores nothing. An unset webhook_secret_env stops the
    web process at start-up, naming the variable."""
    from tests.integration.test_web import BODY, JSON, PATH, Served
    from worker.errors import ConfigError
    from worker.web import SECRET_HEADER, create_app

    default_secret, marketing_secret = "default-webhook-secret-7f3a", "marketing-webhook-secret-91bd"
    changes = {"sms_webhook_secret": default_secret, "sms_accounts": json.dumps({"marketing": {
        "base_url": "http://127.0.0.1:9", "api_key_env": KEY_B_VARIABLE, "webhook_secret_env": "MARKETING_HOOK"}})}
    configured = Settings.model_validate({**settings.model_dump(), **changes})
    with pytest.raises(ConfigError, match=r"^MARKETING_HOOK is not set: .*'marketing'"):
        create_app(configured, store=store, wake=lambda: None)
    monkeypatch.setenv("MARKETING_HOOK", marketing_secret)
    with Served(create_app(configured, store=store, wake=lambda: None)) as client:
        answers = [client.post(PATH, content=BODY, headers={**JSON, SECRET_HEADER: secret}).status_code
                   for secret in (default_secret, marketing_secret, "not-the-secret-of-anyone")]
    assert answers == [200, 200, 401]
    assert [f[b"src"] for _, f in store.r.xrange(store.reports_raw)] == [b"webhook", b"webhook:marketing"]
