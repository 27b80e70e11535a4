"""Every exit code: 0 ok, 1 usage, 2 cannot connect, 3 refused. One line on stderr, never a traceback.

(``run`` itself asserts "no traceback, one line" for every failing run.)
"""

from __future__ import annotations

import re
import signal
import socket
import threading
from pathlib import Path

import pytest

from protocol import PROTOCOL_VERSION, Hello, encode_frame
from tests.helpers import broker_process

from .conftest import Lines, cli_env, finish, free_port, run, run_all, start

USAGE_ERRORS = [
    [],
    ["bogus"],
    ["pub"],
    ["pub", "Q", "E", '{"id": 1'],  # not JSON
    ["pub", "Q", "E", "two words"],  # neither JSON nor a bare word
    ["pub", "Q", "E", '{"$base64": "!!"}'],
    ["pub", "Q", "E", "1", "--header", "novalue"],
    ["pub", "Q", "E", "1", "extra"],
    ["sub", "Q", "--from", "yesterday"],
    ["sub", "Q", "-n", "many"],
    ["sub", "Q", "-n", "0"],
    ["fetch", "Q", "--wait", "-1"],
    ["fetch", "Q", "--max", "0"],
    ["status", "--url", "http://example.com"],
    ["ping", "--bogus"],
    ["raw", "--linger", "soon"],
]


def test_usage_errors_exit_1() -> None:
    # Found before connecting: the URL points at a port where nothing listens.
    nowhere = f"tidings://127.0.0.1:{free_port()}"
    commands = [args + (["--url", nowhere] if args and "--url" not in args else []) for args in USAGE_ERRORS]
    for args, got in zip(USAGE_ERRORS, run_all(commands), strict=True):
        assert got.returncode == 1, (args, got.returncode, got.stderr)
        assert got.stderr.strip(), args
        assert got.stdout == "", args


def test_option_values_no_request_can_carry_are_usage_errors_naming_the_option(url: str, queue: str) -> None:
    """`--id ''`, `fetch --max 2000000` and the like were caught by the
    client's own checks after connecting and reported as refusals (exit 3,
    "refused: BAD_REQUEST: FETCH: max_messages must be in 0..1048576",
    though 0 is refused too, and no option named); `fetch --wait inf` was an
    internal error. They are usage errors now, found before connecting, each
    naming its option and the range it takes (found by a new-user walkthrough)."""
    cases = {
        ("pub", queue, "E", "1", "--id", ""): "argument --id: must not be empty",
        ("pub", queue, "E", "1", "--id", "x" * 256): "argument --id: 256 characters, more than 255",
        ("fetch", queue, "--max", "2000000"): "argument --max: 2000000 is not in 1..1048576",
        ("sub", queue, "--prefetch", "2000000"): "argument --prefetch: 2000000 is not in 1..1048576",
        ("fetch", queue, "--wait", "inf"): "argument --wait: inf is more than 1099511628 seconds",
        ("fetch", queue, "--from", str(1 << 64)): f"argument --from: {1 << 64} is more than the largest offset",
        ("seek", queue, "-d", "d", "--to", "1960-01-01T00:00:00Z"): "argument --to: '1960-01-01T00:00:00Z' is before 1970",
    }  # fmt: skip
    for args, got in zip(cases, run_all([[*args, "--url", url] for args in cases]), strict=True):
        assert (got.returncode, got.stdout) == (1, ""), (args, got.returncode, got.stderr)
        assert f"tidings {args[0]}: error: {cases[args]}" in got.stderr, (args, got.stderr)
    assert queue not in run("queues", "--json", url=url).stdout  # nothing reached the broker

    # With --id, stdin line N is published with the id ID-N: one that gets too long stops the import there.
    long_id = "x" * 253  # ID-1 .. ID-9 fit in 255 characters, ID-10 does not
    lines = run("pub", queue, "E", "--id", long_id, input="".join(f"{n}\n" for n in range(1, 12)), url=url)
    assert (lines.returncode, lines.stdout) == (1, f"published 9 messages to {queue} (offsets 0..8)\n")
    assert lines.stderr.startswith(
        "tidings: the message id of stdin line 10 (--id ID-10) is 256 characters, more than 255 (the import stopped"
    ), lines.stderr


