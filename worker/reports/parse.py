"""The one report parser: raw pages (drain, webhook, logs) and webhook bodies, with one set of checks.

A report is checked in two layers, shared by both entry points:

- `identity_problem`: is it an object with a non-empty string messageId? Without that a report
  cannot be tied to a message, wherever it came from.
- `field_problem`: do the contract's DeliveryReport fields (api/contract.md section 3) have their
  JSON types? Only a webhook body is held to this (the caller is told, with the field); a page
  the provider handed out is applied as it came, since refusing it would lose it.

`parse_page(entry_id, fields) -> Page` never raises: whatever cannot be processed becomes a dead
letter (worker.deadletters.report_dead_letter, the one format). `validate_webhook_body(body) -> int`
and `sort_webhook_body(body)` raise WebhookBodyError for an envelope that is wrong; the latter sorts
the reports of a right one into good and dead.

Status groups come from worker.statuses (the one table of them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final, NamedTuple

import orjson

from worker.deadletters import report_dead_letter
from worker.statuses import FINAL_GROUPS, INTERMEDIATE_GROUPS, group_of

# Bounds on what any entry may hold (webhook bodies are refused past them, other pages isolated).
# A report page is 4 levels deep ({results: [{status: {...}}]}); orjson reads 1,024 levels but
# writes only 254, so a report nested deeper than that could be parsed and never published.
MAX_DEPTH: Final = 32
# A full page of 1,000 reports is ~0.6 MB (~5 MB with 4,000-character callbackData on each).
MAX_PAGE_BYTES: Final = 16 * 1024 * 1024

# DeliveryReport fields and their JSON types (api/contract.md section 3); None is allowed for each.
STRING_FIELDS: Final = ("bulkId", "to", "sender", "sentAt", "doneAt", "mccMnc", "callbackData",
                        "campaignReferenceId")
OBJECT_FIELDS: Final = ("price", "status", "error", "platform")

_CONTAINERS: Final = (dict, list)


class WebhookBodyError(ValueError):
    """A webhook body that is not `{results: [DeliveryReport, ...]}`; the message says why."""


class FinalReport(NamedTuple):
    """A report with a final status group, as the processor needs it."""

    message_id: str
    group: str
    status_name: str
    item: dict[str, Any]
    source: str = "?"  # its page's source (drain, webhook, logs...)


@dataclass(slots=True)
class Page:
    """One raw stream entry, parsed: final reports, intermediate count, and what to dead-letter."""

    entry_id: str
    source: str
    finals: list[FinalReport] = field(default_factory=list)
    intermediate: int = 0
    dead: list[tuple[str, bytes]] = field(default_factory=list)
    unknown_status: dict[str, int] = field(default_factory=dict)  # status group -> reports (dead-lettered)


class WebhookBody(NamedTuple):
    """A webhook body sorted out: the page to store, and the reports to dead-letter instead."""

    page: bytes | None  # the body itself when every report is good, else the good ones; None: none
    reports: int  # good reports in `page`
    dead: list[tuple[str, bytes]]  # (messageId or "", dead-letter JSON) per malformed report


# --- the per-report checks ---------------------------------------------------------------------------


class Problem(NamedTuple):
    """What is wrong with one report: the field at fault ("" for the report itself), what it must be."""

    field: str
    must: str

    def for_webhook(self, index: int) -> str:
        """As the webhook caller is told it: `results[3].to must be a string`."""
        where = f"results[{index}].{self.field}" if self.field else f"results[{index}]"
        return f"{where} must {self.must}"

    def for_page(self) -> str:
        """As a page's dead letter says it (the wording the drain has always used)."""
        if not self.field:
            return "report is not a JSON object"
        return "report has no messageId"


def identity_problem(item: object) -> Problem | None:
    """Whether a report can be tied to a message: an object with a non-empty string messageId."""
    if not isinstance(item, dict):
        return Problem("", "be an object")
    message_id = item.get("messageId")
    if not isinstance(message_id, str) or not message_id:
        return Problem("messageId", "be a non-empty string")
    return None


