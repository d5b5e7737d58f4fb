"""The suppression list against real Redis: the store's operations, `sms-worker suppress` and the
clients' is_suppressed, with numbers normalised on the way in and on the way out."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis

from tests.support.cli import run_cli
from worker.client import AsyncClient, Client
from worker.store import Store
from worker.store.suppression import SUPPRESS_CHUNK


def _r(client: redis.Redis) -> Any:
    return client  # replies are bytes (decode_responses off)


def _calls(client: redis.Redis, command: str) -> int:
    stats = _r(client).info("commandstats")
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))


def _run(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], redis_url: str,
         *args: str) -> tuple[int, str, str]:
    return run_cli(monkeypatch, capsys, redis_url, "suppress", *args)


def _members(client: redis.Redis, key: str = "sms:suppressed") -> set[str]:
    return {member.decode() for member in _r(client).smembers(key)}


# --- the store --------------------------------------------------------------------------------------
def test_suppress_unsuppress_and_lookups(store: Store, redis_client: redis.Redis) -> None:
    assert store.suppress(["41793026727", "4915123456789", "41793026727"]) == 2
    assert store.suppress(["41793026727"]) == 0
    assert _members(redis_client) == {"41793026727", "4915123456789"}
    assert store.suppression_size() == 2
    assert store.suppressed(["4915123456789", "41790000000", "41793026727"]) == [True, False, True]
    assert store.unsuppress(["41793026727", "41790000000"]) == 1
    assert store.suppressed(["41793026727", "4915123456789"]) == [False, True]
    assert store.suppress([]) == 0 and store.unsuppress([]) == 0
    assert store.suppressed([]) == []


def test_a_batch_lookup_is_one_smismember(store: Store, redis_client: redis.Redis) -> None:
    """The dispatcher's batch of 1000 numbers costs Redis one command."""
    numbers = [f"4179{n:07d}" for n in range(1000)]
    store.suppress(numbers[::3])
    before = _calls(redis_client, "smismember")
    found = store.suppressed(numbers)
    assert _calls(redis_client, "smismember") == before + 1
    assert found == [n % 3 == 0 for n in range(1000)]


def test_big_writes_go_in_chunks_and_all_land(store: Store, redis_client: redis.Redis) -> None:
    numbers = [f"4178{n:07d}" for n in range(2 * SUPPRESS_CHUNK + 1)]
    before = _calls(redis_client, "sadd")
    assert store.suppress(numbers) == len(numbers)
    assert _calls(redis_client, "sadd") == before + 3  # no command carries more than SUPPRESS_CHUNK members
    assert store.suppression_size() == len(numbers)
    assert store.unsuppress(numbers[:SUPPRESS_CHUNK + 5]) == SUPPRESS_CHUNK + 5
    assert store.suppression_size() == SUPPRESS_CHUNK - 4


def test_scan_walks_the_whole_list(store: Store) -> None:
    numbers = {f"4177{n:07d}" for n in range(5000)}
    store.suppress(numbers)
    seen: set[str] = set()
    cursor, steps = 0, 0
    while True:
        cursor, page = store.scan_suppressed(cursor, 200)
        seen.update(page)
        steps += 1
        if cursor == 0:
            break
    assert seen == numbers
    assert steps > 1  # a real walk, not one SMEMBERS-sized answer


def test_the_key_follows_the_prefix(redis_client: redis.Redis) -> None:
    other = Store(redis_client, prefix="tenant2")
    other.suppress(["41793026727"])
    assert _members(redis_client, "tenant2:suppressed") == {"41793026727"}
    assert Store(redis_client).suppressed(["41793026727"]) == [False]


