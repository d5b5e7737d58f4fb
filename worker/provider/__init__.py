"""The icomm SMS API client: the only code that knows URLs, the `App` key header and the wire JSON.

    wire.py       the send request's JSON (`wire_message_from_dict`, `wire_request`, the TypedDicts)
    query.py      the GETs' query strings, checked locally (`chunk_message_ids`, `format_datetime`)
    responses.py  the typed answers of a send and of a logs GET (`SendResponse`, `LogEntry`)
    classify.py   HTTP status / httpx error -> `worker.errors` class (the table), `Retry-After`
    retries.py    which failures are retried, and how long to wait
    fence.py      the send fence, asked at the socket right before the first byte is written
    client.py     `Provider` (pool, attempts, pool healing) and its `ProviderConfig`

Delivery reports are fetched here (`Provider.reports_raw`, raw bytes) but parsed in
`worker.reports.parse`. Import from `worker.provider`; the modules are its parts.
"""

from __future__ import annotations

from worker.provider.client import Provider, ProviderConfig
from worker.provider.fence import FENCE_WRITE_GRACE_S
from worker.provider.query import (
    LOGS_PATH,
    MAX_FILTER_CHARS,
    MAX_PAGE_SIZE,
    REPORTS_PATH,
    GeneralStatus,
    chunk_message_ids,
    format_datetime,
)
from worker.provider.responses import (
    LogEntry,
    MessageError,
    MessagePrice,
    MessageStatus,
    PlatformIds,
    SendResponse,
    SendResult,
)
from worker.provider.retries import RETRY_WAIT_CEILING_S
from worker.provider.wire import (
    SEND_PATH,
    WireBinaryContent,
    WireDelivery,
    WireDestination,
    WireLanguage,
    WireMessage,
    WireMessageOptions,
    WireRequest,
    WireTextContent,
    WireWebhooks,
    wire_message_from_dict,
    wire_request,
)

__all__ = [
    "FENCE_WRITE_GRACE_S",
    "LOGS_PATH",
    "MAX_FILTER_CHARS",
    "MAX_PAGE_SIZE",
    "REPORTS_PATH",
    "RETRY_WAIT_CEILING_S",
    "SEND_PATH",
    "GeneralStatus",
    "LogEntry",
    "MessageError",
    "MessagePrice",
    "MessageStatus",
    "PlatformIds",
    "Provider",
    "ProviderConfig",
    "SendResponse",
    "SendResult",
    "WireBinaryContent",
    "WireDelivery",
    "WireDestination",
    "WireLanguage",
    "WireMessage",
    "WireMessageOptions",
    "WireRequest",
    "WireTextContent",
    "WireWebhooks",
    "chunk_message_ids",
    "format_datetime",
    "wire_message_from_dict",
    "wire_request",
]