def test_a_url_with_a_token_or_a_path_is_a_usage_error() -> None:
    """tidings://s3cret@host:port/path was accepted, the token and the path
    ignored: the command then ran without the credentials meant for it."""
    port = free_port()
    got = run("ping", "--url", f"tidings://s3cret@127.0.0.1:{port}/path")
    assert (got.returncode, got.stdout) == (1, "")
    assert got.stderr.startswith(f"tidings: URL 'tidings://***@127.0.0.1:{port}/path' has a user or token before '@'")
    assert "--token" in got.stderr and "s3cret" not in got.stderr
    path = run("ping", "--url", f"tidings://127.0.0.1:{port}/DB")
    assert path.returncode == 1 and "has more than tidings://host:port" in path.stderr


def test_tls_files_given_with_a_plain_tidings_url_are_a_usage_error(url: str) -> None:
    """--tls-ca (or --tls-cert and --tls-key) with a tidings:// URL was
    ignored without a word, and the command went on in plain TCP: most
    likely the URL was meant to be tidingss:// (found by an operator
    walkthrough). From $TIDINGS_TLS_*, which may be set for other brokers,
    they are still ignored (said with -v)."""
    bare = url.removeprefix("tidings://")
    ca = run("ping", "--tls-ca", "ca.pem", url=url)
    assert (ca.returncode, ca.stdout) == (1, "")
    assert ca.stderr == f"tidings: --tls-ca is for TLS, but {url} is plain TCP: use tidingss://{bare}\n"
    for args in (["raw"], ["pub", "Q", "E", "1"]):
        pair = run(*args, "--tls-cert", "c.pem", "--tls-key", "k.pem", url=url, input="")
        assert pair.returncode == 1, args
        assert pair.stderr == f"tidings: --tls-cert and --tls-key are for TLS, but {url} is plain TCP: use tidingss://{bare}\n"  # fmt: skip

    env = cli_env(TIDINGS_TLS_CA="missing-ca.pem", TIDINGS_TLS_CERT="missing-cert.pem")
    quiet = run("ping", url=url, env=env)
    assert (quiet.returncode, quiet.stderr) == (0, ""), quiet.stderr
    told = run("ping", "-v", url=url, env=env)
    assert "$TIDINGS_TLS_CA and $TIDINGS_TLS_CERT ignored: " in told.stderr, told.stderr
    # With tidingss:// they are used, and an error names where the file came from.
    tls = run("ping", "--url", f"tidingss://{bare}", env=cli_env(TIDINGS_TLS_CA="missing-ca.pem"))
    assert tls.stderr == "tidings: cannot read $TIDINGS_TLS_CA missing-ca.pem: No such file or directory\n"
    alone = run("ping", "--url", f"tidingss://{bare}", env=env)
    assert alone.stderr.startswith("tidings: $TIDINGS_TLS_CERT without a key (--tls-key, $TIDINGS_TLS_KEY): ")


def test_a_connection_option_before_the_command_says_where_it_goes(url: str) -> None:
    """`tidings --url URL ping` said "argument COMMAND: invalid choice: 'tidings://...'"."""
    got = run("--url", url, "ping")
    assert (got.returncode, got.stdout) == (1, "")
    assert got.stderr.endswith("tidings: error: --url goes after the command: tidings ping --url ...\n"), got.stderr
    assert run("--token=s3cret", "status").stderr.endswith(
        "--token goes after the command: tidings status --token ...\n"
    )


