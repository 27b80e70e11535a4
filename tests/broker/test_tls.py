"""TLS (RELIABILITY.md A5): tidingss:// end to end on TLS 1.2 and 1.3; the
client verifies certificates by default (an unknown CA, a self-signed or an
expired certificate are refused); a plaintext client on the TLS port and a
TLS client on the plaintext port fail at once with a hint, and a connection
that never finishes its handshake is closed after the TLS handshake
timeout; mutual TLS; the broker's and the CLI's TLS options."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import ssl
import sys
import time
from pathlib import Path

import pytest

from client import Client
from protocol import ConnectionLost
from tests.helpers import TlsFiles, assert_broker_healthy, broker_process, running_broker, url_of

TLS_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


def trusting(tls: TlsFiles, version: str | None = None, *, client_cert: bool = False) -> ssl.SSLContext:
    """A client context that trusts the test CA (pinned to one TLS version if given)."""
    ctx = ssl.create_default_context(cafile=tls.ca)
    if version is not None:
        ctx.minimum_version = ctx.maximum_version = TLS_VERSIONS[version]
    if client_cert:
        ctx.load_cert_chain(tls.client_cert, tls.client_key)
    return ctx


def served(tls: TlsFiles, cert: Path | None = None, **overrides: object) -> dict[str, object]:
    return {"tls_cert": cert or tls.cert, "tls_key": tls.key, **overrides}


@pytest.mark.parametrize("version", sorted(TLS_VERSIONS))
async def test_publish_subscribe_and_status_over_tls(
    tmp_path: Path, tls_files: TlsFiles, version: str, caplog: pytest.LogCaptureFixture
) -> None:
    """End to end over TLS, and a clean close logs nothing (the broker asked
    for a half-close after the client's BYE, which TLS does not have: asyncio
    logged a WARNING for every TLS connection that ended)."""
    async with running_broker(tmp_path, **served(tls_files)) as broker:
        url = url_of(broker)
        assert url.startswith("tidingss://")
        ctx = trusting(tls_files, version)
        async with Client(url, name="tls", ssl_context=ctx) as c:
            sub = await c.subscribe("Q", durable="d", start="earliest")
            assert await c.publish_many("Q", [("E", i) for i in range(100)]) == list(range(100))
            got = [await sub.next(timeout=10) for _ in range(100)]
            assert [m.payload for m in got] == list(range(100))
            for m in got:
                await m.ack()
            assert [conn["name"] for conn in (await c.status())["connections"]] == ["tls"]
            assert c._sock is not None and c._sock.transport is not None
            assert c._sock.transport.get_extra_info("ssl_object").version() == f"TLSv{version}"
        await assert_broker_healthy(broker, ssl_context=ctx)
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize("case", ["unknown CA", "self-signed", "expired"])
async def test_the_client_verifies_the_certificate_by_default(tmp_path: Path, tls_files: TlsFiles, case: str) -> None:
    cert = {"unknown CA": tls_files.cert, "self-signed": tls_files.self_signed, "expired": tls_files.expired}[case]
    async with running_broker(tmp_path, **served(tls_files, cert)) as broker:
        ctx = None if case == "unknown CA" else trusting(tls_files)  # None: the system's CAs
        with pytest.raises(ConnectionLost) as refused:
            async with Client(url_of(broker), ssl_context=ctx, reconnect=False, timeout=5):
                pass
        assert "CERTIFICATE_VERIFY_FAILED" in str(refused.value)
        why = {"unknown CA": "unable to get local issuer", "self-signed": "self-signed", "expired": "expired"}[case]
        assert why in str(refused.value)
        assert "--tls-ca" in str(refused.value)  # the hint
        if case == "unknown CA":
            await assert_broker_healthy(broker, ssl_context=trusting(tls_files))


async def test_a_plaintext_client_on_the_tls_port_fails_at_once_and_a_silent_one_is_closed(
    tmp_path: Path, tls_files: TlsFiles
) -> None:
    async with running_broker(tmp_path, **served(tls_files, tls_handshake_timeout=0.5)) as broker:
        host, port = broker.address
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(
            ConnectionLost, match=r"before answering HELLO \(if the broker serves TLS there, use tidingss://\)"
        ):
            async with Client(f"tidings://{host}:{port}", reconnect=False, timeout=5):
                pass
        assert loop.time() - started < 1.0  # the HELLO is no TLS record: refused at once, no timeout
        # A peer that connects and says nothing is closed by the handshake timeout.
        reader, writer = await asyncio.open_connection(host, port)
        started = loop.time()
        assert await asyncio.wait_for(reader.read(), 10) == b""
        assert 0.4 <= loop.time() - started < 5.0
        writer.close()
        await assert_broker_healthy(broker, ssl_context=trusting(tls_files))


async def test_a_tls_client_on_the_plaintext_port_fails_at_once(tmp_path: Path, tls_files: TlsFiles) -> None:
    async with running_broker(tmp_path) as broker:
        host, port = broker.address
        with pytest.raises(ConnectionLost, match="does not speak TLS there: use tidings://"):
            async with Client(f"tidingss://{host}:{port}", ssl_context=trusting(tls_files), reconnect=False, timeout=5):
                pass
        await assert_broker_healthy(broker)


@pytest.mark.parametrize("version", sorted(TLS_VERSIONS))
async def test_mutual_tls_requires_a_client_certificate(tmp_path: Path, tls_files: TlsFiles, version: str) -> None:
    async with running_broker(tmp_path, **served(tls_files, tls_client_ca=tls_files.ca)) as broker:
        with pytest.raises(ConnectionLost, match="if the broker requires a client certificate"):
            async with Client(url_of(broker), ssl_context=trusting(tls_files, version), reconnect=False, timeout=5):
                pass
        mine = trusting(tls_files, version, client_cert=True)
        async with Client(url_of(broker), name="mtls", ssl_context=mine) as c:
            assert await c.publish("Q", "E", "hello") == 0
        await assert_broker_healthy(broker, ssl_context=mine)


async def _run(*cmd: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:  # it did not exit (a broker that started after all): stop it, by its pid
            proc.kill()
            await proc.wait()
    return proc.returncode, out.decode(), err.decode()


async def test_the_cli_options(tmp_path: Path, tls_files: TlsFiles) -> None:
    tidings = [sys.executable, "-m", "client.cat"]
    async with running_broker(tmp_path, **served(tls_files)) as broker:
        url = url_of(broker)
        code, out, err = await _run(*tidings, "ping", "-c", "1", "--url", url, "--tls-ca", str(tls_files.ca))
        assert (code, err) == (0, "") and out.startswith("pong from")
        code, out, err = await _run(*tidings, "ping", "-c", "1", "--url", url)
        assert code == 2 and "CERTIFICATE_VERIFY_FAILED" in err and "not permitted" not in err
        assert len(err.strip().splitlines()) == 1, err
        missing = tmp_path / "missing.pem"
        code, out, err = await _run(*tidings, "ping", "--url", url, "--tls-ca", str(missing))
        assert (code, err) == (1, f"tidings: cannot read --tls-ca {missing}: No such file or directory\n")
        for cert, key in ((missing, tls_files.client_key), (tls_files.client_cert, missing)):  # the one missing named
            code, out, err = await _run(*tidings, "ping", "--url", url, "--tls-cert", str(cert), "--tls-key", str(key))
            option = "--tls-cert" if cert == missing else "--tls-key"
            assert (code, err) == (1, f"tidings: cannot read {option} {missing}: No such file or directory\n")
        code, out, err = await _run(*tidings, "ping", "--url", url, "--tls-ca", str(tls_files.client_key))
        assert code == 1 and err.startswith(f"tidings: cannot use --tls-ca {tls_files.client_key}: "), err
        raw = [*tidings, "raw", "--url", url, "--tls-ca", str(tls_files.ca)]
        proc = await asyncio.create_subprocess_exec(*raw, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        out_b, _ = await asyncio.wait_for(proc.communicate(b'["PING", 5]\n'), 30)
        assert proc.returncode == 0 and '"PONG"' in out_b.decode()
    async with running_broker(tmp_path, **served(tls_files, tls_client_ca=tls_files.ca)) as broker:
        ping = [*tidings, "ping", "-c", "1", "--url", url_of(broker), "--tls-ca", str(tls_files.ca)]
        code, out, err = await _run(
            *ping, "--tls-cert", str(tls_files.client_cert), "--tls-key", str(tls_files.client_key)
        )
        assert (code, err) == (0, "") and out.startswith("pong from")
        code, out, err = await _run(*ping)
        assert code == 2 and "requires a client certificate" in err
        code, out, err = await _run(*ping, "--tls-cert", str(tls_files.client_cert))
        assert code == 1 and "--tls-cert and --tls-key go together" in err


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        # Options that do not go together: a usage error (2), the usage line first.
        (["--tls-cert", "{cert}"], 2, "needs its key"),
        (["--tls-client-ca", "{ca}"], 2, "need TLS"),
        # Files that cannot be used: the start fails (1).
        # Which file is missing is named (ssl's own error names none).
        (["--tls-cert", "{missing}", "--tls-key", "{key}"], 1, "cannot read the TLS certificate file {missing}: No such"),
        (["--tls-cert", "{cert}", "--tls-key", "{missing}"], 1, "cannot read the TLS key file {missing}: No such"),
        (["--tls-cert", "{cert}", "--tls-key", "{key}", "--tls-client-ca", "{missing}"], 1,
         "cannot read the TLS client CA file {missing}: No such"),
        # Which file is wrong, and how (OpenSSL says "[SSL] PEM lib" for each).
        (["--tls-cert", "{cert}", "--tls-key", "{ca}"], 1,
         "cannot use the TLS key file {ca}: no PEM private key in it (a '-----BEGIN ...PRIVATE KEY-----' block)"),
        (["--tls-cert", "{garbage}", "--tls-key", "{key}"], 1,
         "cannot use the TLS certificate file {garbage}: no PEM certificate in it"),
        (["--tls-cert", "{cut}", "--tls-key", "{key}"], 1,
         "cannot use the TLS certificate file {cut}: its PEM block has no '-----END' line: the file is cut short"),
    ],
)  # fmt: skip
async def test_the_broker_refuses_to_start_with_bad_tls_options(
    tmp_path: Path, tls_files: TlsFiles, args: list[str], code: int, message: str
) -> None:
    garbage, cut = tmp_path / "garbage.pem", tmp_path / "cut.pem"
    garbage.write_text("garbage\n")
    cut.write_bytes(Path(tls_files.cert).read_bytes()[: Path(tls_files.cert).stat().st_size // 2])
    files = {"cert": tls_files.cert, "key": tls_files.key, "ca": tls_files.ca, "missing": tmp_path / "missing.pem",
             "garbage": garbage, "cut": cut}  # fmt: skip
    argv = [a.format(**files) for a in args]
    cmd = [sys.executable, "-m", "broker", "--port", "0", "--data-dir", str(tmp_path / "data"), *argv]
    got, _, err = await _run(*cmd)
    assert got == code and message.format(**files) in err and "Traceback" not in err, err
    assert err.startswith("usage: tidings-broker ") == (code == 2), err
    assert not (tmp_path / "data").exists()  # refused before touching the data directory


# --- reloading the certificate (SIGHUP) ---------------------------------------------------


async def _served_certificate(host: str, port: int) -> bytes:
    """The certificate (DER) the broker presents to a new connection, unverified."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    _, writer = await asyncio.open_connection(host, port, ssl=ctx)
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.wait_closed()
    assert der is not None
    return der


