"""SMS pumping mixed with legitimate OTPs, through real worker processes and a SIGKILL of all of them:
none of the abusive jobs is sent beyond what the rules allow, every legitimate one is sent, every
job ends in exactly one decision event.

The otp lane carries the guards an OTP sender would configure (README "Traffic policy"): at most 5
codes per number and 20 per number prefix (the number without its last 3 digits) per window, the
countries CH, DE and AT only, premium-rate and shared-cost numbers refused. The traffic, shuffled
and queued in chunks while the workers run:

- legitimate: OTPs to many distinct valid mobile numbers of CH, DE and AT, each in a prefix of its
  own, some of them asking for a second code (within every limit): all sent;
- pumping: OTPs to one long run of sequential Swiss mobile numbers, so a few prefixes get hundreds
  each: exactly min(20, numbers in the prefix) per prefix sent, the rest `velocity` with the
  prefix rule;
- premium rate / shared cost: sequential ranges of Swiss, German and Austrian 0900-style and 084x
  numbers: none sent, `number_type_blocked` naming the type;
- blocked countries: sequential ranges of mobile numbers in GB, UZ, KG, NG and RU: none sent,
  `country_blocked` by the allow-list;
- repeats: one number asked for a code again and again, for several numbers: exactly 5 each sent,
  the rest `velocity` with the number rule.

The traffic comes in phases (3 in CI, 7 at full size), each with repeaters and a pumping run of its
own. Once a phase is decided, every worker process is SIGKILLed at the next phase's first POSTs,
alternately while a POST is in flight (the sandbox holds it) and after the provider accepted a bulk
but before the worker had its answer, and as many are started again to take the entries over. The
killed POSTs hold pumped and repeated jobs that velocity had allowed and counted (the test counts
them and requires some): taken over, they must be neither counted nor refused again, so the counts
stay exact across the crashes.

What reached the provider is read from the sandbox's own records (its logs of accepted sends, with
their destinations), not from the worker's events; the events are checked separately: exactly one
send-side decision per job with the expected type, reason and rule, no event_id twice, and one final
event per generated report (the reliability harness's promises).

Velocity counts in fixed windows of the Redis server's clock: the window length is chosen so that
the run cannot straddle a window boundary (checked after the run), because across a boundary the
counts start again and "exactly the limit" would not be the rule's promise.
"""

from __future__ import annotations

import random
import signal
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from tests.reliability.harness import (
    API_KEY,
    FINAL,
    LANES,
    SEND_OUTCOMES,
    Row,
    Size,
    System,
    assert_promises,
    poll,
    running,
    verify,
    wait_settled,
)
from worker.devtools.devstack import Proc
from worker.numbers import facts
from worker.store import DISPATCH_GROUP

ALLOWED = ("CH", "DE", "AT")
BLOCKED_TYPES = ("PREMIUM_RATE", "SHARED_COST")
NUMBER_LIMIT = 5
PREFIX_LIMIT = 20
DIGITS_DROPPED = 3
# Window lengths to choose from: the first one whose current window has room for the whole run. Two
# of them rarely end near the same moment (their boundaries coincide only at common multiples).
WINDOWS_S = (3600, 3300, 3100, 2900, 7100, 10700)
CHUNK = 100  # jobs per enqueue call: the producer keeps queuing while the workers send
TEXT = "Your login code is {code:06d}. It expires in 10 minutes."


@dataclass(frozen=True)
class Mix:
    """How much of each kind of traffic a run queues (each split evenly over the phases)."""

    phases: int  # queued one after the other; every worker is SIGKILLed at the start of each but the first
    legit: int  # distinct legitimate numbers
    legit_again: int  # of them, how many ask for a second code
    pumped: int  # sequential numbers of the pumping runs (one run a phase)
    premium: int  # per premium-rate / shared-cost range
    blocked: int  # per blocked-country range
    repeaters: int  # numbers that ask again and again
    repeats: int  # codes each repeater asks for
    budget_s: float  # a bound for the run, kills and recoveries included

    @property
    def jobs(self) -> int:
        return (self.legit + self.legit_again + self.pumped + self.premium * len(PREMIUM_RANGES)
                + self.blocked * len(BLOCKED_RANGES) + self.repeaters * self.repeats)


