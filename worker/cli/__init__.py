"""The `sms-worker` command: its parser and entry point (`main`). Errors are one line.

    processes.py   worker, clock, web; the dev tools' sandbox and demo
    enqueue.py     enqueue: one SMS, or a CSV file of them
    cancel.py      cancel: scheduled or queued messages not yet submitted
    trace.py       trace: where is my message (its trail, events, dead letters; --to finds a number's)
    campaigns.py   campaigns, campaign X [--watch]: campaign counters
    dlq.py         dlq list, show, replay, purge
    operations.py  status, resume, logs, reconcile, check
    schema.py      schema: the published JSON Schemas and AsyncAPI document
    preview.py     preview: a text's encoding and SMS parts, and whether a lane would refuse it
    suppress.py    suppress add, remove, list, import, check: the suppression list (opt-outs)
    errors.py      which exceptions are a user's mistake, and the line each one gets
    common.py      what the commands share: loaded settings, Store, Triggers, JSON output

The commands are named here (`build_parser` reads them from this module when it runs), so a test
may replace one, e.g. `worker.cli.cmd_status`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from worker.cli import campaigns, cancel, common, dlq, enqueue, preview, schema, suppress
from worker.cli.cancel import cmd_cancel
from worker.cli.dlq import cmd_dlq
from worker.cli.enqueue import cmd_enqueue
from worker.cli.errors import UsageError, stdout_closed, user_error
from worker.cli.operations import cmd_check, cmd_logs, cmd_reconcile, cmd_resume, cmd_status
from worker.cli.processes import add_sandbox_arguments, cmd_clock, cmd_demo, cmd_sandbox, cmd_web, cmd_worker
from worker.cli.schema import cmd_schema
from worker.cli.trace import register as register_trace
from worker.errors import ConfigError
from worker.settings import ENV_FILE_VARIABLE, load_settings

__all__ = [
    "UsageError", "build_parser", "cmd_cancel", "cmd_check", "cmd_clock", "cmd_demo", "cmd_dlq", "cmd_enqueue",
    "cmd_logs", "cmd_reconcile", "cmd_resume", "cmd_sandbox", "cmd_schema", "cmd_status", "cmd_web", "cmd_worker",
    "main",
]


# --- parser ----------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    """A usage mistake is one line, like every other mistake (subcommands' parsers are this class too).

    `lazy_arguments` adds arguments only once this parser is used (parsing, or its help): the
    sandbox's flags are defined with the dev tools, which the other commands must not import."""

    def __init__(self, *args: Any, lazy_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
                 **kwargs: Any) -> None:
        # No prefix matching: `demo --keep` must not quietly mean `--keep-logs` (or fail the day a
        # flag sharing its prefix is added).
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        self._lazy_arguments = lazy_arguments

    def _complete(self) -> None:
        add, self._lazy_arguments = self._lazy_arguments, None
        if add is not None:
            add(self)

    def parse_known_args(self, *args: Any, **kwargs: Any) -> Any:
        self._complete()
        return super().parse_known_args(*args, **kwargs)

    def format_usage(self) -> str:
        self._complete()
        return super().format_usage()

    def format_help(self) -> str:
        self._complete()
        return super().format_help()

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"sms-worker: {message} (see {self.prog} --help)\n")


