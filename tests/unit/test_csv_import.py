"""`sms-worker enqueue --csv`: all or nothing, errors by CSV line in line order, a dry run, ids and
`meta.` columns, one clear line for a file or template that cannot be used (against a real Redis)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis

from worker.cli import main
from worker.store import Store, connect

GOOD = "41790000001"
Cli = Callable[..., tuple[int, str, str]]


@pytest.fixture
def cli(redis_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Cli:
    monkeypatch.setenv("REDIS_URL", redis_url)

    def run(*args: str) -> tuple[int, str, str]:
        code = main(list(args))
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    client = connect(redis_url)
    yield client
    client.close()


def _csv(tmp_path: Path, text: str | bytes, name: str = "people.csv") -> str:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return str(path)


def _queued(r: redis.Redis, lane: str = "bulk") -> list[dict[str, Any]]:
    return [orjson.loads(fields[b"job"]) for _, fields in Store(r).r.xrange(Store(r).outbox(lane))]


def test_one_bad_row_queues_nothing_and_names_its_line(cli: Cli, r: redis.Redis, tmp_path: Path) -> None:
    """A file with a bad row is refused whole: nothing queued, exit 1, the bad row named by line."""
    path = _csv(tmp_path, f"to,name\n{GOOD},Ana\n12,Bob\n41790000003,Cleo\n")
    code, _, err = cli("enqueue", "--csv", path, "--text-template", "Hi {name}")
    assert code == 1
    assert _queued(r) == []
    assert "line 3: to: must be an international number" in err
    assert "nothing queued" in err and "1 of 3 rows refused" in err


def test_errors_are_listed_in_line_order_one_line_each(cli: Cli, r: redis.Redis, tmp_path: Path) -> None:
    """Rows refused for different causes (bad number, empty template column, stray field, a quoted
    field spanning lines) come out sorted by the line the row starts on, one line per row."""
    path = _csv(tmp_path, (
        "to,name\n"           # 1
        "12,Ana\n"            # 2: bad number
        f"{GOOD},\n"          # 3: empty name
        f"{GOOD},Bob,extra\n"  # 4: more fields than the header
        f'1,"Cleo\n'           # 5: a bad number in a record that spans lines 5-6
        'Smith"\n'            # 6
        f"{GOOD},Dan\n"       # 7: fine
    ))
    code, _, err = cli("enqueue", "--csv", path, "--text-template", "Hi {name}")
    assert code == 1 and _queued(r) == []
    lines = [line for line in err.splitlines() if " line " in line and "refused" not in line]
    assert [line.split(" line ")[1].split(":")[0] for line in lines] == ["2", "3", "4", "5"]
    assert "name: empty" in lines[1]
    assert "3 fields, the header has 2" in lines[2]


def test_dry_run_validates_and_writes_nothing(cli: Cli, r: redis.Redis, tmp_path: Path) -> None:
    """--dry-run reports what would be queued, or the refused rows, and never writes to Redis."""
    path = _csv(tmp_path, f"to,name\n{GOOD},Ana\n41790000002,Bob\n")
    code, out, err = cli("enqueue", "--csv", path, "--text-template", "Hi {name}", "--dry-run")
    assert code == 0, err
    assert "dry run" in out and "2 rows valid" in out and "nothing written" in out
    assert r.keys("*") == []
    bad = _csv(tmp_path, f"to,name\n{GOOD},Ana\n12,Bob\n", "bad.csv")
    code, _, err = cli("enqueue", "--csv", bad, "--text-template", "Hi {name}", "--dry-run")
    assert code == 1 and "line 3:" in err and r.keys("*") == []


def test_ids_and_meta_columns(cli: Cli, r: redis.Redis, tmp_path: Path) -> None:
    """`id` is the producer id (a rerun is all duplicates); `meta.<key>` cells become metadata,
    merged over --metadata; empty cells are left out."""
    path = _csv(tmp_path, f"to,name,id,meta.customer,meta.segment\n{GOOD},Ana,ana-1,7,vip\n41790000002,Bob,bob-1,8,\n")
    code, out, err = cli("enqueue", "--csv", path, "--text-template", "Hi {name}", "--metadata", '{"campaign": "x"}')
    assert code == 0, err
    assert "queued 2, duplicates 0 of 2 rows" in out
    jobs = _queued(r)
    assert [j["id"] for j in jobs] == ["ana-1", "bob-1"]
    assert jobs[0]["metadata"] == {"campaign": "x", "customer": "7", "segment": "vip"}
    assert jobs[1]["metadata"] == {"campaign": "x", "customer": "8"}
    assert jobs[0]["text"] == "Hi Ana"
    code, out, err = cli("enqueue", "--csv", path, "--text-template", "Hi {name}")
    assert code == 0 and "queued 0, duplicates 2 of 2 rows" in out


def test_a_file_that_is_not_utf8_is_one_clear_line(cli: Cli, r: redis.Redis, tmp_path: Path) -> None:
    """A Latin-1 file is refused with one line naming the line of the first bad byte, no traceback."""
    path = _csv(tmp_path, f"to,name\n{GOOD},Ana\n{GOOD},Jos\xe9\n".encode("latin-1"))
    code, _, err = cli("enqueue", "--csv", path, "--text-template", "Hi {name}")
    assert code == 1 and _queued(r) == []
    [line] = err.strip().splitlines()
    assert "not UTF-8" in line and "line 3" in line


@pytest.mark.parametrize(("template", "expected"), [
    ("Hello {name", "--text-template"),
    ("Hello {nmae}", "{nmae} is not a column"),
    ("Hello {}", "must name a column"),
    ("Hello {name.upper}", "{name.upper} is not a column"),
    ("Hello {name!r}", "plain {column}"),
])
def test_a_bad_template_is_one_clear_line(
    cli: Cli, r: redis.Redis, tmp_path: Path, template: str, expected: str
) -> None:
    """A broken or unknown placeholder is one error line for the whole file, not one per row."""
    path = _csv(tmp_path, f"to,name\n{GOOD},Ana\n41790000002,Bob\n")
    code, _, err = cli("enqueue", "--csv", path, "--text-template", template)
    assert code == 2 and _queued(r) == []  # a wrong flag value: a usage error
    [line] = err.strip().splitlines()
    assert expected in line, line
    assert "Traceback" not in err


def test_redis_refusing_part_of_an_import_is_reported_honestly(cli: Cli, r: redis.Redis, tmp_path: Path) -> None:
    """Redis out of memory part-way: the report says how many rows were queued (matching the outbox),
    which lines were not, and that a rerun is safe because every row has an id; the rerun then
    queues exactly the rest."""
    rows = 6000
    filler = "x" * 600
    path = _csv(tmp_path, "to,id,text\n" + "".join(f"4179{i:07d},row-{i},{filler}\n" for i in range(rows)))
    used = int(r.info("memory")["used_memory"])
    r.config_set("maxmemory-policy", "noeviction")
    r.config_set("maxmemory", str(used + 2_500_000))
    try:
        code, _, err = cli("enqueue", "--csv", path)
    finally:
        r.config_set("maxmemory", "0")
    assert code == 1
    written = int(r.xlen(Store(r).outbox("bulk")))
    assert 0 < written < rows, written
    assert f"queued {written} of {rows} rows" in err
    assert "not queued" in err and "every row has an id" in err and "Traceback" not in err
    code, out, err = cli("enqueue", "--csv", path)
    assert code == 0, err
    assert f"queued {rows - written}, duplicates {written} of {rows} rows" in out