def field_problem(item: dict[str, Any]) -> Problem | None:
    """The first contract field of a report with the wrong JSON type, or None."""
    for name in STRING_FIELDS:
        value = item.get(name)
        if value is not None and not isinstance(value, str):
            return Problem(name, "be a string")
    for name in OBJECT_FIELDS:
        value = item.get(name)
        if value is not None and not isinstance(value, dict):
            return Problem(name, "be an object")
    count = item.get("messageCount")
    if count is not None and (not isinstance(count, int) or isinstance(count, bool)):
        return Problem("messageCount", "be an integer")
    return None


def report_problem(item: object) -> Problem | None:
    """Why an item is not a DeliveryReport (contract section 5), or None when it is one."""
    problem = identity_problem(item)
    if problem is None and isinstance(item, dict):
        problem = field_problem(item)
    return problem


def unknown_group(status: object) -> str | None:
    """The name (or groupId) of a status group that is readable but not known here, else None."""
    if not isinstance(status, dict) or group_of(status) is not None:
        return None
    name = status.get("groupName")
    if isinstance(name, str) and name.strip():
        return name[:64]
    group_id = status.get("groupId")
    if name is None and isinstance(group_id, int) and not isinstance(group_id, bool):
        return f"groupId {group_id}"
    return None


def message_id_of(item: object) -> str:
    """A report's messageId when it has a string one, else "" (what a dead letter is filed under)."""
    message_id = item.get("messageId") if isinstance(item, dict) else None
    return message_id if isinstance(message_id, str) else ""


def too_deep(value: object, limit: int) -> bool:
    """Whether `value` nests more than `limit` containers deep (a scalar is 0, `{}` is 1)."""
    if limit >= 2 and type(value) is dict and _shallow(value):
        return False
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if type(node) not in _CONTAINERS:
            continue
        if depth > limit:
            return True
        children = node.values() if type(node) is dict else node
        stack.extend((child, depth + 1) for child in children)
    return False


def _shallow(value: dict[str, Any]) -> bool:
    """Whether an object is at most two levels deep: the common report (its price, status, error and
    platform objects hold scalars only), told without a stack."""
    for child in value.values():
        if type(child) is list:
            return False
        if type(child) is dict and any(type(grandchild) in _CONTAINERS for grandchild in child.values()):
            return False
    return True


# --- pages -------------------------------------------------------------------------------------------


def parse_page(entry_id: str, fields: dict[bytes, bytes] | None) -> Page:
    """A raw entry -> Page; never raises: malformed pages and items become dead letters.

    Deliberately lean (no typed object per report): the processor only needs the messageId and the
    status group, at 50k reports/s. Every page is held to the same bounds as a webhook body whatever
    its source (drain, webhook, logs, a plain XADD): a report nested deeper than MAX_DEPTH is
    dead-lettered alone (~2 us per report to check), a page larger than MAX_PAGE_BYTES whole, unparsed.
    """
    fields = fields or {}
    page = Page(entry_id, fields.get(b"src", b"?").decode("ascii", "replace"))
    results = _page_results(page, fields.get(b"page"))
    for item in results or ():
        _sort_item(page, item)
    return page


def _page_results(page: Page, raw: bytes | None) -> list[Any] | None:
    """The `results` list of a raw page, or None with the whole page dead-lettered in `page`."""
    if raw is None:
        problem, body = ("report_page_malformed", "raw entry has no page field"), None
    elif len(raw) > MAX_PAGE_BYTES:
        problem = ("report_page_too_large", f"{len(raw)} bytes, at most {MAX_PAGE_BYTES}")
        body = raw.decode("utf-8", "replace")
    else:
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError as error:
            problem = ("report_page_malformed", f"not JSON: {error}")
        else:
            results = data.get("results") if isinstance(data, dict) else None
            if isinstance(results, list):
                return results
            problem = ("report_page_malformed", "no 'results' list")
        body = raw.decode("utf-8", "replace")
    page.dead.append(("", report_dead_letter(*problem, page.source, page.entry_id, page=body)))
    return None


# The page's object and its results list are two levels.
_ITEM_DEPTH: Final = MAX_DEPTH - 2