def test_no_broker_exits_2() -> None:
    port = free_port()
    url = f"tidings://127.0.0.1:{port}"
    cases = [["ping"], ["status"], ["pub", "Q", "E", "1"], ["sub", "Q", "-n", "1"], ["fetch", "Q"], ["raw"]]
    for args, got in zip(cases, run_all([[*a, "--url", url] for a in cases], input=""), strict=True):
        assert got.returncode == 2, (args, got.stderr)
        assert f"127.0.0.1:{port}" in got.stderr, args
        assert len(got.stderr.strip().splitlines()) == 1, args


def test_refused_exits_3_with_the_code_name(url: str) -> None:
    got = run("pub", "../x", "E", "1", url=url)
    assert got.returncode == 3
    assert "INVALID_NAME" in got.stderr and "'../x'" in got.stderr
    sub = run("sub", "Q", "-e", "bad event!", url=url)
    assert sub.returncode == 3 and "INVALID_NAME" in sub.stderr


def test_a_message_too_large_is_payload_too_large_whoever_refuses_it(url: str, queue: str) -> None:
    """Over the frame limit the client refuses it before sending; under it,
    but with a record over the broker's limit, the broker does. Both say
    PAYLOAD_TOO_LARGE and count in bytes (the client said FRAME_TOO_LARGE,
    the broker left out the unit)."""
    local = run("pub", queue, "E", input=f'"{"x" * 2_000_000}"\n', url=url)
    remote = run("pub", queue, "E", input=f'"{"x" * 1_048_400}"\n', url=url)  # the frame fits, the record not
    assert (local.returncode, remote.returncode) == (3, 3), (local.stderr, remote.stderr)
    assert re.fullmatch(
        r"tidings: refused: PAYLOAD_TOO_LARGE: message of \d+ bytes \(its PUBLISH frame\) "
        r"exceeds the frame limit of 1048576 bytes\n", local.stderr
    ), local.stderr  # fmt: skip
    assert re.fullmatch(
        r"tidings: refused by the broker: PAYLOAD_TOO_LARGE: message of \d+ bytes exceeds the limit of \d+ bytes\n",
        remote.stderr,
    ), remote.stderr
    assert local.stdout == remote.stdout == f"published 0 messages to {queue}\n"


def test_broker_refusing_the_token_exits_3(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIDINGS_TOKEN", "s3cret")  # read by the broker subprocess; run() strips it for the CLI
    with broker_process(tmp_path) as bp:
        cases = [["ping"], ["status"], ["pub", "Q", "E", "1"], ["raw"]]
        for args, got in zip(cases, run_all([[*a, "--token", "wrong", "--url", bp.url] for a in cases], input=""),
                             strict=True):  # fmt: skip
            assert got.returncode == 3, (args, got.stderr)
            assert got.stderr == "tidings: refused by the broker: AUTH_FAILED: wrong token\n", args
        ok = run("ping", "--token", "s3cret", url=bp.url)
        assert ok.returncode == 0, ok.stderr


def test_a_peer_that_is_not_a_broker_exits_2() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]

        def answer() -> None:  # an HTTP server's answer to whatever it got
            for _ in range(2):
                conn, _ = server.accept()
                with conn:
                    conn.recv(1024)
                    conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

        thread = threading.Thread(target=answer, daemon=True)
        thread.start()
        url = f"tidings://127.0.0.1:{port}"
        for got in run_all([["ping", "--url", url], ["raw", "--url", url]], input=""):
            assert got.returncode == 2, got.stderr
            assert "does not speak the tidings protocol" in got.stderr and "'HTTP'" in got.stderr
        thread.join(5)


