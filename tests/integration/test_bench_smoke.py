"""The benchmark harness (bench/) runs end to end on tiny sizes; it measures nothing meaningful here."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from bench import harness, redis_cost
from bench.stats import median_run, percentile


def test_harness_runs_the_producer_and_a_mini_end_to_end_scenario(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """Scenarios 2 and 1 (ours and the baseline, 300/100 SMS) produce positive numbers, a table and a JSON file."""
    code = harness.main(["--scenarios", "2,1", "--repeat", "1", "--messages", "300", "--baseline-messages", "100",
                         "--producer-jobs", "300", "--results-dir", str(tmp_path)])

    assert code == 0
    [result_file] = tmp_path.glob("*.json")
    result = orjson.loads(result_file.read_bytes())
    assert result["errors"] == {}
    e2e = result["scenarios"]["1"]["runs"][0]
    assert e2e["ours"]["ok"] and e2e["baseline"]["ok"]
    assert e2e["ours"]["rate"] > 0 and e2e["baseline"]["rate"] > 0 and e2e["ratio"] > 0
    assert e2e["ours"]["cpu_us_per_msg"]["workers"] > 0
    assert e2e["ours"]["peak_rss_mb"] > 0
    producer = result["scenarios"]["2"]["runs"][0]
    assert producer["plain"]["rate"] > 0 and producer["with_ids"]["rate"] > 0
    by_target = {row["target"]: row for row in result["rows"] if row["target"]}
    assert {">= 50,000 SMS/s", ">= 35.0 x", ">= 100,000 jobs/s", "<= 150 MB"} <= set(by_target)
    assert all(row["verdict"] in ("PASS", "FAIL") or row["verdict"].startswith("FAIL (") for row in by_target.values())
    assert "peak RSS of one worker process" in capsys.readouterr().out


def test_medians_and_percentiles_of_repetitions() -> None:
    """Repetitions merge field by field into medians; percentiles are nearest-rank."""
    runs = [{"rate": 3.0, "cpu": {"redis": 1.0}, "ok": True}, {"rate": 1.0, "cpu": {"redis": 5.0}, "ok": True},
            {"rate": 2.0, "cpu": {"redis": 3.0}, "ok": False}]

    assert median_run(runs) == {"rate": 2.0, "cpu": {"redis": 3.0}, "ok": False}
    assert percentile(list(range(1, 101)), 99) == 99
    assert percentile([5.0], 50) == 5.0


def test_redis_cost_measures_every_step_of_the_send_path(capsys: pytest.CaptureFixture[str]) -> None:
    """`python -m bench.redis_cost` on 20,000 messages: a cost per step and the ceiling it implies.
    (/proc counts CPU in 10 ms ticks: only the two big steps are sure to show at this size.)"""
    assert redis_cost.main(["-n", "20000", "-r", "1"]) == 0
    out = capsys.readouterr().out
    cost = {}
    for step in ("enqueue (XADD)", "claim.lua", "submit.lua", "settle.lua"):
        line = next(line for line in out.splitlines() if line.strip().startswith(step))
        cost[step] = float(line.split()[-2])
    assert cost["submit.lua"] > 0 and cost["settle.lua"] > 0 and min(cost.values()) >= 0, cost
    assert "one Redis core at 100% sends at most" in out


def test_redis_cost_with_the_guards_runs_their_steps_and_lets_every_job_through(
        capsys: pytest.CaptureFixture[str]) -> None:
    """`--guards` measures each step with the guards off and on: the suppression lookup between the
    claim and the submit, and submit.lua with scenario 7's counted rules, which refuse none of its
    jobs (the step asserts it); the difference is the guards' cost."""
    assert redis_cost.main(["-n", "3000", "-r", "1", "--guards", "--suppressed", "20000"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines()[2:] if line.startswith("  ")]
    assert [row[0] for row in rows] == ["enqueue", "claim.lua", "SMISMEMBER", "submit.lua", "settle.lua", "total"], out
    smismember = next(row for row in rows if row[0] == "SMISMEMBER")
    assert float(smismember[1]) == 0.0, out  # off: no such step
    assert "(the guards:" in out