def _sort_item(page: Page, item: Any) -> None:
    """File one report of a page: final, intermediate, or a dead letter with its reason."""
    if too_deep(item, _ITEM_DEPTH):
        page.dead.append((message_id_of(item), report_dead_letter(
            "report_too_deep", f"nested deeper than {MAX_DEPTH} levels", page.source, page.entry_id, item=item)))
        return
    # The common case first, with as few calls as possible: this runs 50k times a second.
    if type(item) is dict:
        message_id = item.get("messageId")
        status = item.get("status")
        if type(message_id) is str and message_id and type(status) is dict and _sort_status(
                page, message_id, status, item):
            return
    problem = identity_problem(item)
    detail = problem.for_page() if problem is not None else "report has no readable status"
    page.dead.append((message_id_of(item), report_dead_letter("report_malformed", detail, page.source,
                                                              page.entry_id, item=item)))


def _sort_status(page: Page, message_id: str, status: dict[str, Any], item: dict[str, Any]) -> bool:
    """File a report by its status group; False when the status is not readable at all."""
    group = status.get("groupName")
    if group not in FINAL_GROUPS and group not in INTERMEDIATE_GROUPS:
        group = group_of(status)
    if group in FINAL_GROUPS:
        name = status.get("name")
        page.finals.append(FinalReport(message_id, group, name if type(name) is str else group, item, page.source))
        return True
    if group is not None:
        page.intermediate += 1  # PENDING/ACCEPTED change nothing: the send already said so
        return True
    unknown = unknown_group(status)
    if unknown is None:
        return False
    # Not final, so it changes nothing and publishes nothing: the message waits for its final report
    # (or the no-report sweep). Kept in the dead letters rather than parked: parking is for reports
    # whose message is not known yet, and retrying would not make this group known. An operator sees
    # it there (`sms-worker dlq list`).
    page.unknown_status[unknown] = page.unknown_status.get(unknown, 0) + 1
    page.dead.append((message_id, report_dead_letter(
        "report_unknown_status", f"status group {unknown!r} is not known: not final, nothing changed",
        page.source, page.entry_id, item=item)))
    return True


# --- webhook bodies ----------------------------------------------------------------------------------


def _webhook_results(body: bytes) -> list[Any]:
    """The `results` list of a webhook body; WebhookBodyError when the envelope itself is wrong (not
    JSON, not `{results: [...]}`, nested deeper than MAX_DEPTH): refused whole, nothing stored."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as error:
        raise WebhookBodyError(f"body is not JSON: {error}") from None
    if not isinstance(data, dict):
        raise WebhookBodyError("body must be a JSON object {\"results\": [...]}")
    # Refused here rather than dead-lettered later: the caller is told, and nothing is stored.
    if too_deep(data, MAX_DEPTH):
        raise WebhookBodyError(f"body is nested deeper than {MAX_DEPTH} levels")
    results = data.get("results")
    if not isinstance(results, list):
        raise WebhookBodyError("'results' must be a list of delivery reports")
    return results


def validate_webhook_body(body: bytes) -> int:
    """Check the envelope of a webhook body (contract section 5); returns its number of reports.

    Raises WebhookBodyError only for the envelope: a malformed report in it does not make the body
    a bad one (see sort_webhook_body)."""
    return len(_webhook_results(body))


def sort_webhook_body(body: bytes) -> WebhookBody:
    """Validate a webhook body: the envelope (WebhookBodyError), then each report on its own.

    One malformed report must not cost the others: answered 400, the provider retries the whole
    body and then gives up on it, good reports and all. So the good reports are kept (the body
    verbatim when all are good), and each malformed one becomes a dead letter with its reason and
    the report as it came; retrying it could not make it right."""
    results = _webhook_results(body)
    good: list[Any] = []
    dead: list[tuple[str, bytes]] = []
    for i, item in enumerate(results):
        problem = report_problem(item)
        if problem is None:
            good.append(item)
            continue
        dead.append((message_id_of(item),
                     report_dead_letter("report_malformed", problem.for_webhook(i), "webhook", "", item=item)))
    if not good:
        return WebhookBody(None, 0, dead)
    return WebhookBody(body if not dead else orjson.dumps({"results": good}), len(good), dead)
