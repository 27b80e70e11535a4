"""Refused TLS handshakes in the broker's log (broker/tls.py): each one at
INFO with the peer and why in plain words (no client certificate, one not
signed by --tls-client-ca, an expired one, a plain tidings:// client, a
handshake timeout, a client that does not trust the broker's certificate),
a burst from one host as a few lines that count every one, a port probe
that connects and leaves at DEBUG only, and nothing from the event loop's
exception handler (the conftest hook fails a test on any)."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import ssl
import subprocess
import sys
from pathlib import Path

import pytest

from broker import Broker
from client import Client
from protocol import ConnectionLost
from tests.broker.test_tls import TLS_VERSIONS, served, trusting
from tests.helpers import TlsFiles, assert_broker_healthy, broker_process, running_broker, url_of

FIRST = re.compile(r"conn \d+ ([\d.]+):\d+: TLS handshake failed: (.+) \(more from \1 within ([\d.]+) s are counted")
SUMMARY = re.compile(r"(\d+) more failed TLS handshakes? from ([\d.]+) in the last [\d.]+ s")


def presenting(tls: TlsFiles, version: str, cert: Path | None) -> ssl.SSLContext:
    """A client context that trusts the test CA and presents ``cert`` (made
    with the server's key, as the test's expired and self-signed ones are)."""
    ctx = trusting(tls, version)
    if cert is not None:
        ctx.load_cert_chain(cert, tls.key)
    return ctx


async def logged(caplog: pytest.LogCaptureFixture, source: str, *, lines: int = 1) -> list[re.Match[str]]:
    """The first lines of bursts of failed handshakes from ``source`` at INFO,
    once there are ``lines`` of them (the broker logs a failure when its
    task sees it: maybe after the client has seen the connection close)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while True:
        found = [m for r in caplog.records if r.levelno == logging.INFO and (m := FIRST.match(r.getMessage()))]
        if len(mine := [m for m in found if m[1] == source]) >= lines:
            return mine
        assert loop.time() < deadline, [r.getMessage() for r in caplog.records]
        await asyncio.sleep(0.02)  # polling the log for a condition, with a deadline


def broker_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("broker")]


REFUSED_CERTIFICATES = {
    # case: (the certificate presented (a TlsFiles field), the reason logged)
    "none": (None, "no client certificate, which --tls-client-ca requires"),
    "not signed": ("self_signed", "client certificate not signed by --tls-client-ca (CA file {ca}): self-signed certificate"),
    "expired": ("expired", "client certificate expired"),
}  # fmt: skip


