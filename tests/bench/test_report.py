"""The table of several rounds (median run per case) and the versus lines, from records shaped like real ones."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench import cli, report

ROOT = Path(__file__).resolve().parents[2]

# Real records (bench/results, a93c01c, with the fields this branch adds: round, rounds, fsync_before_confirm).
PUBLISH: dict[str, Any] = {
    "ts": "2026-12-01T04:20:40+00:00", "run_id": "330b42511219", "round": 1, "rounds": 1, "broker": "tidings",
    "durability": "fsync always", "fsync_before_confirm": True, "scenario": "publish", "variant": "window=1000",
    "params": {"count": 100000, "window": 1000, "publishers": 1, "payload": 100}, "messages": 100000,
    "seconds": 0.8326, "msgs_per_s": 120099.2,
    "latency": {"publish_confirm_closed_loop": {"n": 100000, "p50_ms": 8.2348, "p90_ms": 12.3504, "p99_ms": 21.8878,
                                                "p999_ms": 23.7566, "max_ms": 23.9213, "mean_ms": 8.9087}},
    "client_cpu_s": 0.8, "broker_cpu_s": 0.7, "broker_cpu_us_per_msg": 7.0, "broker_peak_rss_kb": 31540,
    "other_cpu_share": 0.02, "fsyncs": 350, "fsyncs_per_1000": 3.5,
    "check": {"expected": 100000, "received": 100000, "lost": 0, "duplicated": 0, "out_of_order": 0, "unknown": 0},
    "errors": [], "python": "3.11.7", "implementation": "CPython", "loop": "uvloop", "commit": "a93c01c", "cpus": 2,
    "platform": "Linux-6.18.44-fc-v669-x86_64-with-glibc2.36", "load_1m": 0.85, "status": "ok",
    "command": "python -m bench --peer redis-always --peer redis-everysec --peer nats --chart --no-progress",
}  # fmt: skip
LATENCY: dict[str, Any] = {
    "ts": "2026-12-01T04:21:20+00:00", "run_id": "330b42511219", "round": 1, "rounds": 1, "broker": "tidings",
    "durability": "fsync always", "fsync_before_confirm": True, "scenario": "latency", "variant": "rate=5000/s",
    "params": {"count": 50000, "rate": 5000.0, "publishers": 1, "payload": 100, "prefetch": 1000, "tick_ms": 1.0,
               "schedule": "open loop, 1 ms ticks"},
    "messages": 50000, "seconds": 10.0021, "msgs_per_s": 4998.9,
    "latency": {
        "publish_deliver": {"n": 50000, "p50_ms": 0.4601, "p90_ms": 0.6553, "p99_ms": 0.8978, "p999_ms": 1.7806,
                            "max_ms": 2.7455, "mean_ms": 0.4972},
        "publish_confirm": {"n": 50000, "p50_ms": 0.3986, "p90_ms": 0.5712, "p99_ms": 0.7896, "p999_ms": 1.6127,
                            "max_ms": 2.6101, "mean_ms": 0.4314},
        "schedule_send": {"n": 50000, "p50_ms": 0.0243, "p90_ms": 0.0401, "p99_ms": 0.0771, "p999_ms": 0.2258,
                          "max_ms": 1.7082, "mean_ms": 0.0302},
    },
    "client_cpu_s": 6.1, "broker_cpu_s": 2.74, "broker_cpu_us_per_msg": 54.8, "broker_peak_rss_kb": 31232,
    "other_cpu_share": 0.01, "fsyncs": 9997, "fsyncs_per_1000": 199.94,
    "check": {"expected": 50000, "received": 50000, "lost": 0, "duplicated": 0, "out_of_order": 0, "unknown": 0},
    "errors": [], "python": "3.11.7", "implementation": "CPython", "loop": "uvloop", "commit": "a93c01c", "cpus": 2,
    "platform": "Linux-6.18.44-fc-v669-x86_64-with-glibc2.36", "load_1m": 0.85, "status": "ok",
    "command": "python -m bench --peer redis-always --peer redis-everysec --peer nats --chart --no-progress",
}  # fmt: skip

PEERS = {
    "redis-always": ("AOF appendfsync always (fsync before reply)", True),
    "redis-everysec": ("AOF appendfsync everysec (confirms before fsync)", False),
    "nats": ("file storage, confirms before fsync (periodic sync)", False),
}


def run(
    template: dict[str, Any], broker: str = "tidings", round_no: int = 1, rounds: int = 1, **fields: Any
) -> dict[str, Any]:
    """A copy of ``template`` as run by ``broker`` in one round, with some fields changed."""
    rec = copy.deepcopy(template)
    if broker != "tidings":
        rec["durability"], rec["fsync_before_confirm"] = PEERS[broker]
        rec["fsyncs"] = rec["fsyncs_per_1000"] = None
    rec.update(broker=broker, round=round_no, rounds=rounds, **fields)
    return rec


def with_p99(rec: dict[str, Any], p99_ms: float) -> dict[str, Any]:
    rec["latency"]["publish_deliver"]["p99_ms"] = p99_ms
    return rec


def rounds_of(template: dict[str, Any], values: list[float], **fields: Any) -> list[dict[str, Any]]:
    """One run per value (msgs/s), rounds 1..n."""
    n = len(values)
    return [run(template, round_no=k, rounds=n, msgs_per_s=v, **fields) for k, v in enumerate(values, 1)]


def latency_rounds(p99s: list[float], msgs_per_s: list[float]) -> list[dict[str, Any]]:
    n = len(p99s)
    return [
        with_p99(run(LATENCY, round_no=k, rounds=n, msgs_per_s=m), p)
        for k, (p, m) in enumerate(zip(p99s, msgs_per_s, strict=True), 1)
    ]


def cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


# --- the median run ---------------------------------------------------------


def test_median_of_an_odd_count_is_the_middle_msgs_per_s() -> None:
    [group] = report.median_runs(rounds_of(PUBLISH, [150_000.0, 100_000.0, 120_000.0]))
    assert (group["round"], group["msgs_per_s"]) == (3, 120_000.0)
    assert group["runs"] == {"count": 3, "low": 100_000.0, "high": 150_000.0}


def test_median_of_an_even_count_is_the_worse_middle_msgs_per_s() -> None:
    [group] = report.median_runs(rounds_of(PUBLISH, [100_000.0, 140_000.0, 120_000.0, 90_000.0]))
    assert (group["round"], group["msgs_per_s"]) == (1, 100_000.0)
    [pair] = report.median_runs(rounds_of(PUBLISH, [140_000.0, 90_000.0]))
    assert pair["round"] == 2


def test_latency_median_is_by_p99_lower_is_better() -> None:
    # msgs/s would pick another run: the p99 of publish->deliver decides.
    [odd] = report.median_runs(latency_rounds([1.2, 0.8, 1.0], [4999.0, 4990.0, 4998.0]))
    assert (odd["round"], odd["latency"]["publish_deliver"]["p99_ms"]) == (3, 1.0)
    [even] = report.median_runs(latency_rounds([0.8, 1.2, 1.0, 0.9], [4990.0, 4999.0, 4991.0, 4998.0]))
    assert (even["round"], even["latency"]["publish_deliver"]["p99_ms"]) == (3, 1.0)
    assert even["runs"] == {"count": 4, "low": 0.8, "high": 1.2}


def test_a_bad_round_shows_in_status_and_losses() -> None:
    runs = rounds_of(PUBLISH, [120_000.0, 50_000.0, 130_000.0])
    runs[1]["check"].update(lost=5, received=99_995)
    runs[1]["status"] = "FAILED"
    runs[2]["check"].update(duplicated=2, out_of_order=1)
    runs[2]["status"] = "WARN"
    [group] = report.median_runs(runs)
    assert group["round"] == 1  # the median itself was clean
    assert group["status"] == "FAILED"
    assert (group["check"]["lost"], group["check"]["duplicated"], group["check"]["out_of_order"]) == (5, 2, 1)
    row = cells(report.markdown(runs).splitlines()[2])
    assert row[-4:] == ["5", "2", "1", "FAILED"]
    assert runs[0]["check"]["lost"] == 0  # the records themselves are untouched


def test_a_run_without_a_figure_counts_but_is_not_the_median() -> None:
    runs = rounds_of(PUBLISH, [120_000.0, 100_000.0])
    runs.append(run(PUBLISH, round_no=3, rounds=3, msgs_per_s=None, errors=["WorkerError: boom"], status="FAILED"))
    [group] = report.median_runs(runs)
    assert group["round"] == 2
    assert group["status"] == "FAILED"
    assert group["runs"] == {"count": 3, "low": 100_000.0, "high": 120_000.0}


# --- the table ----------------------------------------------------------------


def test_one_round_table_is_unchanged() -> None:
    records = [run(PUBLISH), run(PUBLISH, "redis-everysec", msgs_per_s=40874.0), run(LATENCY)]
    lines = report.markdown(records).splitlines()
    assert cells(lines[0]) == report.HEADER
    assert "runs" not in cells(lines[0])
    assert lines[2] == (
        "| publish | window=1000 pub→confirm (closed loop) | tidings | fsync always | 100,000 | 120,099 | 8.235 | "
        "21.888 | 23.757 | 23.921 | 7.00 | 30.8 | 3.50 | 0 | 0 | 0 | ok |"
    )
    assert lines[3].split(" | ")[5] == "40,874"
    assert lines[5] == "|  | pub→confirm |  |  |  |  | 0.399 | 0.790 | 1.613 | 2.610 |  |  |  |  |  |  |  |"
    assert len(lines) == 2 + 2 + 3


def test_repeated_table_has_a_runs_column_after_msgs_per_s() -> None:
    records = [
        *rounds_of(PUBLISH, [101_000.0, 145_000.0, 120_000.0]),
        *latency_rounds([0.81, 1.2, 0.9], [4999.0, 4999.0, 4999.0]),
    ]
    records.sort(key=lambda r: r["round"])  # as they run: round by round
    lines = report.markdown(records).splitlines()
    header = cells(lines[0])
    assert header.index("runs") == header.index("msgs/s") + 1
    assert len(lines) == 2 + 1 + 3
    publish, latency, confirm = cells(lines[2]), cells(lines[3]), cells(lines[4])
    assert publish[header.index("msgs/s")] == "120,000"
    assert publish[header.index("runs")] == "3: 101k\N{EN DASH}145k"
    assert latency[header.index("runs")] == "3: 0.81\N{EN DASH}1.20 ms"
    assert latency[header.index("p99 ms")] == "0.900"
    assert len(publish) == len(latency) == len(confirm) == len(header)
    assert confirm[header.index("runs")] == ""
    assert confirm[header.index("p99 ms")] == "0.790"


def test_runs_cell_keeps_three_figures() -> None:
    window1 = report.markdown(rounds_of(PUBLISH, [3099.0, 4180.0], variant="window=1")).splitlines()
    assert cells(window1[2])[6] == "2: 3.10k\N{EN DASH}4.18k"
    codec = report.markdown(rounds_of(PUBLISH, [537382.0, 1190000.0], scenario="codec")).splitlines()
    assert cells(codec[2])[6] == "2: 537k\N{EN DASH}1.19M"


# --- versus -------------------------------------------------------------------


def main_table() -> list[dict[str, Any]]:
    """The a93c01c main table's publish and latency rows (bench/RESULTS.md), one round."""
    window1: dict[str, Any] = {"variant": "window=1", "messages": 10000}
    return [
        run(PUBLISH, "tidings", msgs_per_s=120099.2),
        run(PUBLISH, "tidings", msgs_per_s=3099.0, **window1),
        run(PUBLISH, "redis-always", msgs_per_s=40366.0),
        run(PUBLISH, "redis-always", msgs_per_s=5143.0, **window1),
        run(PUBLISH, "redis-everysec", msgs_per_s=40874.0),
        run(PUBLISH, "redis-everysec", msgs_per_s=11169.0, **window1),
        run(PUBLISH, "nats", msgs_per_s=21409.0),
        run(PUBLISH, "nats", msgs_per_s=6798.0, **window1),
        with_p99(run(LATENCY, "tidings"), 0.898),
        with_p99(run(LATENCY, "redis-always"), 2.485),
        with_p99(run(LATENCY, "redis-everysec"), 2.711),
        with_p99(run(LATENCY, "nats"), 1.700),
    ]