# --- the command --------------------------------------------------------------------------------------
def test_add_check_remove_normalise_every_spelling(monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str], redis_url: str,
                                                    redis_client: redis.Redis) -> None:
    code, out, _ = _run(monkeypatch, capsys, redis_url, "add", "+41 79 302 67 27", "0049 151 23456789")
    assert code == 0 and out.startswith("added 2;"), out
    code, out, _ = _run(monkeypatch, capsys, redis_url, "add", "079 302 67 27", "--region", "CH")
    assert code == 0 and "added 0 (1 already on the list)" in out, out
    assert _members(redis_client) == {"41793026727", "4915123456789"}

    code, out, _ = _run(monkeypatch, capsys, redis_url, "check", "0041793026727", "41900123456", "--json")
    assert code == 0
    assert orjson.loads(out) == [
        {"number": "41*******27", "suppressed": True, "region": "CH", "number_type": "MOBILE", "valid": True},
        {"number": "41*******56", "suppressed": False, "region": "CH", "number_type": "PREMIUM_RATE",
         "valid": True},
    ]
    code, out, _ = _run(monkeypatch, capsys, redis_url, "check", "4915123456789", "--show-numbers")
    assert code == 0 and out.split()[:2] == ["4915123456789", "suppressed"], out

    code, out, _ = _run(monkeypatch, capsys, redis_url, "remove", "41793026727", "41790000000")
    assert code == 0 and out.startswith("removed 1 (1 not on the list)"), out
    assert _members(redis_client) == {"4915123456789"}


def test_a_refused_number_refuses_the_command_naming_it(monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str], redis_url: str,
                                                         redis_client: redis.Redis) -> None:
    code, out, err = _run(monkeypatch, capsys, redis_url, "add", "41793026727", "079 302 67 27", "hello")
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1, err
    assert "'079 302 67 27' (no country code" in err and "'hello' (not a phone number)" in err, err
    assert "nothing changed" in err
    assert _members(redis_client) == set()
    code, _, err = _run(monkeypatch, capsys, redis_url, "add", "41793026727", "--region", "XY")
    assert code == 2 and "--region XY" in err
    code, _, err = _run(monkeypatch, capsys, redis_url, "list", "--remove")
    assert code == 2 and "--remove" in err


def test_list_masks_unless_asked_and_stops_at_its_limit(monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str], redis_url: str,
                                                        store: Store) -> None:
    numbers = {f"4176{n:07d}" for n in range(2500)}
    store.suppress(numbers)
    code, out, err = _run(monkeypatch, capsys, redis_url, "list")
    lines = out.splitlines()
    assert code == 0 and len(lines) == 100
    assert all(line.startswith("41") and "*" in line for line in lines), lines[:3]
    assert "2,500 numbers suppressed (showing 100" in err

    code, out, _ = _run(monkeypatch, capsys, redis_url, "list", "--limit", "0", "--show-numbers")
    assert code == 0 and set(out.splitlines()) == numbers and len(out.splitlines()) == len(numbers)

    code, out, _ = _run(monkeypatch, capsys, redis_url, "list", "--limit", "7", "--json", "--show-numbers")
    listed = orjson.loads(out)
    assert listed["size"] == 2500 and listed["shown"] == 7 and set(listed["numbers"]) <= numbers


def _numbers_file(path: Path, count: int, bad: dict[int, str], *, header: str | None = None,
                  spell: bool = False) -> list[str]:
    """`count` data lines of distinct numbers (some spelt with '+' and spaces), `bad` replacing
    the lines at those 1-based data positions; returns the good numbers in normal form."""
    rng = random.Random(count)
    good: list[str] = []
    lines = [header] if header is not None else []
    for n in range(1, count + 1):
        if n in bad:
            lines.append(bad[n])
            continue
        number = f"417{rng.choice('5789')}{n:07d}"
        good.append(number)
        lines.append(f"+{number[:2]} {number[2:4]} {number[4:7]} {number[7:]}" if spell and n % 2 else number)
    path.write_text("\n".join(lines) + "\n")
    return good


