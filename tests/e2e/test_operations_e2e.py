"""The operator's tools against a running system: every CLI command, the metrics and the health endpoints."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import orjson

from tests.support.system import System, jobs, running
from worker.cli import build_parser
from worker.devtools.devstack import free_port, wait_until


def _cli(system: System, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **system.stack.env}
    done = subprocess.run([sys.executable, "-m", "worker.cli", *args], env=env, capture_output=True, text=True,
                          timeout=60, check=False)
    if ok:
        assert done.returncode == 0, done.stderr
    return done


def test_every_command_has_help_with_examples() -> None:
    """`sms-worker COMMAND --help` shows an example for every command."""
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    for name, sub in commands.items():
        assert "example" in (sub.epilog or ""), name


def test_cli_metrics_and_health_against_a_running_system(tmp_path: Path) -> None:
    """status, dlq, logs, reconcile, check and enqueue work on a live system; metrics carry the series."""
    metrics_port = free_port()
    with running(env={"SMS_METRICS_PORT": str(metrics_port)}, workers=1) as system:
        queued = system.outbox.enqueue_many(jobs(300), "bulk")
        system.client.xadd(system.store.outbox("bulk"), {"job": b'{"to":"12","text":"bad"}'})
        system.client.xadd(system.store.outbox("bulk"), {"job": b"not json"})
        system.wait_for_send_outcomes(302, 60)

        status = orjson.loads(_cli(system, "status", "--json").stdout)
        assert {lane["lane"] for lane in status["lanes"]} == {"otp", "bulk"}
        assert status["dead_letters"] == 2
        assert status["awaiting_reports"] == 300
        wait_until(lambda: any(w["alive"] for w in orjson.loads(_cli(system, "status", "--json").stdout)["workers"]),
                   15, "a worker heartbeat")
        wait_until(lambda: orjson.loads(_cli(system, "status", "--json").stdout)["last_drain"] is not None,
                   15, "a reports drain to be recorded")
        assert "dead letters:" in _cli(system, "status").stdout
        # The devstack's Redis is volatile on purpose (SMS_REDIS_ALLOW_VOLATILE=true): said, accepted.
        assert status["redis"]["persistence"] == "none" and status["redis"]["data_since"] is not None
        assert [(f["risk"], f["acknowledged"]) for f in status["redis"]["findings"]] == [("no_persistence", True)]
        assert "accepted" in _cli(system, "status").stdout

        listed = orjson.loads(_cli(system, "dlq", "list", "--json").stdout)
        assert sorted(d["reason"] for d in listed) == ["invalid_job", "invalid_job"]
        shown = orjson.loads(_cli(system, "dlq", "show", listed[0]["message_id"]).stdout)
        assert shown["dlq_id"] == listed[0]["dlq_id"]
        # An invalid job is not replayed without --force: it would only be dead-lettered again.
        refused = _cli(system, "dlq", "replay", listed[0]["dlq_id"], ok=False)
        assert refused.returncode == 1 and "fails validation again" in refused.stderr
        assert "replayed 1" in _cli(system, "dlq", "replay", listed[0]["dlq_id"], "--force").stdout
        # Forced, it is refused again, with its reason, and nothing else is affected.
        wait_until(lambda: len(orjson.loads(_cli(system, "dlq", "list", "--json").stdout)) == 2, 20,
                   "the replayed job to be dead-lettered again")
        assert "purged 2" in _cli(system, "dlq", "purge", "--all", "--yes").stdout
        missing = _cli(system, "dlq", "show", "no-such-id", ok=False)
        assert missing.returncode == 1
        assert missing.stderr.strip().count("\n") == 0 and "Traceback" not in missing.stderr

        logs = orjson.loads(_cli(system, "logs", "--message-id", queued[0].message_id, "--json").stdout)
        assert [entry["messageId"] for entry in logs] == [queued[0].message_id]
        bad = _cli(system, "logs", "--mnc", "01", ok=False)
        assert bad.returncode == 1 and "mcc" in bad.stderr

        reconciled = orjson.loads(_cli(system, "reconcile", "--message-id", queued[1].message_id, "--json").stdout)
        # Accepted and still awaiting its report: looked up in the provider's logs (not final yet there).
        assert reconciled["looked_up"] == 1 and reconciled["states"][queued[1].message_id] == "ACCEPTED"

        checked = _cli(system, "check").stdout
        assert "icomm API: ok" in checked and "maxmemory-policy noeviction" in checked
        assert "redis accepted: Redis persistence is off" in checked
        assert "queued:" in _cli(system, "enqueue", "--to", "41793026727", "--text", "hi", "--lane", "otp").stdout
        csv_file = tmp_path / "people.csv"
        csv_file.write_text("to,name\n41790000001,Ana\n12,Bob\n41790000003,\n")
        csv_run = _cli(system, "enqueue", "--csv", str(csv_file), "--text-template", "Hi {name}", ok=False)
        assert csv_run.returncode == 1  # all or nothing: the good row is not queued either
        assert "nothing queued" in csv_run.stderr and "line 3:" in csv_run.stderr and "line 4:" in csv_run.stderr

        metrics = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
        for series in ("sms_messages_total", "sms_batch_size", "sms_provider_request_seconds",
                       "sms_dead_letters_total", "sms_events_published_total", "sms_outbox_depth",
                       "sms_outbox_oldest_age_seconds", "sms_parked_reports", "sms_redis_up",
                       "sms_limiter_wait_seconds", "sms_report_lag_seconds", "sms_lane_paused",
                       'sms_redis_config_risk{risk="no_persistence"} 1.0',
                       'sms_redis_config_risk{risk="eviction"} 0.0'):
            assert series in metrics, series
        accepted = [
            line for line in metrics.splitlines()
            if line.startswith("sms_messages_total{") and 'lane="bulk"' in line and 'outcome="accepted"' in line
        ]
        assert len(accepted) == 1 and float(accepted[0].rsplit(" ", 1)[1]) >= 300, accepted
        assert httpx.get(f"http://127.0.0.1:{metrics_port}/healthz", timeout=5).status_code == 200