def test_versus_lines() -> None:
    codec = run(PUBLISH, scenario="codec", variant="publish-encode", durability=None, msgs_per_s=423880.0)
    assert report.versus(report.median_runs([codec, *main_table()])) == [
        "publish window=1000: tidings 120,099/s vs best peer redis-everysec 40,874/s (2.94x)",
        "publish window=1: tidings 3,099/s vs best peer redis-everysec 11,169/s (0.28x)",
        "publish window=1: tidings 3,099/s vs best fsync-before-confirm peer redis-always 5,143/s (0.60x)",
        "latency rate=5000/s p99 pub→deliver: tidings 0.90 ms vs best peer nats 1.70 ms",
    ]


def test_versus_needs_tidings_and_a_peer() -> None:
    table = main_table()
    assert report.versus([r for r in table if r["broker"] == "tidings"]) == []
    assert report.versus([r for r in table if r["broker"] != "tidings"]) == []


def test_versus_uses_the_median_runs_and_flags_a_failure() -> None:
    records = [
        *rounds_of(PUBLISH, [100_000.0, 150_000.0, 120_000.0]),
        *[run(PUBLISH, "nats", round_no=k, rounds=3, msgs_per_s=v) for k, v in ((1, 20_000.0), (2, 30_000.0))],
        run(PUBLISH, "nats", round_no=3, rounds=3, msgs_per_s=40_000.0, status="WARN"),
    ]
    assert report.versus(report.median_runs(records)) == [
        "publish window=1000: tidings 120,000/s vs best peer nats 30,000/s (4.00x) [nats WARN]"
    ]