def _port(value: str) -> int:
    try:
        port = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {value!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0 to 65535, not {port}")
    return port


def _command(sub: Any, name: str, help: str, epilog: str, **kwargs: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(name, help=help, epilog=epilog,
                                                     formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="sms-worker",
        description="SMS dispatch worker for the icomm SMS API. Settings come from environment variables "
        "and an env file (.env here, or --env-file FILE; see config/example.env).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_processes(sub)

    p = _command(sub, "enqueue", "queue one SMS or a CSV file of them", enqueue.EPILOG)
    enqueue.add_arguments(p)
    p.set_defaults(func=cmd_enqueue)

    p = _command(sub, "cancel", "cancel scheduled or queued messages not yet submitted", cancel.EPILOG)
    cancel.add_arguments(p)
    p.set_defaults(func=cmd_cancel)

    campaigns.register(sub, _command)

    register_trace(sub)

    suppress.register(sub, _command)

    preview.register(sub, _command)

    p = _command(sub, "dlq", "list, show, replay or purge dead letters", dlq.EPILOG)
    dlq.add_arguments(p)
    p.set_defaults(func=cmd_dlq)

    _add_operations(sub)

    p = _command(sub, "schema", "print the JSON Schema of the job or the event, or the AsyncAPI document",
                 schema.EPILOG)
    schema.add_arguments(p)
    p.set_defaults(func=cmd_schema)

    p = _command(sub, "demo", "run the whole system locally and send a few thousand SMS",
                 "example:\n  sms-worker demo --messages 3000")
    p.add_argument("--messages", type=int, default=3000)
    p.add_argument("--keep-logs", action="store_true", help="print where the processes' logs are")
    p.add_argument("--keep", action="store_true",
                   help="leave the stack running afterwards and print the commands to poke at it and stop it")
    p.set_defaults(func=cmd_demo)
    return parser


def _add_processes(sub: Any) -> None:
    p = _command(sub, "sandbox", "run the local icomm API sandbox",
                 "example:\n  sms-worker sandbox --port 8900 --api-key dev-key --rate-429 0.05",
                 lazy_arguments=add_sandbox_arguments)
    p.add_argument("--port", type=_port, default=8900)
    p.add_argument("--api-key", required=True)
    p.add_argument("--host", default="127.0.0.1", help="loopback only unless --allow-remote")
    p.add_argument("--allow-remote", action="store_true",
                   help="bind a non-loopback host (a private container network only: the admin API has no auth)")
    p.set_defaults(func=cmd_sandbox)

    p = _command(sub, "worker", "run Dramatiq worker processes over the actors",
                 "examples:\n  sms-worker worker --processes 2\n"
                 "  sms-worker worker --lanes otp               # a dedicated otp process\n"
                 "  sms-worker worker --processes 2 --skip-lanes otp   # and the rest beside it")
    p.add_argument("--processes", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="threads per process (default: lanes' concurrency + 4)")
    p.add_argument("--lanes", help="only dispatch these lanes (comma-separated), e.g. a dedicated otp worker")
    p.add_argument("--skip-lanes", help="everything except these lanes, e.g. the workers beside an otp worker")
    p.set_defaults(func=cmd_worker)

    p = _command(sub, "clock", "run the scheduler that enqueues periodic actor messages",
                 "example:\n  sms-worker clock")
    p.set_defaults(func=cmd_clock)

    p = _command(sub, "web", "run the webhook receiver for delivery reports (and /healthz, /readyz)",
                 "example:\n  sms-worker web --host 127.0.0.1 --port 8080")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=_port, default=8080)
    p.set_defaults(func=cmd_web)


def _add_operations(sub: Any) -> None:
    p = _command(sub, "status", "outbox, in flight, ambiguous, dead letters, limiter, drain, workers",
                 "examples:\n  sms-worker status\n  sms-worker status --json | jq .lanes")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = _command(sub, "resume", "lift a lane's pause (auth, provider_unavailable, budget) now",
                 "examples:\n  sms-worker resume --lane bulk\n  sms-worker resume --lane otp --lane bulk\n"
                 "  sms-worker resume --all\n  sms-worker resume --lane bulk --extra 5000   (a budget pause: "
                 "raise today's caps by 5000, after a y/N question)\n"
                 "  sms-worker resume --account marketing --extra 5000   (an account at its daily cap: raise "
                 "its caps for today and lift its lanes' budget pauses)")
    p.add_argument("--lane", action="append", help="a lane to resume (repeat for several)")
    p.add_argument("--all", action="store_true", help="every configured lane")
    p.add_argument("--account", help="an account at its daily cap (SMS_ACCOUNTS' daily_cap, SMS_ACCOUNT_DAILY_CAP): "
                   "with --extra N raise its caps for today and lift the budget pauses of its lanes")
    p.add_argument("--extra", type=int, help="for a lane (or --account) paused for budget: raise today's (UTC) "
                   "daily caps by N (messages, and parts) and resume it; the counters keep counting")
    p.add_argument("--yes", action="store_true", help="confirm raising a budget without being asked")
    p.set_defaults(func=cmd_resume)

    p = _command(sub, "logs", "query the provider's GET /sms/3/logs (last 48 h)",
                 "examples:\n  sms-worker logs --message-id sw-bulk-1764230000000-0\n"
                 "  sms-worker logs --bulk-id b1 --bulk-id b2 --general-status DELIVERED --limit 100\n"
                 "  sms-worker logs --sent-since 2026-11-27T08:00:00+00:00 --json")
    for flag in ("--message-id", "--bulk-id", "--campaign-reference-id"):
        p.add_argument(flag, action="append", default=[], help="repeat for several")
    for flag in ("--mcc", "--mnc", "--sender", "--destination", "--entity-id", "--application-id",
                 "--sent-since", "--sent-until"):
        p.add_argument(flag)
    p.add_argument("--general-status", choices=["ACCEPTED", "PENDING", "UNDELIVERABLE", "DELIVERED", "EXPIRED",
                                                "REJECTED"])
    p.add_argument("--limit", type=int)
    p.add_argument("--account", help="the icomm account whose logs to read (SMS_ACCOUNTS; default: default)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_logs)

    p = _command(sub, "reconcile", "check messages against the provider's logs now and settle them",
                 "examples:\n  sms-worker reconcile --message-id sw-bulk-1764230000000-0\n"
                 "  sms-worker reconcile --bulk-id 2034072219640523072")
    p.add_argument("--message-id", action="append", default=[])
    p.add_argument("--bulk-id", action="append", default=[])
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_reconcile)

    p = _command(sub, "check", "validate settings, vet Redis (eviction, persistence), verify the API key",
                 "example:\n  sms-worker check")
    p.set_defaults(func=cmd_check)


# --- the entry point: shared options, logging, and one line per mistake ------------------------------
ENV_FILE_HELP = "read settings from FILE (default: .env in the working directory); the environment wins over it"
# Commands that run without the worker's settings: the sandbox has its own flags, the demo its own stack
# (preview loads them only for --lane).
_NO_SETTINGS = frozenset({"sandbox", "demo", "schema", "preview"})
# Commands that report variables that are no setting themselves (not as a log warning).
_OWN_WARNINGS = frozenset({"check"})


def _with_shared_options(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """`--env-file FILE` before the command or after it, for every command."""
    parser.add_argument("--env-file", metavar="FILE", help=ENV_FILE_HELP)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                sub.add_argument("--env-file", metavar="FILE", default=argparse.SUPPRESS, help=ENV_FILE_HELP)
    return parser


def _use_env_file(path: str | None) -> None:
    """Make FILE the env file of this command and of every process it starts (they inherit SMS_ENV_FILE)."""
    if path is None:
        return
    file = Path(path)
    if not file.exists():
        raise UsageError(f"--env-file {path}: no such file")
    if not file.is_file():
        raise UsageError(f"--env-file {path}: not a file")
    os.environ[ENV_FILE_VARIABLE] = str(file.resolve())


def _start(command: str) -> None:
    """Load the settings once and configure logging from them (LOG_LEVEL, LOG_FORMAT) for every command:
    unconfigured, structlog would print every level, debug included, to stdout."""
    from worker import logs

    # Not cached: the long-running commands (clock, web; the workers in worker.broker) configure
    # again, cached, once they start.
    if command in _NO_SETTINGS:
        try:
            logs.configure_from(load_settings(), warn_unknown=False, cache=False)
        except ConfigError:
            logs.configure(cache=False)
        return
    common.loaded = load_settings()
    logs.configure_from(common.loaded, warn_unknown=command not in _OWN_WARNINGS, cache=False)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. A user's mistake (a wrong setting or flag, Redis unreachable, a bad file or
    value) is one line `sms-worker: ...` on stderr and exit 2 (usage, configuration) or 1; Ctrl-C is
    130; a closed stdout is a quiet 141. Any other exception is a bug and keeps its traceback."""
    try:
        args = _with_shared_options(build_parser()).parse_args(argv)
        _use_env_file(args.env_file)
        _start(args.command)
        func: Callable[[argparse.Namespace], int] = args.func
        code = func(args)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's last flush
        return code
    except BrokenPipeError:
        return stdout_closed()
    except KeyboardInterrupt:
        return 130
    except SystemExit:  # argparse's --help or usage error, or a server's exit
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            return stdout_closed()
        raise
    except Exception as error:
        known = user_error(error, common.loaded)
        if known is None:
            raise
        message, code = known
        lines = message.splitlines() if isinstance(error, ConfigError) else [" ".join(message.split())]
        for line in lines or [type(error).__name__]:
            print(f"sms-worker: {line}", file=sys.stderr)
        return code
    finally:
        common.loaded = None