def test_broker_going_away_mid_subscription_exits_2(tmp_path: Path) -> None:
    for graceful in (True, False):
        with broker_process(tmp_path) as bp:
            run("pub", "Q", "E", "1", url=bp.url)
            proc = start("sub", "Q", "--from", "earliest", url=bp.url)
            assert proc.stdout is not None
            Lines(proc.stdout.fileno()).readline()  # subscribed and delivering
            if graceful:
                bp.stop()  # SIGTERM: the broker says SHUTTING_DOWN, then closes
            else:
                bp.kill()
            code, err = finish(proc)
        assert code == 2, err
        if graceful:
            assert err == "tidings: the broker ended the connection: SHUTTING_DOWN: broker is shutting down\n"
        else:
            assert "closed the connection" in err


def test_sub_follow_carries_on_across_a_broker_restart(tmp_path: Path) -> None:
    """``sub --follow`` reconnects instead of exiting 2: the subscription
    resumes after the last message it printed, on the restarted broker, and
    -n ends it as usual."""
    with broker_process(tmp_path) as bp:
        run("pub", "Q", "E", "1", url=bp.url)
        proc = start("sub", "Q", "--from", "earliest", "--follow", "-n", "2", "--format", "raw",
                     url=bp.url)  # fmt: skip
        assert proc.stdout is not None
        lines = Lines(proc.stdout.fileno())
        assert lines.readline() == b"1"
        port = bp.port
        bp.stop()
    with broker_process(tmp_path, "--port", str(port)) as again:
        run("pub", "Q", "E", "2", url=again.url)
        assert lines.readline() == b"2"
        code, err = finish(proc)
    assert code == 0, err


def test_sub_follow_waits_for_a_broker_that_is_not_up_yet(tmp_path: Path) -> None:
    """``sub --follow`` exited 2 at once when the broker was down at start,
    though its help promises retries for up to 60 s: it waits now, says so
    in one line, and subscribes once the broker is up (found by a new-user
    walkthrough). Ctrl-C while it waits is exit 130: it did nothing yet."""
    with socket.socket() as held:  # the port, bound but not listening: connects are refused, nobody takes it
        held.bind(("127.0.0.1", 0))
        port = held.getsockname()[1]
        url = f"tidings://127.0.0.1:{port}"
        proc = start("sub", "Q", "--follow", "--from", "earliest", "-n", "1", "--format", "raw", url=url)
        stopped = start("sub", "Q", "--follow", url=url)
        assert proc.stderr is not None and stopped.stderr is not None
        waiting = (
            f"tidings: waiting for the broker at 127.0.0.1:{port} (cannot connect to 127.0.0.1:{port}: "
            "Connection refused): --follow tries again for up to 60 s, Ctrl-C to stop"
        ).encode()
        assert Lines(proc.stderr.fileno()).readline() == waiting
        assert Lines(stopped.stderr.fileno()).readline() == waiting
        stopped.send_signal(signal.SIGINT)
        code, err = finish(stopped)
        assert (code, err) == (130, ""), err
    with broker_process(tmp_path, "--port", str(port)) as bp:
        run("pub", "Q", "E", "hello", url=bp.url)
        assert proc.stdout is not None
        assert Lines(proc.stdout.fileno()).readline() == b"hello"
        code, err = finish(proc)
    assert (code, err) == (0, ""), err
    # Without --follow, nothing waits: exit 2 at once (test_no_broker_exits_2).


def test_a_broker_at_its_connection_limit_exits_2(tmp_path: Path) -> None:
    """TOO_MANY_CONNECTIONS comes before any HELLO is answered: exit 2, like
    any other connection the broker ends, with its code on stderr."""
    with (
        broker_process(tmp_path, "--max-connections", "1") as bp,
        socket.create_connection(("127.0.0.1", bp.port)) as held,
    ):
        held.settimeout(10)
        held.sendall(encode_frame(Hello(1, PROTOCOL_VERSION, "holder").to_wire()))
        assert held.recv(4096)  # its WELCOME: the one connection allowed is taken
        got = run("ping", url=bp.url)
        assert got.returncode == 2, got.stderr
        assert got.stderr == (
            "tidings: the broker ended the connection: TOO_MANY_CONNECTIONS: the broker has reached its connection limit\n"
        )
