"""The send path: claim -> validate -> record SUBMITTING -> POST -> classify -> settle with events.

    config.py      DispatchConfig: the settings the send path reads, built once
    jobs.py        an outbox entry's job, checked (parse_job; worker.models.lenient_job: as far as it parses)
    classify.py    the decisions, pure: the outcome table of docs/architecture.md ("## Outcomes"),
                   submit.lua's answers and absent.lua's verdicts -> a Decision (outcomes, actions)
    dispatcher.py  Dispatcher: the run loop and the I/O that performs the decisions

Nothing is ever resent before a reconciliation says the provider does not have it. The state
changes the scripts make are listed in worker.transitions.
"""

from __future__ import annotations

from worker.dispatch.classify import Decision, Item, PauseReason, classify_error, classify_response
from worker.dispatch.config import LISTEN_SLICE_MS, RECOVER_EVERY_S, RUN_BUDGET_S, DispatchConfig
from worker.dispatch.dispatcher import Dispatcher, Wake
from worker.dispatch.jobs import parse_job
from worker.models import lenient_job

__all__ = [
    "LISTEN_SLICE_MS", "RECOVER_EVERY_S", "RUN_BUDGET_S", "Decision", "DispatchConfig", "Dispatcher", "Item",
    "PauseReason", "Wake", "classify_error", "classify_response", "lenient_job", "parse_job",
]