def test_versus_says_when_tidings_did_not_fsync_before_confirming() -> None:
    records = [
        run(PUBLISH, variant="window=1", msgs_per_s=9000.0, durability="fsync never", fsync_before_confirm=False),
        run(PUBLISH, "redis-always", variant="window=1", msgs_per_s=4500.0),
    ]
    assert report.versus(report.median_runs(records))[1] == (
        "publish window=1: tidings 9,000/s vs best fsync-before-confirm peer redis-always 4,500/s (2.00x)"
        " (tidings ran with fsync never)"
    )


def test_noisy_runs_say_whether_other_processes_or_the_hypervisor_took_the_cpu(capsys: Any) -> None:
    quiet = run(PUBLISH, other_cpu_share=0.25, steal_share=0.1)
    busy = run(PUBLISH, "nats", other_cpu_share=0.6)
    stolen = run(PUBLISH, "redis-always", other_cpu_share=0.02, steal_share=0.42)
    both = run(PUBLISH, "redis-everysec", other_cpu_share=0.3, steal_share=0.2)
    old = run(PUBLISH, "redis-everysec", round_no=2, rounds=2)  # PUBLISH was recorded before steal_share existed
    assert [report.noise(r) for r in (quiet, busy, stolen, both, old)] == [
        None,
        "other 60%",
        "steal 42%",
        "other 30%, steal 20%",
        None,
    ]
    report.print_table([quiet, busy, stolen], report.environment(), "python -m bench publish")
    out = capsys.readouterr().out
    assert "publish window=1000 nats: other 60%; publish window=1000 redis-always: steal 42%" in out


# --- the command line -----------------------------------------------------------


def test_repeat_must_be_at_least_one(capsys: Any) -> None:
    assert cli.main(["codec", "--repeat", "0", "--no-progress"]) == 2
    assert "--repeat must be at least 1" in capsys.readouterr().err


def test_codec_in_two_rounds(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "codec", "--quick", "--repeat", "2", "--out", str(tmp_path), "--no-progress"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    [jsonl] = tmp_path.glob("*.jsonl")
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [r["round"] for r in records] == [1] * 6 + [2] * 6
    assert {r["rounds"] for r in records} == {2}
    assert [r["variant"] for r in records[:6]] == [r["variant"] for r in records[6:]]
    table = [line for line in proc.stdout.splitlines() if line.startswith("|")]
    header = cells(table[0])
    assert header[5:7] == ["msgs/s", "runs"]
    assert len(table) == 2 + 6
    assert all(cells(line)[6].startswith("2: ") for line in table[2:])
    assert "median of 2 runs" in proc.stdout
