"""The producer client other services import: `Client` (threads) and `AsyncClient` (asyncio), the same methods.

    from worker.client import Client

    with Client.from_env() as sms:
        sms.send("41793026727", "Your code is 123456", lane="otp", id="otp-8812")

Importing it loads the job model, the Outbox and the store, and Dramatiq's broker for the wake-ups:
no actors, no dispatcher, no provider client, no web stack (tests/unit/test_client_imports.py).
"""

from __future__ import annotations

from worker.campaigns import Campaign
from worker.cancel import CancelAnswer, CancelOutcome
from worker.client.aio import AsyncClient
from worker.client.common import ClientConfig, MessageStatus
from worker.client.sync import Client
from worker.errors import EnqueueIncomplete, JobValidationError, Problem, StoreError, StoreUnavailable
from worker.models import State
from worker.outbox import Enqueued

__all__ = [
    "AsyncClient", "Campaign", "CancelAnswer", "CancelOutcome", "Client", "ClientConfig", "EnqueueIncomplete",
    "Enqueued", "JobValidationError", "MessageStatus", "Problem", "State", "StoreError", "StoreUnavailable",
]
