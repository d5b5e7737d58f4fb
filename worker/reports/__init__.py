"""Delivery reports: drain + webhook ingestion -> idempotent processing -> events; parking; sweeps.

The modules, in the order data flows through them:

    parse.py    the one report parser: raw pages and webhook bodies, one set of per-report checks
    ingest.py   POST webhook (web.py) -> sorted into good reports and dead letters, stored together
    drain.py    GET /sms/3/reports (once-only) -> report_append.lua (fence checked): Drainer
    ops.py      the report_apply.lua op codes and answers; ReportState (fetch rows, apply ops)
    process.py  raw pages -> parsed -> planned -> applied, isolating what fails: Processor
    parked.py   reports of messages not known yet, retried by the sweep
    sweep.py    overdue reports looked up in GET /sms/3/logs, no_report at the deadline: Sweeper

    GET /sms/3/reports --Drainer--> report_append.lua (fence checked) ----------+
    POST webhook (web.py) --ingest_webhook--> MULTI: XADD + dead letters -------+--> {p}:reports:raw
    {p}:reports:raw --Processor (XREADGROUP / XAUTOCLAIM)--> report_fetch.lua --> events built here
        --> report_apply.lua: states, events, parking, dead letters, XACK+XDEL, in one step
    Sweeper: accepted an hour ago and no report -> looked up in GET /sms/3/logs (a page, src `logs`);
             awaiting deadlines passed -> EXPIRED(no_report); parked reports retried or timed out

Every Redis call is a named method of worker.store.reports.ReportOps (keys: worker.store.keys).

Idempotency: a final state never changes again (except EXPIRED with reason no_report, which a
real report replaces), and the state check and the event write happen in the same Lua call, so a
report that comes twice (webhook and drain, a replayed page, a recovered page) gives one event.

Nothing a provider handed out is ever given up: a fetched page is kept in memory until Redis takes
it (and no further page is fetched meanwhile), a page fetched by a drainer that lost its lease is
stored like any other (idempotency makes that safe), a report or page that cannot be processed
goes to the dead letters with its body and the reason, while the rest of its batch (or webhook body)
flows on, and a report that never came at all is looked up in the provider's logs.
"""

from __future__ import annotations

from worker.reports.drain import (
    DRAIN_LEASE,
    MAX_PAGES_PER_DRAIN,
    PAGE_SIZE,
    DrainConfig,
    Drainer,
    DrainResult,
    ReportSource,
    Wake,
)
from worker.reports.ingest import ingest_webhook
from worker.reports.ops import (
    APPLIED,
    CONFLICT,
    NO_REPORT,
    NOTHING,
    PARKED,
    RAW_GROUP,
    TIMED_OUT,
    ApplyResult,
    Op,
    OpCode,
    ReportState,
    Row,
    report_event,
)
from worker.reports.parse import (
    MAX_DEPTH,
    MAX_PAGE_BYTES,
    FinalReport,
    Page,
    WebhookBody,
    WebhookBodyError,
    parse_page,
    sort_webhook_body,
    validate_webhook_body,
)
from worker.reports.process import ProcessConfig, Processor, Tally
from worker.reports.sweep import SweepConfig, Sweeper, no_report_event

__all__ = [
    "APPLIED", "CONFLICT", "DRAIN_LEASE", "MAX_DEPTH", "MAX_PAGES_PER_DRAIN", "MAX_PAGE_BYTES", "NOTHING",
    "NO_REPORT", "PAGE_SIZE", "PARKED", "RAW_GROUP", "TIMED_OUT", "ApplyResult", "DrainConfig", "DrainResult",
    "Drainer", "FinalReport", "Op", "OpCode", "Page", "ProcessConfig", "Processor", "ReportSource", "ReportState",
    "Row", "SweepConfig", "Sweeper", "Tally", "Wake", "WebhookBody", "WebhookBodyError", "ingest_webhook",
    "no_report_event", "parse_page", "report_event", "sort_webhook_body", "validate_webhook_body",
]
