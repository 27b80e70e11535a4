"""The benchmark harness never rots: a --quick run of every scenario passes its own checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from bench.check import PayloadMaker, SeqChecker, merge, parse, percentiles
from bench.cli import SCENARIOS

ROOT = Path(__file__).resolve().parents[2]


def test_quick_run_of_every_scenario(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(tmp_path), "--no-progress"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    files = list(tmp_path.glob("*.jsonl"))
    assert len(files) == 1
    records = [json.loads(line) for line in files[0].read_text().splitlines()]
    assert {r["scenario"] for r in records} == set(SCENARIOS)
    for r in records:
        assert r["status"] == "ok", r
        assert r["check"]["lost"] == 0, r
        assert r["check"]["duplicated"] == 0, r
        assert r["msgs_per_s"] and r["msgs_per_s"] > 0, r
        assert r["python"] and r["loop"] in ("uvloop", "asyncio")
        if r["scenario"] != "codec":
            assert r["broker_peak_rss_kb"] and r["broker_peak_rss_kb"] > 0, r
    latency = next(r for r in records if r["scenario"] == "latency")
    assert latency["latency"]["publish_deliver"]["p99_ms"] is not None
    assert "| scenario |" in proc.stdout


def test_quick_run_over_tls(tmp_path: Path) -> None:
    """--tls: tidings serves TLS to the workers (and to the harness's STATUS calls)."""
    env = {k: v for k, v in os.environ.items() if k != "SSL_CERT_FILE"}
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "publish", "fanout", "--quick", "--tls", "--out", str(tmp_path), "--no-progress"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**env, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    records = [json.loads(line) for f in tmp_path.glob("*.jsonl") for line in f.read_text().splitlines()]
    assert sorted({r["scenario"] for r in records}) == ["fanout", "publish"]
    for r in records:
        assert r["status"] == "ok" and r["durability"] == "fsync always, TLS", r
        assert r["fsyncs"], r  # STATUS over TLS worked


def test_checker_counts_loss_duplicates_and_reordering() -> None:
    maker = PayloadMaker(3, 100)
    payload = maker.make(7, 123)
    assert len(payload) == 100
    assert parse(payload) == (3, 7, 123)
    c = SeqChecker({3: 5})
    for seq in (0, 2, 1, 2, 4, 9):
        c.see(3, seq)
    assert (c.unique, c.dups, c.ooo, c.unknown) == (4, 1, 1, 1)
    assert merge([c.summary()], {3: 5}, each=True)["lost"] == 1
    # Competing consumers: the union must be complete; overlap is duplication.
    a, b = SeqChecker({0: 4}), SeqChecker({0: 4})
    for seq in (0, 1):
        a.see(0, seq)
    for seq in (1, 2, 3):
        b.see(0, seq)
    m = merge([a.summary(), b.summary()], {0: 4}, each=False)
    assert (m["lost"], m["duplicated"]) == (0, 1)


def test_percentiles() -> None:
    p = percentiles(list(range(1, 1001)))
    assert p["n"] == 1000
    assert p["max_ms"] == 1000 / 1e6
    assert percentiles([])["p99_ms"] is None
