"""Webhook ingest: sort a pushed body into good reports and dead letters, and store both at once."""

from __future__ import annotations

import orjson
import structlog

from worker import metrics
from worker.reports.parse import WebhookBody, sort_webhook_body
from worker.store import Store

log = structlog.get_logger("worker.reports")


def ingest_webhook(store: Store, body: bytes, source: str = "webhook") -> WebhookBody:
    """Validate a webhook body and store it: its good reports in the raw stream (the body verbatim
    when all are good), its malformed ones in the dead letters, in one MULTI/EXEC.

    Raises WebhookBodyError (nothing stored) or StoreError (a Redis that refuses writes, out of memory
    or read-only, discards the whole transaction; should a part ever be written, the provider's retry
    repeats it, and processing is idempotent). The caller answers 200 only after this returns, so the
    provider retries whatever did not reach Redis.
    """
    sorted_out = sort_webhook_body(body)
    if sorted_out.page is None and not sorted_out.dead:
        return sorted_out  # `{results: []}`: nothing to keep
    store.store_webhook_reports(sorted_out.page, sorted_out.dead, source)
    if sorted_out.dead:
        problems = [orjson.loads(entry)["detail"] for _, entry in sorted_out.dead]
        log.warning("webhook_reports_dead_lettered", reason="report_malformed", reports=len(problems),
                    kept=sorted_out.reports, details=problems[:5],
                    detail="kept in the dead letters (`sms-worker dlq list`); the body's good reports are stored")
        metrics.REPORTS.labels("webhook", "dead_letters").inc(len(problems))
    return sorted_out
