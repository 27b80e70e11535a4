"""``tidings status``, ``ping`` and ``--help``."""

from __future__ import annotations

import importlib.metadata
import json
import signal
import time
from pathlib import Path

from client import Client
from client.cli.commands import render_status
from tests.helpers import broker_process

from .conftest import Lines, finish, lines_of, run, run_all, start

COMMANDS = ["pub", "sub", "fetch", "status", "ping", "raw", "delete", "seek", "queues", "durables"]


def test_status_tables_and_json(url: str, queue: str) -> None:
    run("pub", queue, "E", input="1\n2\n", url=url)
    run("fetch", queue, "--durable", "audit", "--max", 1, url=url)
    table = run("status", url=url)
    assert table.returncode == 0, table.stderr
    text = table.stdout
    for section in ("CONNECTIONS", "QUEUES", "DURABLES"):
        assert section in text
    sections = {block.split("\n", 1)[0]: block for block in text.split("\n\n")}
    (row,) = [line.split() for line in sections["QUEUES"].splitlines() if line.startswith(queue + " ")]
    assert row[:4] == [queue, "0", "2", "2"]  # QUEUE FIRST NEXT MESSAGES
    (drow,) = [line.split() for line in sections["DURABLES"].splitlines() if line.startswith(queue + " ")]
    assert drow[1:5] == ["audit", "*", "1", "1"]  # DURABLE EVENTS CURSOR LAG

    info = json.loads(run("status", "--json", url=url).stdout)
    assert {"server", "connections", "queues", "durables"} <= set(info)
    (q,) = [q for q in info["queues"] if q["name"] == queue]
    assert (q["first_offset"], q["next_offset"]) == (0, 2)
    assert any(c["name"] == "tidings-status" for c in info["connections"])


def test_status_says_1_connection() -> None:
    """The header said "1 connections" to a `tidings status` alone on the broker."""
    heads = [render_status({"server": {"conn_count": n}}).splitlines()[0] for n in (1, 2)]
    assert ["  1 connection  " in heads[0], "  2 connections  " in heads[1]] == [True, True], heads


