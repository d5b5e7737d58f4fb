"""Redis CPU per message for each step of the send path, measured alone: the floor under scenario 1.

    .venv/bin/python -m bench.redis_cost                  # 50,000 messages, 3 repetitions
    .venv/bin/python -m bench.redis_cost -n 20000 -r 5
    .venv/bin/python -m bench.redis_cost --campaign spring   # every job in one campaign
    .venv/bin/python -m bench.redis_cost --guards            # + scenario 7's guards (1,000,000 suppressed)

One Redis process runs every step of every message (append, claim, SUBMITTING before the POST,
the settle that records the outcome, publishes the event and acknowledges the entry), so
1 / (its CPU per message) is the most any number of workers can send through it, even with a
whole core to itself. Here nothing else runs: a private redis-server, the production Store and
Dispatcher code driving it from this process, in 1000-message batches like the bulk lane, with the
same outcome (accepted, an event, a report deadline) the dispatcher writes. Redis's CPU comes from
/proc, so the numbers do not depend on how busy the rest of the machine is.

`--guards`: each repetition measures twice, with the guards off and then with scenario 7's guards on
the bulk lane (velocity per number and prefix, caps, a suppression list of `--suppressed` numbers,
none of them a job's, loaded before the clock starts): the SMISMEMBER of each batch's numbers between
the claim and the submit, and submit.lua deciding and counting the counted rules, as the dispatcher
runs them. The guards' cost is the difference of the two columns.
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

import orjson

from bench import procs, scenarios
from bench.scenarios import jobs
from bench.system import BenchStack
from worker import events
from worker.dispatch.classify import accepted
from worker.policy import LanePolicy, examine_all, guard_batch, plan_static, suppression_numbers
from worker.settings import LaneConfig
from worker.store import Entry
from worker.store.policy import GuardBatch

BATCH = 1000
STATUS = {"groupId": 1, "groupName": "PENDING", "id": 26, "name": "PENDING_ACCEPTED",
          "description": "Message sent to next instance"}


def measure(stack: BenchStack, n: int, suppressed: int | None = None) -> dict[str, float]:
    """Redis CPU us per message for each step, over `n` messages (`suppressed`: with the guards' steps
    and a suppression list of that many numbers)."""
    store, settings = stack.store, stack.settings
    store.r.flushall()
    if suppressed is not None:
        scenarios.suppress(stack, suppressed)
    encoded = [(orjson.dumps(job), None) for job in jobs(n)]
    cost: dict[str, float] = {}

    def step(name: str, work: Any) -> Any:
        before = procs.cpu_seconds(stack.redis_pid)
        result = work()
        cost[name] = (procs.cpu_seconds(stack.redis_pid) - before) / n * 1e6
        return result

    step("enqueue (XADD)", lambda: store.enqueue("bulk", encoded))

    def claim_all() -> list[list[Entry]]:
        batches = []
        while claim := store.claim("bulk", "bench", BATCH, lease_ms=60_000, max_wait_ms=250, recover=False).entries:
            batches.append(claim)
        return batches

    batches = step("claim.lua", claim_all)
    counted = [None] * len(batches) if suppressed is None else guards(store, batches, step)

    def submit_all() -> None:
        for batch, guarded in zip(batches, counted, strict=True):
            answers, results = store.submit_guarded(
                "bulk", batch, guarded, consumer="bench", lease_ms=60_000, state_ttl_s=settings.sms_state_ttl_s,
                fence=f"bench-{len(batch)}-{batch[0].entry_id}", send_window_ms=60_000)
            # Scenario 7's guards let every job through.
            assert {a.state for a in answers} == {"NEW"} and not any(r.error for r in results), answers[:1]

    step("submit.lua", submit_all)

    def settle_all() -> None:
        for batch in batches:
            outcomes = [accepted("bulk", e, orjson.loads(e.job), "bench-bulk", STATUS, now_ms=events.now_ms(),
                                 grace_s=settings.sms_no_report_grace_s) for e in batch]
            store.settle("bulk", outcomes, now_ms=events.now_ms(), events_maxlen=settings.sms_events_stream_maxlen,
                         state_ttl_s=settings.sms_state_ttl_s)

    step("settle.lua", settle_all)
    assert int(store.r.xlen(store.events)) == n and int(store.r.xlen(store.outbox("bulk"))) == 0
    return cost


def guards(store: Any, batches: list[list[Entry]], step: Any) -> list[GuardBatch]:
    """The SMISMEMBER of every batch (a Redis step of its own), and what submit.lua is then given for
    the counted rules; scenario 7's guards must let every job through."""
    policy = LanePolicy.of("bulk", LaneConfig.model_validate(scenarios.GUARDS_ON["bulk"]))
    args = store.guard_args("bulk", policy.limits(), policy.fail_open)
    examined = [examine_all(policy, [orjson.loads(e.job) for e in batch]) for batch in batches]
    flags = step("SMISMEMBER", lambda: [store.suppressed(suppression_numbers(ex)) for ex in examined])
    counted = []
    for batch, seen, suppressed in zip(batches, examined, flags, strict=True):
        plan, rest = plan_static(policy, batch, seen, suppressed)
        assert not plan.rejected and len(rest) == len(batch), plan.rejected[:1]
        counted.append(guard_batch(args, rest))
    return counted


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.redis_cost", description=__doc__.split("\n")[0])
    parser.add_argument("-n", "--messages", type=int, default=50_000)
    parser.add_argument("-r", "--repeat", type=int, default=3)
    parser.add_argument("--campaign", metavar="NAME", help="every job carries this campaign_reference_id")
    parser.add_argument("--guards", action="store_true", help="with scenario 7's guards on (their Redis steps too)")
    parser.add_argument("--suppressed", type=int, default=1_000_000, help="with --guards: numbers suppressed")
    args = parser.parse_args(argv)
    scenarios.CAMPAIGN = args.campaign
    runs, guarded = [], []
    with BenchStack(sandbox_flags=None) as stack:
        for _ in range(args.repeat):
            runs.append(measure(stack, args.messages))
            if args.guards:
                guarded.append(measure(stack, args.messages, args.suppressed))
    print(f"Redis CPU per message, {args.messages:,} messages in batches of {BATCH}, median of {args.repeat}:")
    if not guarded:
        total = _print_column(runs)
        print(f"  {'total':<16} {total:6.1f} us  -> one Redis core at 100% sends at most {1e6 / total:,.0f} SMS/s")
        return 0
    print(f"  {'':<16} {'guards off':>10} {'on':>8}")
    off, on = _medians(runs), _medians(guarded)
    for name in on:
        print(f"  {name:<16} {off.get(name, 0.0):10.1f} {on[name]:8.1f} us")
    total_off, total_on = sum(off.values()), sum(on.values())
    print(f"  {'total':<16} {total_off:10.1f} {total_on:8.1f} us  (the guards: {total_on - total_off:+.1f} us,"
          f" {(total_on - total_off) / total_off:+.0%})")
    return 0


def _medians(runs: list[dict[str, float]]) -> dict[str, float]:
    return {name: statistics.median(run[name] for run in runs) for name in runs[0]}


def _print_column(runs: list[dict[str, float]]) -> float:
    total = 0.0
    for name, value in _medians(runs).items():
        total += value
        print(f"  {name:<16} {value:6.1f} us")
    return total


if __name__ == "__main__":
    raise SystemExit(main())