SHORT_MIX = Mix(phases=3, legit=300, legit_again=60, pumped=420, premium=15, blocked=15, repeaters=6, repeats=30,
                budget_s=150)
FULL_MIX = Mix(phases=7, legit=4200, legit_again=840, pumped=5600, premium=350, blocked=350, repeaters=42,
               repeats=60, budget_s=1500)

# Where the first phase's pumping run starts (each next one 10,000 numbers on): not at the start of
# a prefix, so its first prefix holds fewer than PREFIX_LIMIT numbers (all of them allowed) and the
# following ones up to a thousand each.
PUMP_START = 41795550990
# First digits of sequential ranges (the digits after them count up), and the numbers' length.
PREMIUM_RANGES = {"41900": 11, "41906": 11, "41848": 11, "499001": 12, "43900": 11}
BLOCKED_RANGES = {"447400": 12, "99890": 12, "996555": 12, "234803": 13, "7916": 11}
# Legitimate numbers: the 4 digits after these are a counter, so each number is alone in its prefix.
LEGIT_SHAPES = ("4178{:04d}{:03d}", "4177{:04d}{:03d}", "49151{:04d}{:04d}", "49152{:04d}{:04d}",
                "43664{:04d}{:03d}")


@dataclass
class Job:
    kind: str  # legit | pump | premium | blocked | repeat
    to: str
    expect_reason: str | None = None  # the static rule's reason; None: decided by velocity or sent
    expect_rule: str | None = None


@dataclass
class Traffic:
    jobs: list[Job] = field(default_factory=list)
    phase_ends: list[int] = field(default_factory=list)  # index in `jobs` where each phase ends

    def numbers(self, kind: str) -> set[str]:
        return {job.to for job in self.jobs if job.kind == kind}


def prefix_of(number: str) -> str:
    return number[:-DIGITS_DROPPED]


def _ranged(first: str, length: int, i: int) -> str:
    return first + str(123000 + i).rjust(length - len(first), "0")


