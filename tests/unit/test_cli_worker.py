"""`sms-worker worker --lanes/--skip-lanes`: which lanes and Dramatiq queues a worker process takes."""

from __future__ import annotations

import pytest

from worker.cli import _worker_queues
from worker.errors import SmsWorkerError
from worker.settings import load_settings

SETTINGS = load_settings(
    icomm_api_key="k" * 20,
    sms_lanes={"otp": {"max_wait_ms": 0, "concurrency": 2}, "bulk": {}, "alerts": {"max_wait_ms": 0}},
)


def test_by_default_a_worker_takes_every_queue() -> None:
    assert _worker_queues(SETTINGS, None, None) == (["otp", "bulk", "alerts"], None)


def test_lanes_takes_only_those_lanes_dispatch_queues() -> None:
    assert _worker_queues(SETTINGS, "otp,alerts", None) == (["otp", "alerts"], ["sms-lane-otp", "sms-lane-alerts"])


def test_skip_lanes_takes_the_shared_queue_and_every_other_lane() -> None:
    assert _worker_queues(SETTINGS, None, "otp") == (["bulk", "alerts"], ["sms", "sms-lane-bulk", "sms-lane-alerts"])


@pytest.mark.parametrize(("only", "skip", "message"), [
    ("otp", "bulk", "not both"),
    ("otp,sms", None, "unknown lane(s) sms; SMS_LANES has otp, bulk, alerts"),
    (None, "nope", "unknown lane(s) nope"),
])
def test_mistakes_are_refused_with_a_clear_message(only: str | None, skip: str | None, message: str) -> None:
    with pytest.raises(SmsWorkerError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _worker_queues(SETTINGS, only, skip)