@pytest.mark.parametrize("version", sorted(TLS_VERSIONS))
@pytest.mark.parametrize("case", sorted(REFUSED_CERTIFICATES))
async def test_a_refused_client_certificate_is_logged_with_why_and_the_client_told_what_to_check(
    tmp_path: Path, tls_files: TlsFiles, case: str, version: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Mutual TLS: the broker says at INFO which connection was refused and
    why, in words an operator can act on. (Nothing was logged at all: asyncio
    and uvloop report a failed handshake only in debug mode, at DEBUG.) The
    client, which the broker does not tell why, says what to try for what it
    presented: without a certificate, to give one; with one, that the broker
    most likely refused it (named when the client was told its file), and
    what to check. (It said to give one, --tls-cert, in every case.)"""
    caplog.set_level(logging.INFO, logger="broker")
    field, why = REFUSED_CERTIFICATES[case]
    cert = None if field is None else getattr(tls_files, field)
    async with running_broker(tmp_path, **served(tls_files, tls_client_ca=tls_files.ca)) as broker:
        ctx = presenting(tls_files, version, cert)
        with pytest.raises(ConnectionLost) as refused:
            client = Client(url_of(broker), ssl_context=ctx, reconnect=False)
            client._client_cert = False if cert is None else str(cert)  # (as tidings sets it from --tls-cert)
            async with client:
                pass
        (line,) = await logged(caplog, "127.0.0.1")
        assert (line[2], line[3]) == (why.format(ca=tls_files.ca), "10")
        check = (
            "check that it is signed by the broker's --tls-client-ca and has not expired (the broker's log says why)"
        )
        if cert is None:
            hint = "if the broker requires a client certificate (--tls-client-ca), give one: "
            hint += "ssl_context.load_cert_chain(CERT, KEY), tidings --tls-cert CERT --tls-key KEY"
        else:
            hint = f"the broker refused the TLS handshake, most likely the client certificate {cert}: {check}"
        assert str(refused.value).endswith(f" ({hint})"), refused.value
        # Not told what the context presents: the hint covers both.
        with pytest.raises(ConnectionLost) as refused:
            async with Client(url_of(broker), ssl_context=ctx, reconnect=False):
                pass
        assert str(refused.value).endswith(
            " (if the broker requires a client certificate (--tls-client-ca), give one: ssl_context.load_cert_chain"
            f"(CERT, KEY); if ssl_context has one, the broker most likely refused it: {check})"
        ), refused.value
        await assert_broker_healthy(broker, ssl_context=trusting(tls_files, client_cert=True))
    assert not broker_warnings(caplog)


async def test_the_other_refused_handshakes_are_logged_with_why(
    tmp_path: Path, tls_files: TlsFiles, caplog: pytest.LogCaptureFixture
) -> None:
    """A plain tidings:// client on the TLS port, a client that does not
    trust the broker's certificate, a peer that says nothing until the
    handshake timeout: each an INFO line saying so (each from its own
    address: one host's second failure within the interval is counted, not
    said). A port probe that connects and leaves without a ClientHello is
    not a refused handshake: DEBUG only."""
    caplog.set_level(logging.DEBUG, logger="broker")
    async with running_broker(tmp_path, **served(tls_files, tls_handshake_timeout=0.5)) as broker:
        host, port = broker.address
        with pytest.raises(ConnectionLost, match="if the broker serves TLS there, use tidingss://"):
            async with Client(f"tidings://{host}:{port}", reconnect=False, timeout=5):
                pass
        (line,) = await logged(caplog, "127.0.0.1")
        assert line[2] == "not TLS (a plain tidings:// client?)"

        # A client without the CA (the system's CAs only): it refuses the
        # broker's certificate and closes (Python's sends no alert).
        with pytest.raises(ssl.SSLCertVerificationError):
            await asyncio.open_connection(host, port, ssl=ssl.create_default_context(), local_addr=("127.0.0.4", 0))
        (line,) = await logged(caplog, "127.0.0.4")
        assert line[2] == (
            "the client closed the connection during the handshake, as one that does not trust the broker's "
            "certificate does: give it the CA that signed the certificate (tidings --tls-ca)"
        )

        reader, writer = await asyncio.open_connection(host, port, local_addr=("127.0.0.2", 0))
        assert await asyncio.wait_for(reader.read(), 10) == b""  # closed by the broker
        writer.close()
        (line,) = await logged(caplog, "127.0.0.2")
        assert line[2] == "handshake timeout: no TLS ClientHello within 0.5 s"

        _, writer = await asyncio.open_connection(host, port, local_addr=("127.0.0.3", 0))
        writer.close()
        await writer.wait_closed()
        await assert_broker_healthy(broker, ssl_context=trusting(tls_files))
        assert broker.tls is not None and len(broker.tls) == 0  # no handshake left under way
    probes = [r for r in caplog.records if "closed before its TLS handshake began" in r.getMessage()]
    assert len(probes) == 1 and probes[0].levelno == logging.DEBUG
    assert not [r for r in caplog.records if "127.0.0.3" in r.getMessage() and r.levelno >= logging.INFO]
    assert not broker_warnings(caplog)


async def _plain(broker: Broker, source: str) -> None:
    """A tidings HELLO, in plain TCP, to the TLS port from ``source``: refused at once."""
    host, port = broker.address
    reader, writer = await asyncio.open_connection(host, port, local_addr=(source, 0))
    writer.write(b"\x00\x00\x00\x20" + b"\x95" * 32)  # (a frame's length, then a msgpack array)
    try:
        assert await reader.read() == b""
    finally:
        writer.close()


async def _no_certificate(broker: Broker, tls: TlsFiles) -> None:
    with pytest.raises(ConnectionLost):
        async with Client(url_of(broker), ssl_context=trusting(tls), reconnect=False, timeout=10):
            pass


def _counted(caplog: pytest.LogCaptureFixture, source: str) -> tuple[int, int]:
    """(INFO lines about ``source``'s failed handshakes, the failures they account for)."""
    lines = counted = 0
    for record in caplog.records:
        if record.levelno == logging.INFO:
            if (m := FIRST.match(record.getMessage())) and m[1] == source:
                lines, counted = lines + 1, counted + 1
            elif (m := SUMMARY.match(record.getMessage())) and m[2] == source:
                lines, counted = lines + 1, counted + int(m[1])
    return lines, counted


async def test_a_flood_of_refused_handshakes_is_a_few_lines_that_count_every_one(
    tmp_path: Path, tls_files: TlsFiles, caplog: pytest.LogCaptureFixture
) -> None:
    """1,000 plain clients and 20 without a certificate from one host: its
    first failure at INFO with why, the rest counted in a line per interval
    (each one's own at DEBUG); another host has its own line; a count still
    owed when the broker stops is written then; no handshake, connection or
    descriptor is left behind."""
    caplog.set_level(logging.DEBUG, logger="broker")
    interval, plain, bare = 1.0, 1000, 20
    loop = asyncio.get_running_loop()
    options = served(tls_files, tls_client_ca=tls_files.ca, auth_failure_log_interval=interval)
    async with running_broker(tmp_path, **options) as broker:
        started = loop.time()
        for _ in range(plain // 50):
            await asyncio.gather(*(_plain(broker, "127.0.0.1") for _ in range(50)))
        await asyncio.gather(*(_no_certificate(broker, tls_files) for _ in range(bare)))
        took = loop.time() - started
        await _plain(broker, "127.0.0.2")
        deadline = loop.time() + 10
        while _counted(caplog, "127.0.0.1")[1] < plain + bare:  # the count comes by itself, at the interval's end
            assert loop.time() < deadline, _counted(caplog, "127.0.0.1")
            await asyncio.sleep(0.02)  # polling the log for a condition, with a deadline
        lines, counted = _counted(caplog, "127.0.0.1")
        assert counted == plain + bare and lines <= 2 * (took / interval + 1), (lines, took)
        details = [
            r for r in caplog.records if ": TLS handshake failed: " in r.getMessage() and "(more" not in r.getMessage()
        ]
        assert {r.levelno for r in details} == {logging.DEBUG} and len(details) == plain + bare - 1
        assert {m[2] for m in await logged(caplog, "127.0.0.2")} == {"not TLS (a plain tidings:// client?)"}
        for _ in range(3):  # owed when the broker stops (or at the interval's end, if that comes first)
            await _plain(broker, "127.0.0.3")
        await assert_broker_healthy(broker, ssl_context=trusting(tls_files, client_cert=True))
        assert broker.tls is not None and len(broker.tls) == 0
    assert _counted(caplog, "127.0.0.3") == (2, 3)
    assert not broker_warnings(caplog)


async def test_a_client_that_refuses_the_broker_certificate_with_an_alert_is_named(
    tmp_path: Path, tls_files: TlsFiles, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that says why it ends the handshake (a TLS alert: OpenSSL's
    s_client does, Python's does not): the broker's line names the alert."""
    caplog.set_level(logging.INFO, logger="broker")
    async with running_broker(tmp_path, **served(tls_files)) as broker:
        host, port = broker.address
        s_client = await asyncio.create_subprocess_exec(
            "openssl", "s_client", "-connect", f"{host}:{port}", "-CAfile", str(tls_files.self_signed),
            "-verify_return_error", stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        assert await asyncio.wait_for(s_client.wait(), 30) != 0
        (line,) = await logged(caplog, "127.0.0.1")
        assert line[2] == (
            "the client refused the broker's certificate (its alert: unknown CA): "
            "give it the CA that signed the certificate (tidings --tls-ca)"
        )
    assert not broker_warnings(caplog)


async def test_a_handshake_under_way_when_the_broker_stops_is_abandoned_quietly(
    tmp_path: Path, tls_files: TlsFiles, caplog: pytest.LogCaptureFixture
) -> None:
    """A peer in the middle of its handshake (it sent nothing yet) when the
    broker stops: its connection is closed, its task ends, nothing is logged
    above DEBUG and no task or socket is left (the test loop fails on a
    stray task error; unclosed sockets are ResourceWarnings, errors here)."""
    caplog.set_level(logging.DEBUG, logger="broker")
    async with running_broker(tmp_path, **served(tls_files)) as broker:
        host, port = broker.address
        reader, writer = await asyncio.open_connection(host, port, local_addr=("127.0.0.5", 0))
        assert broker.tls is not None
        deadline = asyncio.get_running_loop().time() + 10
        while len(broker.tls) == 0:  # (accepted in a later turn of the loop)
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.01)  # polling a condition, with a deadline
    assert len(broker.tls) == 0
    assert await asyncio.wait_for(reader.read(), 10) == b""
    writer.close()
    assert not [r for r in caplog.records if "127.0.0.5" in r.getMessage() and r.levelno >= logging.INFO]
    assert not broker_warnings(caplog)


def test_the_daemon_logs_refused_certificates_and_tidings_says_what_to_check(
    tmp_path: Path, tls_files: TlsFiles
) -> None:
    """The operator's walkthrough, with the real processes: `tidings ping`
    without a certificate, with one the broker's CA did not sign, with an
    expired one (from $TIDINGS_TLS_CERT), and `tidings raw` with one the CA
    did not sign (stdin empty): exit 2 and one line saying what to
    try, naming the file; the broker (uvloop, its log configured by its
    main) logs the first at INFO with why, and the others, from the same
    host within the interval, at DEBUG and counted in one INFO line."""
    args = ["--tls-cert", str(tls_files.cert), "--tls-key", str(tls_files.key), "--tls-client-ca", str(tls_files.ca)]
    with broker_process(tmp_path / "data", *args, "--log-level", "debug") as bp:
        tidings, where = [sys.executable, "-m", "client.cat"], ["--url", bp.url, "--tls-ca", str(tls_files.ca)]
        ping = [*tidings, "ping", "-c", "1", *where]
        key = str(tls_files.key)
        runs = [
            run_cli(*ping),
            run_cli(*ping, "--tls-cert", str(tls_files.self_signed), "--tls-key", key),
            run_cli(*ping, env={"TIDINGS_TLS_CERT": str(tls_files.expired), "TIDINGS_TLS_KEY": key}),
            run_cli(*tidings, "raw", *where, "--tls-cert", str(tls_files.self_signed), "--tls-key", key),
        ]
        assert bp.stop() == 0
    check = "check that it is signed by the broker's --tls-client-ca and has not expired (the broker's log says why)"
    hints = [
        "if the broker requires a client certificate (--tls-client-ca), give one: "
        "ssl_context.load_cert_chain(CERT, KEY), tidings --tls-cert CERT --tls-key KEY",
        f"the broker refused the TLS handshake, most likely the client certificate {tls_files.self_signed} "
        f"(--tls-cert): {check}",
        f"the broker refused the TLS handshake, most likely the client certificate {tls_files.expired} "
        f"($TIDINGS_TLS_CERT): {check}",
        f"the broker refused the TLS handshake, most likely the client certificate {tls_files.self_signed} "
        f"(--tls-cert): {check}",
    ]
    for (code, err), hint in zip(runs, hints, strict=True):
        assert code == 2 and err.startswith("tidings: ") and err.endswith(f" ({hint})\n"), err
        assert len(err.splitlines()) == 1, err
    failed = [line for line in bp.log if "TLS handshake failed" in line or "more failed TLS" in line]
    assert [line.split(" ", 3)[2] for line in failed] == ["INFO", "DEBUG", "DEBUG", "DEBUG", "INFO"], failed
    assert re.search(
        r"INFO    broker\.tls: conn \d+ 127\.0\.0\.1:\d+: TLS handshake failed: no client certificate, which "
        r"--tls-client-ca requires \(more from 127\.0\.0\.1 within 10 s are counted in one line\)$",
        failed[0],
    ), failed[0]
    assert (
        f"TLS handshake failed: client certificate not signed by --tls-client-ca (CA file {tls_files.ca})" in failed[1]
    )
    assert failed[2].endswith("TLS handshake failed: client certificate expired\n"), failed[2]
    assert re.search(
        r"INFO    broker.tls: 3 more failed TLS handshakes from 127\.0\.0\.1 in the last [\d.]+ s$", failed[4]
    )
    assert not [line for line in bp.log if " WARNING " in line or " ERROR " in line or "Traceback" in line], bp.log


def run_cli(*cmd: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run ``tidings``: its exit code and stderr."""
    done = subprocess.run(cmd, input="", capture_output=True, text=True, timeout=30, env={**os.environ, **(env or {})})
    return done.returncode, done.stderr