def test_import_of_100k_lines_reports_bad_lines_and_stores_every_good_one(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], redis_url: str, store: Store,
        tmp_path: Path) -> None:
    bad = {17: "079 302 67 27", 5000: "not a number", 77_777: "+41 79", 99_999: "+999 123456789"}
    path = tmp_path / "opt-outs.txt"
    good = _numbers_file(path, 100_000, bad, spell=True)
    code, out, err = _run(monkeypatch, capsys, redis_url, "import", str(path))
    assert code == 1, (out, err)  # lines were refused
    refused = [line for line in err.splitlines() if line.startswith("opt-outs.txt line ")]
    assert [line.split(":")[0] for line in refused] == [f"opt-outs.txt line {n}" for n in sorted(bad)]
    assert "line 17: no country code" in refused[0] and "'*** *** ** 27'" in refused[0], refused[0]
    assert "line 77777: too short" in refused[2]
    assert "import opt-outs.txt: line 100,000" in err  # the plain progress line without a terminal
    assert f"imported opt-outs.txt: {len(good):,} numbers" in out and "4 lines refused" in out, out
    assert store.suppression_size() == len(good) == 99_996
    assert all(store.suppressed(good))

    # Again, and then the same file taken off the list.
    code, out, _ = _run(monkeypatch, capsys, redis_url, "import", str(path))
    assert "added 0 (99,996 already on the list or repeated)" in out, out
    code, out, _ = _run(monkeypatch, capsys, redis_url, "import", str(path), "--remove")
    assert "removed 99,996" in out and store.suppression_size() == 0, out


def test_import_of_a_csv_file_takes_the_numbers_column(monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str], redis_url: str,
                                                       store: Store, tmp_path: Path) -> None:
    path = tmp_path / "crm.csv"
    path.write_text("\ufeffname;Mobile;since\n"
                    "Anna;+41 79 302 67 27;2026-01-02\n"
                    "\n"
                    "# a comment\n"
                    '"Muster; Hans";0049 151 23456789;2026-03-04\n'
                    "Eve;;2026-05-06\n")
    code, out, err = _run(monkeypatch, capsys, redis_url, "import", str(path))
    assert code == 1 and "crm.csv line 6: empty" in err, err
    assert _members(store.r) == {"41793026727", "4915123456789"}

    named = tmp_path / "named.csv"
    named.write_text("a,b\n41793026727,4915123456789\n")
    code, _, err = _run(monkeypatch, capsys, redis_url, "import", str(named))
    assert code == 1 and "no header naming the numbers' column" in err, err
    code, out, _ = _run(monkeypatch, capsys, redis_url, "import", str(named), "--column", "B", "--remove")
    assert code == 0 and "removed 1" in out
    assert _members(store.r) == {"41793026727"}

    national = tmp_path / "national.txt"
    national.write_text("079 302 67 28\n078 000 00 01\n")
    code, out, _ = _run(monkeypatch, capsys, redis_url, "import", str(national), "--region", "CH")
    assert code == 0 and "added 2" in out
    code, _, err = _run(monkeypatch, capsys, redis_url, "import", str(tmp_path / "missing.txt"))
    assert code == 2 and "no such file" in err


# --- the clients --------------------------------------------------------------------------------------
def test_the_client_checks_a_number_before_enqueueing(redis_url: str, store: Store) -> None:
    store.suppress(["41793026727"])
    with Client(redis_url, wake=False) as sms:
        assert sms.is_suppressed("41793026727") is True
        assert sms.is_suppressed("+41 79 302 67 27") is True
        assert sms.is_suppressed("0041793026727") is True
        assert sms.is_suppressed("41793026728") is False
        with pytest.raises(ValueError, match="no country code"):
            sms.is_suppressed("079 302 67 27")
    with Client(redis_url, prefix="elsewhere", wake=False) as other:
        assert other.is_suppressed("41793026727") is False


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_the_async_client_checks_a_number(redis_url: str, store: Store, redis_client: redis.Redis,
                                                anyio_backend: str) -> None:
    store.suppress(["4915123456789"])
    async with AsyncClient(redis_url, wake=False) as sms:
        before = _calls(redis_client, "smismember")
        assert await sms.is_suppressed("+49 151 23456789") is True
        assert await sms.is_suppressed("41793026727") is False
        assert _calls(redis_client, "smismember") == before + 2
        with pytest.raises(ValueError, match="not a phone number"):
            await sms.is_suppressed("hello")
