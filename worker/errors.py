"""The worker's exception tree; foreign exceptions are mapped into it at the boundary modules.

    SmsWorkerError
    ├── ConfigError              a setting is missing or wrong (raised at start-up)
    ├── JobValidationError       a job was refused at enqueue; `.problems` lists every field
    ├── StoreError               Redis is unreachable or answered an error (worker.store maps redis.*)
    │   ├── StoreUnavailable     Redis unreachable, timed out or loading: an outage, not a bug
    │   └── EnqueueIncomplete    an enqueue call failed part-way; `.queued` says exactly what was written
    └── ProviderError            the icomm API (worker.provider.classify maps httpx.* and HTTP statuses)
        ├── ProviderNotActedOn   connect error, 429, 503: the request was not acted on, safe to retry
        │   ├── ProviderRateLimited   429, `.retry_after_s` when the provider said so
        │   └── SendWindowClosed      the batch's send deadline passed before a byte was written:
        │                             not sent, and never will be by this attempt (fencing)
        ├── ProviderBadRequest   400 for the whole bulk, `.violations` from the ApiError body
        ├── ProviderAuthError    401 / 403: configuration, stop sending
        └── ProviderAmbiguous    read/write timeout, 500/502/504, connection dropped after send:
                                 the provider may have acted; reconcile before any resend
"""

from __future__ import annotations

from dataclasses import dataclass


class SmsWorkerError(Exception):
    """Root of every error this package raises on purpose."""


class ConfigError(SmsWorkerError):
    """One or more settings are wrong; the message names each variable and a right example."""


@dataclass(frozen=True)
class Problem:
    """One reason a job was refused: the field path and what is wrong with it."""

    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


class JobValidationError(SmsWorkerError):
    """A job was refused at the door; nothing was written."""

    def __init__(self, problems: list[Problem], index: int | None = None) -> None:
        self.problems = problems
        self.index = index
        where = f"job #{index}: " if index is not None else ""
        super().__init__(where + "; ".join(str(p) for p in problems))


class StoreError(SmsWorkerError):
    """Redis could not be reached or refused a command."""


class StoreUnavailable(StoreError):
    """Redis is unreachable, timed out or still loading: an outage, not a bug (the work is in Redis
    and comes back when it does)."""


class EnqueueIncomplete(StoreError):
    """An enqueue call failed after part of it was written.

    `queued[i]` is the (message id, newly queued) answer of job i when its chunk was written, or
    None when nothing of that job was written; a retry of the None jobs (or of every job with a
    producer id) is safe."""

    def __init__(self, message: str, queued: list[tuple[str, bool] | None]) -> None:
        super().__init__(message)
        self.queued = queued


class ProviderError(SmsWorkerError):
    """The icomm API answered something other than success, or did not answer."""

    def __init__(self, message: str, *, status_code: int | None = None, body: object = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.body = body


class ProviderNotActedOn(ProviderError):
    """The request certainly did not reach processing (connect error, 429, 503): safe to resend."""

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        body: object = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message, status_code=status_code, body=body)
        self.retry_after_s = retry_after_s


class ProviderRateLimited(ProviderNotActedOn):
    """429 Too Many Requests."""


class SendWindowClosed(ProviderNotActedOn):
    """The request was not written because its send deadline had passed (the process was paused or
    starved past the batch's fence): certainly not sent. Not an outage: the lane is not paused."""


@dataclass(frozen=True)
class Violation:
    """One `violations[]` item of an ApiError body."""

    property: str
    violation: str


class ProviderBadRequest(ProviderError):
    """400 for the whole request; the violations say which property."""

    def __init__(
        self, message: str, *, status_code: int | None = 400, body: object = None,
        violations: tuple[Violation, ...] = (),
    ) -> None:
        super().__init__(message, status_code=status_code, body=body)
        self.violations = violations


class ProviderAuthError(ProviderError):
    """401 or 403: the API key is wrong or lacks a scope; retrying cannot help."""


class ProviderAmbiguous(ProviderError):
    """The provider may or may not have acted on the request; never resend blindly."""
