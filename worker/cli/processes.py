"""The commands that run a process: worker, clock, web, and the dev tools' sandbox and demo.

The dev tools (worker.devtools) are imported only by the sandbox and demo commands (and the
sandbox's flags only when that command is parsed or its help shown): the sandbox package alone
takes ~0.2 s to import, which every other command would pay.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import threading
from pathlib import Path

from worker.cli import common
from worker.cli.errors import UsageError
from worker.errors import SmsWorkerError
from worker.settings import Settings


def add_sandbox_arguments(parser: argparse.ArgumentParser) -> None:
    """The sandbox's own flags (its fault knobs...), defined with it in the dev tools."""
    from worker.devtools.sandbox.config import add_arguments

    add_arguments(parser)


def cmd_sandbox(args: argparse.Namespace) -> int:
    from worker.devtools.sandbox import server
    from worker.devtools.sandbox.config import config_from_args

    # The flags are checked here, so a mistake is one line (server.run raises ValueError for them).
    if not args.allow_remote:
        try:
            server._require_loopback(args.host)
        except ValueError as error:
            raise UsageError(f"{error}; --allow-remote binds it anyway (a private container network only: "
                             "the admin API has no auth)") from None
    if not args.api_key:
        raise UsageError("--api-key must not be empty")
    try:
        config = config_from_args(args)
    except ValueError as error:
        raise UsageError(str(error)) from None
    server.run(args.port, args.api_key, host=args.host, config=config, allow_remote=args.allow_remote)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from worker.devtools.demo import run_demo

    return run_demo(messages=args.messages, keep_logs=args.keep_logs, keep=args.keep)


def cmd_worker(args: argparse.Namespace) -> int:
    from worker.accounts import Accounts

    settings = common.settings()  # fail here, with the clear message, before dramatiq forks
    Accounts.from_settings(settings).require_keys()  # every account's key (ICOMM_API_KEY for `default`)
    if settings.sms_metrics_port:
        # Counters of all forked worker processes are summed from files here (prometheus_client's
        # multiprocess mode); it must be set before any process imports prometheus_client.
        metrics_dir = Path(tempfile.gettempdir()) / f"sms-worker-metrics-{os.getpid()}"
        shutil.rmtree(metrics_dir, ignore_errors=True)
        metrics_dir.mkdir(parents=True)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    # Dramatiq polls each idle queue (one per lane, and the shared one) with a backoff up to this
    # many ms. Immediate lanes do not wait for it (their dispatchers listen on the outbox), so
    # the polling can be rare: it only delays a bulk batch's start and report processing.
    os.environ.setdefault("dramatiq_worker_timeout", "100")
    # glibc gives each thread its own malloc arena; with a dozen worker threads that alone added
    # ~40 MB of peak RSS per process (docs/performance.md, scenario 6).
    os.environ.setdefault("MALLOC_ARENA_MAX", "2")
    lanes, queues = worker_queues(settings, args.lanes, args.skip_lanes)
    threads = args.threads or sum(settings.sms_lanes[lane].concurrency for lane in lanes) + 4
    argv = ["dramatiq", "worker.actors", "--processes", str(args.processes), "--threads", str(threads),
            "--worker-shutdown-timeout", str(int(settings.sms_shutdown_timeout_s * 1000)), "--skip-logging"]
    if queues is not None:
        argv += ["--queues", *queues]
    os.execvp(sys.executable, [sys.executable, "-m", *argv])


def worker_queues(settings: Settings, only: str | None, skip: str | None) -> tuple[list[str], list[str] | None]:
    """(lanes this worker dispatches, Dramatiq queues it consumes or None for all of them).

    `--lanes otp`: only those lanes' dispatches (a dedicated, never-busy otp process).
    `--skip-lanes otp`: everything else, report work included (the bulk workers beside it).
    """
    from worker.triggers import QUEUE, lane_queue

    if only and skip:
        raise SmsWorkerError("give --lanes or --skip-lanes, not both")
    known = list(settings.sms_lanes)
    named = [lane.strip() for lane in (only or skip or "").split(",") if lane.strip()]
    unknown = [lane for lane in named if lane not in known]
    if unknown:
        raise SmsWorkerError(f"unknown lane(s) {', '.join(unknown)}; SMS_LANES has {', '.join(known)}")
    if only:
        return named, [lane_queue(lane) for lane in named]
    if skip:
        lanes = [lane for lane in known if lane not in named]
        return lanes, [QUEUE, *(lane_queue(lane) for lane in lanes)]
    return known, None


def cmd_clock(args: argparse.Namespace) -> int:
    from worker import logs
    from worker.clock import Clock, ClockConfig

    settings = common.settings()
    logs.configure_from(settings)
    store = common.store(settings)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    Clock(ClockConfig.from_settings(settings), store, common.triggers(settings, store)).run(stop)
    return 0


def cmd_web(args: argparse.Namespace) -> int:
    import uvicorn

    from worker import logs
    from worker.web import create_app

    settings = common.settings()
    logs.configure_from(settings)
    uvicorn.run(
        create_app(settings), host=args.host, port=args.port, loop="uvloop", http="httptools",
        lifespan="on", log_config=None,  # our logging (JSON, redaction) stays in charge
        access_log=False,  # in `path` auth mode the request line carries the secret
        timeout_graceful_shutdown=int(settings.sms_shutdown_timeout_s),
    )
    return 0
