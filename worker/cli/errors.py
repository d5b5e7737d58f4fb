"""One line per mistake: which exceptions are a user's mistake, the line and exit code each gets,
and a quiet end when stdout's reader went away. Anything else is a bug and keeps its traceback."""

from __future__ import annotations

import os
import sys
from urllib.parse import urlsplit

from worker.errors import ConfigError, SmsWorkerError, StoreError
from worker.settings import Settings


class UsageError(SmsWorkerError):
    """The command line itself is wrong (a flag, a file it names): exit 2, like argparse's errors."""


def _redis_hint(error: BaseException, settings: Settings | None) -> str:
    # redis is looked up, not imported: a command that never touched Redis must not pay its import.
    redis = sys.modules.get("redis")
    cause = error.__cause__ if isinstance(error, StoreError) else error
    if redis is None or not isinstance(cause, redis.ConnectionError | redis.TimeoutError):
        return ""
    if isinstance(cause, redis.AuthenticationError):
        return " (Redis refused the credentials: check the user and password in REDIS_URL)"
    if settings is None:
        return " (Redis is unreachable: is it running, and is REDIS_URL right?)"
    url = urlsplit(settings.redis_url)  # host and port only: never the URL's password
    where = url.path if url.scheme == "unix" else f"{url.hostname}:{url.port or 6379}"
    return f" (Redis is unreachable at {where}: is it running, and is REDIS_URL right?)"


def user_error(error: Exception, settings: Settings | None) -> tuple[str, int] | None:
    """(the line to print, the exit code) for an expected mistake; None for a bug (it keeps its traceback).

    `settings`: those the command loaded, if it got that far (they say where Redis was looked for)."""
    if isinstance(error, UsageError | ConfigError):
        return str(error), 2
    if isinstance(error, StoreError):
        return f"{error}{_redis_hint(error, settings)}", 1
    if isinstance(error, SmsWorkerError):  # JobValidationError, ProviderError, ...
        return str(error), 1
    redis = sys.modules.get("redis")
    if redis is not None and isinstance(error, redis.ConnectionError | redis.TimeoutError):
        return f"Redis: {type(error).__name__}: {error}{_redis_hint(error, settings)}", 1
    return _input_error(error)


def _input_error(error: Exception) -> tuple[str, int] | None:
    """Input the user gave (a file, a template, a value): what is wrong with it, in one line."""
    if isinstance(error, UnicodeDecodeError):
        return f"not UTF-8 text ({error.reason}: byte 0x{error.object[error.start]:02x} at {error.start}); " \
               "save it as UTF-8", 1
    if isinstance(error, OSError):
        where = f"{error.filename}: " if error.filename else ""
        return f"{where}{error.strerror or error}", 1
    if isinstance(error, ValueError):
        return str(error) or type(error).__name__, 1
    return None


def stdout_closed() -> int:
    """The reader of stdout went away (`sms-worker status | head -4`): stop quietly, as cat or grep do.

    What is still buffered goes to /dev/null, so the interpreter's last flush does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout is no file (captured): nothing is left to fail
        pass
    return 141  # 128 + SIGPIPE, what a shell reports for a writer killed by a closed pipe
