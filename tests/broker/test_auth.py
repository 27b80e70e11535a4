"""Failed authentications in the log (broker/auth.py): a burst from one host
is one INFO line when it starts and then one per interval with a count,
each failure's detail at DEBUG; no failure goes uncounted."""

from __future__ import annotations

import asyncio
import logging
import re
from pathlib import Path

import pytest

from broker import Broker
from protocol import PROTOCOL_VERSION, Hello, encode_frame
from tests.helpers import running_broker

FIRST = re.compile(r"conn \d+ ([\d.]+):\d+: authentication failed: (.+) \(more from \1 within ([\d.]+) s are counted")
SUMMARY = re.compile(r"(\d+) more failed authentications? from ([\d.]+) in the last [\d.]+ s")


async def _refused(broker: Broker, source: str, token: str | None) -> None:
    """One HELLO with ``token`` from the loopback address ``source``, read until the broker closes."""
    host, port = broker.address
    reader, writer = await asyncio.open_connection(host, port, local_addr=(source, 0))
    credentials = None if token is None else {"token": token}
    writer.write(encode_frame(Hello(1, PROTOCOL_VERSION, "guess", credentials).to_wire()))
    try:
        refusal = await reader.read()
        assert (b"wrong token" if token is not None else b"requires a token and none was given") in refusal
    finally:
        writer.close()


def _counted(caplog: pytest.LogCaptureFixture, source: str) -> tuple[int, int]:
    """(INFO lines about ``source``'s failures, the failures they account for)."""
    lines = counted = 0
    for record in caplog.records:
        if record.levelno != logging.INFO:
            continue
        if (m := FIRST.match(record.getMessage())) and m[1] == source:
            lines, counted = lines + 1, counted + 1
        elif (m := SUMMARY.match(record.getMessage())) and m[2] == source:
            lines, counted = lines + 1, counted + int(m[1])
    return lines, counted


async def _until_counted(caplog: pytest.LogCaptureFixture, source: str, failures: int) -> None:
    deadline = asyncio.get_running_loop().time() + 10
    while _counted(caplog, source)[1] < failures:
        assert asyncio.get_running_loop().time() < deadline, _counted(caplog, source)
        await asyncio.sleep(0.02)  # polling the log for a condition, with a deadline


async def test_a_burst_of_wrong_tokens_is_a_few_lines_that_count_every_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """100 wrong tokens from one host: the first at INFO with its detail, the
    rest counted in a line at the end of the interval (each one's detail at
    DEBUG, the AUTH_FAILED close too); another host has its own lines, and
    its failure after a quiet interval is a new first line; a count still
    owed when the broker stops is written then. (Each failure was its own
    INFO line: 10,000 wrong tokens made 10,000 lines.)"""
    caplog.set_level(logging.DEBUG, logger="broker")
    interval, n = 1.0, 100
    loop = asyncio.get_running_loop()
    async with running_broker(tmp_path, token="s3cret", auth_failure_delay=0, auth_failure_log_interval=interval) as b:
        await _refused(b, "127.0.0.2", None)
        started = loop.time()
        for _ in range(n // 10):
            await asyncio.gather(*(_refused(b, "127.0.0.1", "wrong") for _ in range(10)))
        took = loop.time() - started
        await _until_counted(caplog, "127.0.0.1", n)  # the count comes by itself, at the interval's end
        lines, counted = _counted(caplog, "127.0.0.1")
        assert counted == n and lines <= 2 * (took / interval + 1), (lines, took)
        details = [r for r in caplog.records if r.getMessage().endswith("authentication failed: a wrong token")]
        assert {r.levelno for r in details} == {logging.DEBUG} and len(details) == n - 1
        closes = [r for r in caplog.records if "closing: " in (m := r.getMessage()) and m.endswith("(AUTH_FAILED)")]
        assert len(closes) == n + 1 and {r.levelno for r in closes} == {logging.DEBUG}

        # 127.0.0.2 has been quiet for an interval: its next failure is a first line again.
        await _refused(b, "127.0.0.2", "wrong")
        firsts = [FIRST.match(r.getMessage()) for r in caplog.records if r.levelno == logging.INFO]
        assert [(m[1], m[2], m[3]) for m in firsts if m and m[1] == "127.0.0.2"] == [
            ("127.0.0.2", "no token", "1"),
            ("127.0.0.2", "a wrong token", "1"),
        ]
        for _ in range(3):  # owed when the broker stops (or at the interval's end, if that comes first)
            await _refused(b, "127.0.0.3", "wrong")
    assert _counted(caplog, "127.0.0.3") == (2, 3)
