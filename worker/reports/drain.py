"""The drain: pages of the once-only GET /sms/3/reports, stored before anything parses them.

One drain at a time holds the `reports-drain` lease; each page is appended with its fencing token
(report_append.lua), and only then counted and handed to the processor. A page the provider handed
out lives in memory until Redis takes it, and no further page is fetched meanwhile: at most one
page per process is ever at risk, and the last words of a process that exits with one say so.
"""

from __future__ import annotations

import atexit
import contextlib
import re
import threading
import time
import uuid
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Protocol

import structlog

from worker import events, metrics
from worker.errors import ProviderAuthError, ProviderError, StoreError
from worker.settings import DEFAULT_ACCOUNT, Settings
from worker.store import Store, consumer_name
from worker.triggers import DRAIN_REPORTS

if TYPE_CHECKING:
    from worker.accounts import Account

log = structlog.get_logger("worker.reports")

DRAIN_LEASE: Final = "reports-drain"
PAGE_SIZE: Final = 1000  # the reports endpoint's maximum `limit`
# A drain stops after this many full pages and hands over to a fresh actor message, so one message
# never holds the lease (and a worker thread) for long while a big backlog comes in.
MAX_PAGES_PER_DRAIN: Final = 50
# Storing a page the provider already handed out is retried for as long as Redis refuses it (out
# of memory, restarting, unreachable), backing off up to STORE_BACKOFF_MAX_S between attempts.
STORE_BACKOFF_S: Final = 0.05
STORE_BACKOFF_MAX_S: Final = 1.0

# An empty page, recognised without parsing it: an idle drain stores nothing.
_EMPTY_PAGE: Final = re.compile(rb'\s*\{\s*"results"\s*:\s*\[\s*\]\s*\}\s*')


class Wake(Protocol):
    """How report code wakes other actors (worker.triggers.Triggers in production)."""

    def process_reports(self) -> None: ...

    def send(self, actor: str, *args: Any, delay_ms: int = 0) -> None: ...


class ReportSource(Protocol):
    """The one provider call the drainer needs (worker.provider.Provider)."""

    def reports_raw(
        self,
        *,
        limit: int = PAGE_SIZE,
        entity_id: str | None = None,
        application_id: str | None = None,
        campaign_reference_id: str | None = None,
    ) -> bytes: ...


@dataclass(frozen=True, slots=True)
class DrainConfig:
    """The settings the drainer reads."""

    # The lease outlives the longest reports GET (SMS_LEASE_S is validated against the request
    # timeouts), and it is renewed before each page.
    lease_ms: int
    entity_id: str | None = None
    application_id: str | None = None
    campaign_reference_id: str | None = None
    # Whose reports (worker.accounts): the default account's keep today's lease and page source.
    account: str = DEFAULT_ACCOUNT
    lease: str = DRAIN_LEASE
    source: str = "drain"

    @classmethod
    def from_settings(cls, settings: Settings, account: Account | None = None) -> DrainConfig:
        """The default account's drain, or `account`'s (its entityId/applicationId filters)."""
        if account is None:
            return cls(
                lease_ms=int(settings.sms_lease_s * 1000),
                entity_id=settings.sms_reports_entity_id,
                application_id=settings.sms_reports_application_id,
                campaign_reference_id=settings.sms_reports_campaign_reference_id,
            )
        return cls(
            lease_ms=int(settings.sms_lease_s * 1000), entity_id=account.entity_id,
            application_id=account.application_id,
            campaign_reference_id=settings.sms_reports_campaign_reference_id,
            account=account.name, lease=account.drain_lease, source=account.drain_source,
        )

    def filters(self) -> dict[str, str | None]:
        """The reports GET's filters (SMS_REPORTS_*): which reports this worker drains."""
        return {"entity_id": self.entity_id, "application_id": self.application_id,
                "campaign_reference_id": self.campaign_reference_id}


@dataclass(frozen=True, slots=True)
class DrainResult:
    outcome: str  # drained, page_limit, busy, lease_lost, fenced (page stored), auth_error, provider_error
    pages: int = 0
    reports: int = 0


def _count_results(raw: bytes) -> int:
    """Reports in a raw page, by their `messageId` keys: parsing a 1000-report page just to count it
    cost 4 ms on the drain's critical path. An item without one is under-counted, which at worst
    ends this drain a page early; the next drain fetches the rest."""
    return raw.count(b'"messageId"')


@dataclass(slots=True)
class _Held:
    """A page the provider handed out that is not in Redis yet: it lives only in this process."""

    page: bytes
    reports: int
    holder: str  # the drain lease's holder id of the drain that fetched it
    token: int
    since: float = field(default_factory=time.monotonic)