def _traffic(mix: Mix, rng: random.Random) -> Traffic:
    """Every job of the run, phase by phase (each shuffled), with what the static rules must say
    about it; checked against the phone number metadata, so a number is what the test says it is.
    Each phase has repeaters and a pumping run of its own, so the quotas are fresh when the phase's
    first POSTs are killed."""
    traffic = Traffic()
    phases = mix.phases
    for phase in range(phases):
        jobs: list[Job] = []
        # Legitimate: CH (078, 077), DE (0151, 0152) and AT (0664) mobiles.
        for i in range(phase * mix.legit // phases, (phase + 1) * mix.legit // phases):
            shape = LEGIT_SHAPES[i % len(LEGIT_SHAPES)]
            last = rng.randrange(10_000 if shape.startswith("49") else 1000)
            jobs.append(Job("legit", shape.format(i // len(LEGIT_SHAPES), last)))
        jobs += [Job("legit", job.to) for job in rng.sample(jobs, mix.legit_again // phases)]
        jobs += [Job("pump", str(PUMP_START + 10_000 * phase + i)) for i in range(mix.pumped // phases)]
        per = mix.premium // phases
        for first, length in PREMIUM_RANGES.items():
            for i in range(phase * per, (phase + 1) * per):
                number = _ranged(first, length, i)
                kind = facts(number).number_type
                jobs.append(Job("premium", number, "number_type_blocked", f"block_number_types:{kind}"))
        per = mix.blocked // phases
        for first, length in BLOCKED_RANGES.items():
            jobs += [Job("blocked", _ranged(first, length, i), "country_blocked", "countries.allow")
                     for i in range(phase * per, (phase + 1) * per)]
        # Repeaters: Swiss 076 numbers, each alone in its prefix.
        per = mix.repeaters // phases
        for k in range(phase * per, (phase + 1) * per):
            number = f"4176{k:04d}{rng.randrange(1000):03d}"
            jobs += [Job("repeat", number) for _ in range(mix.repeats)]
        rng.shuffle(jobs)
        traffic.jobs += jobs
        traffic.phase_ends.append(len(traffic.jobs))
    _check_numbers(traffic)
    return traffic


def _check_numbers(traffic: Traffic) -> None:
    """The numbers are what the scenario says (valid, of the intended region and type), and the
    legitimate ones share no prefix with each other or with the abusive ones."""
    wrong = []
    for job in {job.to: job for job in traffic.jobs}.values():
        seen = facts(job.to)
        if job.kind in ("legit", "pump", "repeat"):
            ok = seen.valid and seen.region in ALLOWED and seen.number_type == "MOBILE"
        elif job.kind == "premium":
            ok = seen.valid and seen.region in ALLOWED and seen.number_type in BLOCKED_TYPES
        else:
            ok = seen.valid and seen.region not in ALLOWED and seen.region is not None
        if not ok:
            wrong.append(f"{job.kind} {job.to}: {seen}")
    assert not wrong, f"numbers that are not what the scenario needs: {wrong[:10]}"
    legit = [prefix_of(n) for n in traffic.numbers("legit")]
    assert len(legit) == len(set(legit)), "two legitimate numbers share a prefix"
    others = {prefix_of(n) for kind in ("pump", "repeat") for n in traffic.numbers(kind)}
    assert not set(legit) & others, "a legitimate number shares a prefix with an abusive one"
    assert len({prefix_of(n) for n in traffic.numbers("repeat")}) == len(traffic.numbers("repeat"))


def _lanes(window_s: int) -> dict[str, Any]:
    return {
        "otp": {**LANES["otp"],
                "velocity": {"per_number": {"limit": NUMBER_LIMIT, "window_s": window_s},
                             "per_prefix": {"digits_dropped": DIGITS_DROPPED, "limit": PREFIX_LIMIT,
                                            "window_s": window_s}},
                "countries": {"allow": list(ALLOWED)},
                "block_number_types": list(BLOCKED_TYPES)},
        "bulk": LANES["bulk"],
    }


def _server_s(system: System) -> float:
    seconds, micros = system.client.time()
    return int(seconds) + int(micros) / 1e6


def _window_for(now_s: float, budget_s: float) -> int:
    """The first window length whose current window outlasts the run."""
    for window_s in WINDOWS_S:
        if window_s - now_s % window_s >= budget_s:
            return window_s
    raise AssertionError(f"no window length in {WINDOWS_S} has {budget_s:g} s left at {now_s:.0f}")


# --- the crashes ------------------------------------------------------------------------------------

# The sandbox knobs that hold a POST (mid_post) or accept a bulk and hold its answer (after_post),
# and the fault counter that says one was held.
MOMENTS: dict[str, tuple[dict[str, Any], str]] = {
    "mid_post": ({"latency_ms": 600}, "latency"),
    "after_post": ({"accept_then_timeout_rate": 1.0, "timeout_delay_ms": 500}, "timeout"),
}
CALM = {"latency_ms": 0, "accept_then_timeout_rate": 0.0}


def _crash_at(system: System, moment: str, queue: Callable[[], None]) -> tuple[bool, dict[str, str]]:
    """Set the sandbox up for `moment`, queue more traffic, and SIGKILL every worker once a POST is
    held there (whichever worker holds it must die); start as many again. (Whether the moment came;
    the messages the dead workers had claimed, which the new ones take over, with each one's state
    at the kill: SUBMITTING and later mean the policy had allowed and counted it.)"""
    knobs, counter = MOMENTS[moment]
    base = int(system.stats()["faults"].get(counter, 0))
    system.configure(**knobs)
    queue()
    hit = poll(lambda: int(system.stats()["faults"].get(counter, 0)) > base, 30, 0.005)
    victims = system.workers()
    for proc in victims:
        proc.signal(signal.SIGKILL)
    for proc in victims:
        proc.wait(10)
    system.configure(**CALM)
    store = system.store
    claimed = system.client.xpending_range(store.outbox("otp"), DISPATCH_GROUP, min="-", max="+", count=100_000)
    mids = [store.lane_prefix("otp") + entry["message_id"].decode() for entry in claimed]
    with system.client.pipeline(transaction=False) as pipe:
        for mid in mids:
            pipe.hget(store.msg(mid), "state")
        states = pipe.execute()
    for _ in victims:
        system.start_worker()
    return hit, {mid: (state or b"").decode() for mid, state in zip(mids, states, strict=True)}


# --- what the provider got ---------------------------------------------------------------------------


def _provider_destinations(system: System, message_ids: list[str]) -> dict[str, str]:
    """message id -> destination, from the sandbox's logs of the sends it accepted (GET /sms/3/logs,
    as the provider serves them), for the given ids."""
    found: dict[str, str] = {}
    chunk: list[str] = []

    def ask() -> None:
        response = system.http.get(f"{system.sandbox_url}/sms/3/logs",
                                   params={"messageId": ",".join(chunk), "limit": "1000"},
                                   headers={"Authorization": f"App {API_KEY}"})
        assert response.status_code == 200, response.text[:300]
        for entry in response.json()["results"]:
            found[entry["messageId"]] = entry["destination"]
        chunk.clear()

    for mid in message_ids:
        if sum(len(m) + 1 for m in chunk) + len(mid) > 2000:  # the provider's limit is 2048 a parameter
            ask()
        chunk.append(mid)
    if chunk:
        ask()
    return found


def _counted(system: System, window: int) -> tuple[dict[str, int], dict[str, int]]:
    """The velocity counts the guards keep for the otp lane in `window`: (per number, per prefix)."""
    prefix = system.store.policy_prefix("otp")

    def read(kind: str) -> dict[str, int]:
        return {k.decode(): int(v) for k, v in system.client.hgetall(f"{prefix}{kind}:{window}").items()}

    return read("n"), read("p")


def _decisions(system: System) -> dict[str, list[dict[str, Any]]]:
    """message id -> the events that decided it: its send-side outcomes (accepted / rejected /
    failed); for a message without one, its final report events. A report may overtake the recovery
    of a killed worker's send, and then the report's final event is the message's only event (the
    harness counts those as `no_send_event`): the provider took it, so it was allowed."""
    sends: dict[str, list[dict[str, Any]]] = {}
    finals: dict[str, list[dict[str, Any]]] = {}
    for e in system.events():
        if e["type"] in FINAL and e.get("done_at") is not None:
            finals.setdefault(e["message_id"], []).append(e)
        elif e["type"] in SEND_OUTCOMES:
            sends.setdefault(e["message_id"], []).append(e)
    return {mid: sends.get(mid) or finals[mid] for mid in sends.keys() | finals.keys()}


def _sent(event: dict[str, Any]) -> bool:
    """The decision was to send: `accepted`, or a report's final event (the provider had it)."""
    return event["type"] == "accepted" or event.get("done_at") is not None


def _differences(counted: dict[str, int], sent: Counter[str]) -> list[str]:
    keys = sorted(k for k in counted.keys() | sent.keys() if counted.get(k, 0) != sent[k])
    return [f"{k}: counted {counted.get(k, 0)}, sent {sent[k]}" for k in keys[:10]]


# --- the test ------------------------------------------------------------------------------------------


def test_sms_pumping_mixed_with_legitimate_otps_is_stopped_exactly(size: Size, record: Row, tmp_path: Path) -> None:
    record.suite = "abuse: SMS pumping among legitimate OTPs"
    mix = FULL_MIX if size.mode == "full" else SHORT_MIX
    rng = random.Random(f"{size.seed}:abuse")
    traffic = _traffic(mix, rng)
    assert len(traffic.jobs) == mix.jobs
    killed: list[Proc] = []
    missed: list[str] = []
    # The window is chosen on the test's clock first (the stack's Redis is not up yet) and checked
    # against Redis's below.
    window_s = _window_for(time.time(), mix.budget_s + 30)
    with running({"SMS_LANES": orjson.dumps(_lanes(window_s)).decode(), "SMS_NO_REPORT_GRACE_S": "0"},
                 seed=size.seed, log_dir=tmp_path) as system:
        started_s = _server_s(system)
        assert window_s - started_s % window_s >= mix.budget_s, "Redis's clock is far from the test's"
        payloads = [{"to": job.to, "text": TEXT.format(code=rng.randrange(1_000_000))} for job in traffic.jobs]
        mids: list[str] = []

        def queue(upto: int) -> Callable[[], None]:
            def more() -> None:
                while len(mids) < upto:
                    chunk = payloads[len(mids) : min(upto, len(mids) + CHUNK)]
                    mids.extend(q.message_id for q in system.outbox.enqueue_many(chunk, "otp"))
            return more

        taken_over: dict[str, str] = {}
        queue(traffic.phase_ends[0])()
        for phase, upto in enumerate(traffic.phase_ends[1:]):
            moment = list(MOMENTS)[phase % len(MOMENTS)]
            # The phase before is decided first, so the POSTs killed are the new phase's first ones,
            # while its repeaters' and pumped prefixes' quotas are being used.
            poll(lambda: system.outbox_left() == 0, mix.budget_s / mix.phases, 0.05)
            before = system.workers()
            hit, claimed = _crash_at(system, moment, queue(upto))
            if hit:
                record.fault(f"SIGKILL@{moment}", len(before))
            else:
                missed.append(moment)
            taken_over |= claimed
            killed += before
        assert len(mids) == len(payloads)

        took = wait_settled(system, mix.budget_s)
        ended_s = _server_s(system)
        verdict = verify(system, mids)
        decisions = _decisions(system)
        sent_ids = [mid for mid, evs in decisions.items() if _sent(evs[0])]
        per_message = system.stats(per_message=True)["accepted_per_message_id"]
        provider_ids = len(per_message)
        at_provider = _provider_destinations(system, list(per_message))
        counted = _counted(system, int(started_s // window_s))
        crashed = system.dead_processes(killed)
    record.add(verdict)

    # What the rules must have done, job by job and per number / prefix.
    by_mid = dict(zip(mids, traffic.jobs, strict=True))
    number_rule = f"velocity.per_number:{NUMBER_LIMIT}/{window_s}s"
    prefix_rule = f"velocity.per_prefix:{PREFIX_LIMIT}/{window_s}s:-{DIGITS_DROPPED}"
    wrong: list[str] = []
    two_decisions = [mid for mid, evs in decisions.items() if len(evs) != 1]
    for mid, job in by_mid.items():
        evs = decisions.get(mid, [])
        if len(evs) != 1:
            continue  # none: lost (verify counts it); two or more: two_decisions
        sent = _sent(evs[0])
        got = (evs[0]["type"], evs[0].get("reason"), evs[0].get("rule"))
        if job.kind == "legit":
            ok = sent
        elif job.expect_reason is not None:
            ok = got == ("rejected", job.expect_reason, job.expect_rule)
        elif job.kind == "pump":
            ok = sent or got == ("rejected", "velocity", prefix_rule)
        else:  # repeat
            ok = sent or got == ("rejected", "velocity", number_rule)
        if not ok:
            wrong.append(f"{job.kind} {mid}: {got}")

    sent_to = Counter(at_provider.values())
    sent_prefixes = Counter(prefix_of(n) for n in at_provider.values())
    pumped_per_prefix = Counter(prefix_of(n) for n in traffic.numbers("pump"))
    expected_prefixes = {p: min(PREFIX_LIMIT, n) for p, n in pumped_per_prefix.items()}
    got_prefixes = {p: sent_prefixes[p] for p in pumped_per_prefix}
    expected_repeats = dict.fromkeys(traffic.numbers("repeat"), NUMBER_LIMIT)
    got_repeats = {n: sent_to[n] for n in traffic.numbers("repeat")}
    forbidden = traffic.numbers("premium") | traffic.numbers("blocked")
    sent_forbidden = sorted(n for n in sent_to if n in forbidden)
    legit_ids = [mid for mid, job in by_mid.items() if job.kind == "legit"]
    legit_missing = [mid for mid in legit_ids if mid not in at_provider]
    unknown_at_provider = sorted(set(at_provider) - set(by_mid))
    abusive = sum(1 for job in traffic.jobs if job.kind != "legit")
    abusive_sent = sum(1 for mid in at_provider if mid in by_mid and by_mid[mid].kind != "legit")
    reasons = Counter(str(evs[0].get("reason")) for evs in decisions.values() if evs[0]["type"] == "rejected"
                      and not _sent(evs[0]))
    # The pumped and repeated jobs the killed workers held after velocity had allowed and counted
    # them: the new workers must send them without counting them again (or the numbers and prefixes
    # would get fewer than their limit) and without refusing them.
    counted_taken_over = sum(1 for mid, state in taken_over.items() if state not in ("", "QUEUED")
                             and mid in by_mid and by_mid[mid].kind in ("pump", "repeat"))
    record.count("jobs the killed workers held, taken over", len(taken_over))
    unsubmitted = sum(1 for state in taken_over.values() if state in ("", "QUEUED"))
    record.count("of them not submitted at the kill (decided again by the new workers)", unsubmitted)
    record.count("of them pumped/repeated, counted by velocity before the kill", counted_taken_over)
    record.count("abusive jobs", abusive)
    record.count("abusive jobs sent (what the rules allow)", abusive_sent)
    record.count("legitimate jobs sent", len(legit_ids) - len(legit_missing))
    for reason, n in reasons.items():
        record.count(f"rejected: {reason}", n)
    record.note = (f"{len(traffic.jobs):,} OTPs ({len(legit_ids):,} legitimate) on 2 workers; velocity "
                   f"{NUMBER_LIMIT}/number, {PREFIX_LIMIT}/prefix (-{DIGITS_DROPPED}) per {window_s} s; allow "
                   f"{'/'.join(ALLOWED)}; no premium/shared-cost")
    if missed:
        record.note += f"; moments not reached (killed anyway): {', '.join(missed)}"

    summary = verdict.summary()
    assert took is not None, f"the run did not settle within {mix.budget_s:g} s: {summary}"
    assert int(ended_s // window_s) == int(started_s // window_s), "the run straddled a velocity window"
    assert not crashed, f"processes died that nobody killed: {crashed}"
    assert_promises(verdict)
    assert not two_decisions, f"jobs with more than one decision event: {two_decisions[:5]}"
    assert verdict.dead_letters == 0, summary
    assert "failed" not in verdict.outcomes, summary
    assert not wrong, f"{len(wrong)} jobs decided wrongly, e.g. {wrong[:5]}"
    # The provider's side: exactly what the rules allow, and every legitimate job.
    assert not sent_forbidden, f"premium-rate / blocked-country numbers reached the provider: {sent_forbidden[:5]}"
    assert got_repeats == expected_repeats, f"sends per repeated number: {got_repeats}"
    assert got_prefixes == expected_prefixes, f"sends per pumped prefix: {got_prefixes}, want {expected_prefixes}"
    assert not legit_missing, f"{len(legit_missing)} legitimate OTPs never reached the provider"
    assert not unknown_at_provider, f"the provider accepted ids nobody queued: {unknown_at_provider[:5]}"
    assert len(at_provider) == provider_ids, "the provider's logs miss sends its counters have"
    assert sorted(sent_ids) == sorted(at_provider), "the jobs decided sent != the sends the provider accepted"
    assert abusive_sent == sum(expected_prefixes.values()) + sum(expected_repeats.values()), abusive_sent
    # Every send was counted once, and nothing else: a job allowed and counted, then taken over from
    # a killed worker, must not be counted again (README: "not counted or refused again").
    counted_numbers, counted_prefixes = counted
    assert counted_numbers == dict(sent_to), (
        f"velocity counts != sends per number: {_differences(counted_numbers, sent_to)}")
    assert counted_prefixes == dict(sent_prefixes), (
        f"velocity counts != sends per prefix: {_differences(counted_prefixes, sent_prefixes)}")
    assert not missed, f"the run never reached: {missed}"
    assert counted_taken_over, f"no velocity-counted job was in the killed workers' hands: {len(taken_over)} taken over"