def _der(pem: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(pem.read_text())


def _own_copies(tmp_path: Path, tls: TlsFiles) -> tuple[Path, Path]:
    """The server's certificate and key copied where the test may rewrite them."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    shutil.copyfile(tls.cert, cert)
    shutil.copyfile(tls.key, key)
    return cert, key


async def test_a_reload_gives_new_connections_the_new_certificate_and_keeps_open_ones(
    tmp_path: Path, tls_files: TlsFiles, caplog: pytest.LogCaptureFixture
) -> None:
    """A renewed certificate is served from the reload on, without a restart;
    a connection made before carries on. Files that cannot be used (missing,
    a key that does not match) leave the certificate in force and log an
    ERROR naming the file and why. (A reload re-read only --users: a renewed
    certificate needed a restart, which ends every connection.)"""
    cert, key = _own_copies(tmp_path, tls_files)
    caplog.set_level(logging.INFO, logger="broker")
    async with running_broker(tmp_path / "data", tls_cert=cert, tls_key=key) as broker:
        host, port = broker.address
        async with Client(url_of(broker), name="before", ssl_context=trusting(tls_files)) as before:
            assert await before.publish("Q", "E", 1) == 0
            assert await _served_certificate(host, port) == _der(tls_files.cert)
            shutil.copyfile(tls_files.self_signed, cert)  # the same key, another certificate
            assert broker.reload()
            assert await _served_certificate(host, port) == _der(tls_files.self_signed)
            assert await before.publish("Q", "E", 2) == 1
            assert (before.reconnects, before.conn_id) == (0, 1)

            cert.unlink()
            assert not broker.reload()
            cert.write_text(tls_files.client_cert.read_text())  # (the client's key's certificate)
            assert not broker.reload()
            assert await _served_certificate(host, port) == _der(tls_files.self_signed)
            assert await before.publish("Q", "E", 3) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors[0] == (
        f"TLS files not reloaded, the certificate in force stays: cannot read the TLS certificate file {cert}: "
        "No such file or directory"
    )
    mismatch = (
        f"TLS files not reloaded, the certificate in force stays: cannot use TLS certificate {cert} with key {key}: "
    )
    assert len(errors) == 2 and errors[1].startswith(mismatch) and "KEY_VALUES_MISMATCH" in errors[1], errors
    reloaded = [r.getMessage() for r in caplog.records if "reloaded" in r.getMessage() and r.levelno == logging.INFO]
    assert reloaded == [
        f"TLS certificate {cert}, key {key} reloaded: new connections use them, open ones keep theirs"
    ], reloaded


async def test_a_reload_reads_the_client_ca_again(tmp_path: Path, tls_files: TlsFiles) -> None:
    """Mutual TLS: a reload takes the new --tls-client-ca file too (here one
    that did not sign the client's certificate: refused from then on, while
    the connection made before goes on; and back)."""
    ca = tmp_path / "clients-ca.pem"
    shutil.copyfile(tls_files.ca, ca)
    async with running_broker(tmp_path / "data", **served(tls_files, tls_client_ca=ca)) as broker:
        mine = trusting(tls_files, client_cert=True)
        async with Client(url_of(broker), name="before", ssl_context=mine) as before:
            shutil.copyfile(tls_files.self_signed, ca)  # a CA file that did not sign the client's certificate
            assert broker.reload()
            with pytest.raises(ConnectionLost):
                async with Client(url_of(broker), ssl_context=mine, reconnect=False, timeout=5):
                    pass
            assert await before.publish("Q", "E") == 0
            shutil.copyfile(tls_files.ca, ca)
            assert broker.reload()
            async with Client(url_of(broker), ssl_context=mine, reconnect=False, timeout=5) as after:
                assert await after.publish("Q", "E") == 1
            assert before.reconnects == 0


def test_sighup_reloads_the_certificate_of_the_daemon(tmp_path: Path, tls_files: TlsFiles) -> None:
    """SIGHUP with TLS and no --users: the certificate is read again (and no
    warning about a missing users file); a broken file is an ERROR naming
    it, and the broker goes on serving the certificate in force."""
    cert, key = _own_copies(tmp_path, tls_files)
    with broker_process(tmp_path / "data", "--tls-cert", str(cert), "--tls-key", str(key)) as bp:

        def signalled(text: str, count: int = 1) -> None:
            os.kill(bp.pid, signal.SIGHUP)
            deadline = time.monotonic() + 10
            while sum(text in line for line in bp.log) < count:
                assert time.monotonic() < deadline, "".join(bp.log[-20:])
                time.sleep(0.01)  # polling the log for a condition, with a deadline

        shutil.copyfile(tls_files.self_signed, cert)
        signalled("TLS certificate")
        assert asyncio.run(_served_certificate("127.0.0.1", bp.port)) == _der(tls_files.self_signed)
        cert.write_text("not a certificate\n")
        signalled("TLS files not reloaded")
        assert asyncio.run(_served_certificate("127.0.0.1", bp.port)) == _der(tls_files.self_signed)
        assert bp.stop() == 0
    (failed,) = [line for line in bp.log if "TLS files not reloaded" in line]
    assert " ERROR " in failed and f"cannot use the TLS certificate file {cert}: no PEM certificate" in failed, failed
    assert not [line for line in bp.log if "WARNING" in line or "Traceback" in line], bp.log