@dataclass(slots=True)
class _Run:
    """One drain so far: pages and reports stored, and how it ends (page_limit while it goes on)."""

    holder: str
    pages: int = 0
    reports: int = 0
    outcome: str = "page_limit"


# The drainers of this process, for the last words of one that exits with a page unstored (its
# reports are then only in the provider's logs, which the no-report sweep asks).
_DRAINERS: weakref.WeakSet[Drainer] = weakref.WeakSet()


def _last_words() -> None:
    for drainer in list(_DRAINERS):
        if drainer._held is not None:
            log.error("reports_page_unstored", reports=drainer._held.reports, reason="process exiting",
                      detail="a fetched page never reached Redis; the no-report sweep recovers its reports "
                             "from GET /sms/3/logs once their deadline passes")


# threading's exit hooks run however a Python process ends normally, Dramatiq's forked worker
# processes included (multiprocessing leaves them with os._exit, which skips atexit).
getattr(threading, "_register_atexit", atexit.register)(_last_words)


class Drainer:
    """Drains of the once-only reports endpoint under the `reports-drain` lease (one per process)."""

    def __init__(
        self, config: DrainConfig, store: Store, provider: ReportSource, wake: Wake | None = None,
        *, max_pages: int = MAX_PAGES_PER_DRAIN, stopping: Callable[[], bool] | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.provider = provider
        self.wake = wake
        self.max_pages = max_pages
        # True once the process is shutting down: a page still unstored is then given up, loudly.
        self.stopping = stopping or (lambda: False)
        self.lease_ms = config.lease_ms
        self.filters = config.filters()
        self._held: _Held | None = None
        self._draining = threading.Lock()
        self._more = False  # the drain in progress stopped at its page budget: hand over when it ends
        _DRAINERS.add(self)

    def append(self, page: bytes, token: int) -> bool:
        """Write one raw page; returns whether `token` is still the current fencing token.

        The page is written either way: the provider handed it out once and for all, and
        processing is idempotent, so a page fetched by a drainer that lost its lease during the GET
        is applied like any other (it used to be dead-lettered as drain_fenced, where nothing read
        it). A stale token only tells this drainer to stop fetching."""
        return self.store.append_report_page(page, token, self.config.lease, source=self.config.source)

    def _account_arg(self) -> str | None:
        """The account as the drain actor and the last-drain record name it: None for the default one."""
        return None if self.config.account == DEFAULT_ACCOUNT else self.config.account

    # --- storing a fetched page ------------------------------------------------------------------
    def _store(self, held: _Held) -> bool:
        """Write the fetched page `held`, retrying for as long as Redis refuses it; returns whether
        its token is still current.

        Until it is written the page is kept in self._held, and the caller fetches no further page,
        so at most one page per process is ever at risk. Between attempts the lease is renewed
        (PEXPIRE is allowed even out of memory), so no other drainer fetches meanwhile either. Only a
        process that stops gives it up, loudly; an interrupted call (Dramatiq's time limit) leaves it
        held, and this process's next drain writes it before fetching anything."""
        self._held = held
        attempt = 0
        try:
            while True:
                try:
                    current = self.append(held.page, held.token)
                    break
                except StoreError as error:
                    attempt += 1
                    self._before_retry(held, attempt, error)
        except BaseException as error:
            if not isinstance(error, StoreError):
                log.error("reports_page_unstored", reports=held.reports, reason=type(error).__name__,
                          detail="interrupted; kept in memory, the next drain of this process stores it first")
            raise
        self._held = None
        if attempt:
            log.warning("reports_page_stored", reports=held.reports, attempts=attempt + 1,
                        held_s=round(time.monotonic() - held.since, 1))
        return current

    def _before_retry(self, held: _Held, attempt: int, error: StoreError) -> None:
        """After a refused write: give up if the process stops, else back off and renew the lease."""
        metrics.REPORT_PAGE_STORE_RETRIES.inc()
        held_s = round(time.monotonic() - held.since, 1)
        if self.stopping():
            log.error("reports_page_unstored", reports=held.reports, reason="process stopping",
                      held_s=held_s, error=str(error))
            raise error
        log.warning("reports_page_store_retry", reports=held.reports, attempt=attempt, held_s=held_s,
                    error=str(error), detail="kept in memory; no page is fetched until it is stored")
        time.sleep(min(STORE_BACKOFF_MAX_S, STORE_BACKOFF_S * 2 ** min(attempt, 10)))
        with contextlib.suppress(StoreError):
            token = self.store.lease(self.config.lease, held.holder, self.lease_ms)
            held.token = token or held.token

    # --- a drain ---------------------------------------------------------------------------------
    def drain(self) -> DrainResult:
        # One drain at a time in a process: a held page is this process's alone to store first.
        if not self._draining.acquire(blocking=False):
            return DrainResult("busy")
        self._more = False
        try:
            return self._drain()
        finally:
            more = self._more  # read while the lock is ours: the next drain resets it
            self._draining.release()
            # Handed over only now: a follow-up taken at once by a sibling thread of this process
            # while this drain still held the lock would find it busy and end there, and nothing
            # would drain until the clock's next interval (seen in bench scenario 5 as a stall).
            if more and self.wake is not None:
                self.wake.send(DRAIN_REPORTS, *([] if self._account_arg() is None else [self.config.account]))

    def _drain(self) -> DrainResult:
        started = time.perf_counter()
        held = self._held
        run = _Run(held.holder if held else f"{consumer_name()}:{uuid.uuid4().hex[:12]}")
        token = self.store.lease(self.config.lease, run.holder, self.lease_ms)
        if not token and held is None:
            log.debug("reports_drain_skipped", reason="another drainer holds the lease")
            return DrainResult("busy")
        try:
            if held is not None:
                self._store_held_first(run, held, token)
            while run.outcome == "page_limit" and run.pages < self.max_pages:
                self._next_page(run)
        finally:
            self._end(run, started)
        if run.outcome in ("drained", "page_limit"):
            with contextlib.suppress(StoreError):
                self.store.record_last_drain({"at": events.now_iso(), "pages": run.pages, "reports": run.reports,
                                              "outcome": run.outcome}, account=self._account_arg())
        return DrainResult(run.outcome, run.pages, run.reports)

    def _store_held_first(self, run: _Run, held: _Held, token: int) -> None:
        """A page an earlier drain of this process fetched and could not store: stored first of all,
        whoever holds the lease now."""
        held.token = token or held.token
        stored_current = self._store(held)
        run.pages, run.reports = 1, held.reports
        if self.wake is not None:
            self.wake.process_reports()
        if not token or not stored_current:
            run.outcome = "lease_lost"

    def _next_page(self, run: _Run) -> None:
        """Renew the lease, fetch one page and store it; sets run.outcome when the drain ends."""
        token = self.store.lease(self.config.lease, run.holder, self.lease_ms)
        if not token:
            run.outcome = "lease_lost"
            return
        raw = self._fetch(run)
        if raw is None:
            return
        if _EMPTY_PAGE.fullmatch(raw):
            run.outcome = "drained"
            return
        # Durable first: only then is the page parsed (here, just counted).
        count = _count_results(raw)
        current = self._store(_Held(raw, count, run.holder, token))
        run.pages += 1
        run.reports += count
        if not current:
            run.outcome = "fenced"
            log.error("reports_drain_lease_lost", reports=count, token=token,
                      detail="the lease was taken over during the GET (a pause?): the page is stored "
                             "and will be applied; this drainer fetches no further page")
            return
        if self.wake is not None:
            self.wake.process_reports()  # processing overlaps the next GET (kicks are de-duplicated)
        if count < PAGE_SIZE:
            run.outcome = "drained"

    def _fetch(self, run: _Run) -> bytes | None:
        """One GET of the reports endpoint; None (and the outcome set) when the provider fails."""
        try:
            return self.provider.reports_raw(limit=PAGE_SIZE, **self.filters)
        except ProviderAuthError as error:
            run.outcome = "auth_error"
            log.error("reports_drain_auth_failed", account=self.config.account, status=error.status_code,
                      error=str(error))
        except ProviderError as error:
            # An ambiguous GET may have handed out a page we never saw: nothing can bring it back
            # (the logs endpoint can, per message, for 48 h).
            run.outcome = "provider_error"
            log.warning("reports_drain_failed", account=self.config.account, error_class=type(error).__name__,
                        status=error.status_code, error=str(error))
        return None

    def _end(self, run: _Run, started: float) -> None:
        """Release the lease (unless a page is still held), hand over if more may wait, log the drain."""
        if self._held is None:
            # (With a page still held the lease is kept until it expires: nobody fetches meanwhile.)
            with contextlib.suppress(StoreError):
                self.store.release_lease(self.config.lease, run.holder)
        # More may be waiting: a fresh message carries on (the default account's takes no argument),
        # sent by drain() once this one has let go of the process's drain lock.
        self._more = run.outcome == "page_limit"
        log.info("reports_drained", account=self.config.account, pages=run.pages, reports=run.reports,
                 outcome=run.outcome, duration_ms=round((time.perf_counter() - started) * 1000, 1))