def test_queues_and_durables_list(url: str, queue: str) -> None:
    other = queue + "-other"
    run("pub", queue, "E", input="1\n2\n3\n", url=url)
    run("pub", other, "E", "x", url=url)
    run("fetch", queue, "--durable", "audit", "--max", 2, url=url)
    run("fetch", other, "--durable", "mirror", url=url)

    table = run("queues", url=url)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split()[:4] == ["QUEUE", "FIRST", "NEXT", "MESSAGES"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert rows[queue][1:4] == ["0", "3", "3"] and rows[other][1:4] == ["0", "1", "1"]
    listed = json.loads(run("queues", "--json", url=url).stdout)
    assert {queue, other} <= {q["name"] for q in listed}

    mine = run("durables", queue, url=url).stdout.splitlines()
    assert mine[0].split()[:5] == ["QUEUE", "DURABLE", "EVENTS", "CURSOR", "LAG"]
    assert [line.split()[:5] for line in mine[1:]] == [[queue, "audit", "*", "2", "1"]]
    every = json.loads(run("durables", "--json", url=url).stdout)
    assert {(queue, "audit"), (other, "mirror")} <= {(d["queue"], d["name"]) for d in every}
    assert [d["name"] for d in json.loads(run("durables", queue, "--json", url=url).stdout)] == ["audit"]


async def test_a_connection_holding_fetched_messages_is_shown_as_a_fetcher(url: str, queue: str) -> None:
    """A seek or delete of a durable is refused (CONFLICT) while a connection
    holds messages it fetched and did not ack; the table shows that
    connection as a fetcher (CONSUMERS counts push subscriptions only: it
    said 0 while CONFLICT said "in use by 1 consumer")."""
    async with Client(url, name="holder") as c:
        await c.publish(queue, "E", 1)
        (held,) = await c.fetch(queue, durable="hd", max_messages=1)
        lines = run("durables", queue, url=url).stdout.splitlines()
        assert lines[0].split()[-2:] == ["CONSUMERS", "FETCHERS"]
        assert lines[1].split()[-2:] == ["0", "1"], lines
        refused = run("seek", queue, "--durable", "hd", "--to", "earliest", url=url)
        assert refused.returncode == 3 and "conn " in refused.stderr and "'holder'" in refused.stderr, refused.stderr
        await held.ack()
        await c.ping()  # (acks are sent in batches: this one is in by the PONG)
        lines = run("durables", queue, url=url).stdout.splitlines()
        assert lines[1].split()[-2:] == ["0", "0"], lines


def test_a_cursor_behind_what_retention_kept_is_shown_behind_first(tmp_path: Path) -> None:
    """After retention dropped messages a durable had not acked, STATUS
    still gives its old ack floor, and `durables` showed "CURSOR 1  LAG 0"
    beside a queue whose FIRST is 5 (found by a new-user walkthrough): it
    reads as a durable with nothing to read at the start of the log. The
    cursor is marked now, in `durables` and `status`; the JSON is STATUS's."""
    args = ("--retention-age", "1", "--retention-check", "0.2")
    with broker_process(tmp_path, *args) as bp:
        run("pub", "Q", "E", input="1\n2\n3\n4\n5\n", url=bp.url)
        assert run("fetch", "Q", "--durable", "d", "--max", 1, url=bp.url).returncode == 0  # acks offset 0
        deadline = time.monotonic() + 10
        while json.loads(run("queues", "--json", url=bp.url).stdout)[0]["first_offset"] == 0:
            assert time.monotonic() < deadline, "retention never ran"
            time.sleep(0.2)  # polling: the broker checks every 0.2 s, and drops what is 1 s old
        durables, status = run("durables", url=bp.url), run("status", url=bp.url)
        raw = json.loads(run("durables", "--json", url=bp.url).stdout)
    assert [(d["ack_floor"], d["lag"]) for d in raw] == [(1, 0)]
    row = ["Q", "d", "*", "1", "(behind", "FIRST", "5)", "0", "0", "0", "0"]
    assert lines_of(durables.stdout)[1].split() == row, durables.stdout
    assert lines_of(status.stdout)[-1].split() == row, status.stdout


def test_queues_and_durables_say_what_they_cannot_list(tmp_path: Path) -> None:
    """A queue refused at start-up is not in ``queues`` (nor its durables),
    so ``queues`` says so on stderr; ``durables`` of a queue that does not
    exist, cannot be served, or cannot exist (a bad name) exits 3. (All
    exited 0 with an empty table, the failed queue unmentioned; found by an
    operator walkthrough.)"""
    bad = tmp_path / "queues" / "bad"
    bad.mkdir(parents=True)
    (bad / f"{0:020d}.log").write_bytes(b"garbage, not records")  # a sealed segment: damage
    (bad / f"{5:020d}.log").write_bytes(b"")
    with broker_process(tmp_path) as bp:
        run("pub", "good", "E", "x", url=bp.url)
        listed = run("queues", url=bp.url)
        assert listed.returncode == 0 and "good" in listed.stdout and "bad" not in listed.stdout
        assert "not listed, cannot be served (see tidings status): bad" in listed.stderr
        for name, why in [
            ("nothing-here", "queue 'nothing-here' does not exist"),
            ("bad", "queue 'bad' cannot be served (see tidings status)"),
            ("bad name", "INVALID_NAME"),
        ]:
            result = run("durables", name, url=bp.url)
            assert (result.returncode, result.stdout) == (3, ""), result
            assert why in result.stderr, result.stderr


def test_status_watch_repeats_until_ctrl_c(url: str) -> None:
    proc = start("status", "--json", "--watch", "0.05", url=url)
    assert proc.stdout is not None
    docs = [json.loads(line) for line in Lines(proc.stdout.fileno()).readlines(3)]
    assert all("queues" in d for d in docs)
    proc.send_signal(signal.SIGINT)
    assert finish(proc) == (0, "")


def test_ping(url: str) -> None:
    one = run("ping", url=url)
    assert one.returncode == 0, one.stderr
    assert one.stdout.startswith("pong from 127.0.0.1:") and "(tidings " in one.stdout and " ms" in one.stdout
    three = run("ping", "-c", 3, "-i", 0, "--name", "pinger", url=url)
    out = lines_of(three.stdout)
    assert [line.split("seq=")[1].split()[0] for line in out[:3]] == ["1", "2", "3"]
    assert out[3].startswith("3 pings, min/avg/max = ")


def test_help_has_examples() -> None:
    commands = [[], *[[c] for c in COMMANDS]]
    for args, got in zip(commands, run_all([[*a, "--help"] for a in commands]), strict=True):
        assert got.returncode == 0, args
        assert "examples:" in got.stdout, args
        assert "exit codes:" in got.stdout, args
        if not args:  # every variable a default comes from is listed
            env = got.stdout.split("environment:")[1].split("exit codes:")[0]
            for name in ("URL", "TOKEN", "TLS_CA", "TLS_CERT", "TLS_KEY", "DEBUG"):
                assert f"  TIDINGS_{name} " in env, name


def test_help_shows_what_an_option_does_when_it_is_not_given() -> None:
    """Read as a new user would: ping -c, sub -n, -e and -d, fetch -e gave no
    default (fetch's -e did not say that '*' and commas work, as they do)."""
    ping, sub, fetch = (
        " ".join(got.stdout.split()) for got in run_all([[c, "--help"] for c in ("ping", "sub", "fetch")])
    )
    assert "pings to send, 0 = until Ctrl-C (default: 1)" in ping
    assert "exit after COUNT messages (default: until Ctrl-C)" in sub
    assert "(default: none, a live subscription that keeps nothing)" in sub
    for text in (sub, fetch):
        assert "only these events; '*' is a wildcard (repeatable, or comma-separated; default: every event" in text
        # "every event" is not what a durable given no -e gets (found by a new-user walkthrough).
        assert (
            "but with --durable the durable's filter: every event for a new one, the filter it has for an existing "
            "one, which -e '*' widens to every event again)" in text
        )


def test_delete_a_durable_and_a_queue(url: str, queue: str) -> None:
    run("pub", queue, "E", "1", url=url)
    run("fetch", queue, "--durable", "audit", url=url)
    done = run("delete", queue, "--durable", "audit", url=url)
    assert (done.returncode, done.stdout.strip()) == (0, f"deleted durable audit of {queue}")
    missing = run("delete", queue, "--durable", "audit", url=url)
    assert missing.returncode == 3 and "NOT_FOUND" in missing.stderr
    assert run("delete", queue, url=url).returncode == 0
    info = json.loads(run("status", "--json", url=url).stdout)
    assert queue not in [q["name"] for q in info["queues"]]


def test_seek_rewinds_a_durable(url: str, queue: str) -> None:
    run("pub", queue, "E", input="1\n2\n3\n", url=url)
    first = run("fetch", queue, "--durable", "audit", "--max", 3, url=url)
    assert len(first.stdout.splitlines()) == 3
    moved = run("seek", queue, "--durable", "audit", "--to", "1", url=url)
    assert (moved.returncode, moved.stdout) == (0, f"durable audit of {queue} moved to offset 1\n"), moved.stderr
    again = run("fetch", queue, "--durable", "audit", "--max", 3, url=url)
    assert [json.loads(line)["offset"] for line in again.stdout.splitlines()] == [1, 2]
    assert run("seek", queue, "--durable", "audit", "--to", "yesterday", url=url).returncode == 1


def test_seek_prints_where_the_broker_put_the_durable(url: str, queue: str) -> None:
    """The broker clamps the position to the log; tidings said "moved to 99999"
    for a durable that went to the end of the log (3)."""
    run("pub", queue, "E", input="1\n2\n3\n", url=url)
    run("fetch", queue, "--durable", "held", "--max", 1, url=url)
    cases = {
        "99999": "moved to offset 3 (the end of the log; asked for 99999)",
        "earliest": "moved to offset 0 (the first message kept)",
        "2": "moved to offset 2",
        "new": "moved to offset 3 (the end of the log)",
        "2000-01-01T00:00:00Z": "moved to offset 0 (the first message kept)",
    }
    for to, said in cases.items():
        got = run("seek", queue, "--durable", "held", "--to", to, url=url)
        assert (got.returncode, got.stdout) == (0, f"durable held of {queue} {said}\n"), (to, got.stderr)


def test_seek_by_a_user_without_the_status_right_says_what_it_asked_for(tmp_path: Path) -> None:
    users = tmp_path / "users.toml"
    users.write_text('[users.app]\ntoken = "app-t0ken"\npublish = ["*"]\nsubscribe = ["*"]\nstatus = false\n')
    with broker_process(tmp_path / "data", "--users", str(users)) as bp:
        assert run("pub", "Q", "E", "1", "--token", "app-t0ken", url=bp.url).returncode == 0
        assert run("fetch", "Q", "--durable", "d", "-e", "E", "--token", "app-t0ken", url=bp.url).returncode == 0
        got = run("seek", "Q", "--durable", "d", "--to", "99", "--token", "app-t0ken", url=bp.url)
        # Nor can fetch learn the filter d keeps (from STATUS): no note, and not an error either.
        kept = run("fetch", "Q", "--durable", "d", "--token", "app-t0ken", url=bp.url)
    assert (kept.returncode, kept.stderr) == (0, ""), kept.stderr
    assert got.returncode == 0, got.stderr
    assert got.stdout.startswith("durable d of Q moved to 99 (or to the nearest end of the log; STATUS, which would")
    assert "PERMISSION_DENIED" in got.stdout


def test_version_is_the_package_version_which_the_broker_reports_too(url: str) -> None:
    want = importlib.metadata.version("tidings")
    got = run("--version")
    assert (got.returncode, got.stdout, got.stderr) == (0, f"tidings {want}\n", "")
    assert f"(tidings {want})" in run("ping", url=url).stdout  # WELCOME's, the same as STATUS's
