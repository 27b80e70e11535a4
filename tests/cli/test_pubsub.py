"""``tidings pub``, ``sub`` and ``fetch``: the real executable against a real broker."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path

from tests.helpers import BrokerProcess, broker_process

from .conftest import TIDINGS, Lines, cli_env, finish, lines_of, run, start

KEYS = ["queue", "event", "offset", "timestamp", "headers", "payload", "deliveries"]


def test_pub_then_sub_prints_json_lines(url: str, queue: str) -> None:
    first = run("pub", queue, "CREATE", '{"id": 7, "tags": ["a"]}', "-H", "source=cli", "--header", "k=v=w", url=url)
    assert first.returncode == 0, first.stderr
    assert first.stdout == "0\n"
    second = run("pub", queue, "NOTE", "hello", url=url)  # a bare word is a string
    assert second.stdout == "1\n"
    third = run("pub", queue, "NOTE", "--string", "two words", url=url)
    assert third.stdout == "2\n"

    sub = run("sub", queue, "--from", "earliest", "-n", 3, url=url)
    assert sub.returncode == 0, sub.stderr
    msgs = [json.loads(line) for line in lines_of(sub.stdout)]
    assert [list(m) for m in msgs] == [KEYS] * 3
    assert msgs[0]["queue"] == queue
    assert (msgs[0]["event"], msgs[0]["offset"], msgs[0]["payload"]) == ("CREATE", 0, {"id": 7, "tags": ["a"]})
    assert msgs[0]["headers"] == {"source": "cli", "k": "v=w"}
    assert [m["payload"] for m in msgs[1:]] == ["hello", "two words"]
    assert all(isinstance(m["timestamp"], int) and m["timestamp"] > 1_500_000_000_000 for m in msgs)
    assert all(m["deliveries"] == 1 for m in msgs)

    only = run("sub", queue, "--from", "earliest", "-e", "NOTE", "-n", 1, "--format", "text", url=url)
    assert only.returncode == 0
    assert f' {queue}#1 NOTE "hello"' in only.stdout


def test_bytes_payloads_print_as_base64_and_raw(url: str, queue: str) -> None:
    assert run("pub", queue, "BLOB", '{"$base64": "AAEC/w=="}', url=url).stdout == "0\n"
    assert run("pub", queue, "BLOB", '{"k": {"$hex": "00ff"}}', url=url).stdout == "1\n"
    got = run("sub", queue, "--from", "earliest", "-n", 2, url=url)
    payloads = [json.loads(line)["payload"] for line in lines_of(got.stdout)]
    assert payloads == [{"$base64": "AAEC/w=="}, {"k": {"$base64": "AP8="}}]
    raw = subprocess.run([*TIDINGS, "fetch", queue, "--max", "1", "--format", "raw", "--url", url],
                         capture_output=True, timeout=20, env=cli_env(), stdin=subprocess.DEVNULL)  # fmt: skip
    assert raw.returncode == 0
    assert raw.stdout == b"\x00\x01\x02\xff\n"


def test_pub_reads_json_lines_from_stdin_pipelined(url: str, queue: str) -> None:
    payloads = [{"n": i} for i in range(150)] + ["text", 3.5, None, [1, 2]]
    text = (
        "\n".join(json.dumps(p) for p in payloads[:100])
        + "\n\n"
        + "\n".join(json.dumps(p) for p in payloads[100:])
        + "\nbare-word"
    )  # a blank line is skipped; the last line has no newline
    got = run("pub", queue, "ROW", "-H", "batch=1", input=text, url=url)
    assert got.returncode == 0, got.stderr
    assert got.stdout == f"published 155 messages to {queue} (offsets 0..154)\n"
    fetched = run("fetch", queue, "--max", 200, url=url)
    msgs = [json.loads(line) for line in lines_of(fetched.stdout)]
    assert [m["payload"] for m in msgs] == [*payloads, "bare-word"]
    assert [m["offset"] for m in msgs] == list(range(155))
    assert all(m["headers"] == {"batch": "1"} for m in msgs)


def test_pub_stdin_stops_at_a_bad_line(url: str, queue: str) -> None:
    got = run("pub", queue, "ROW", input='1\n2\n{"broken": \n4\n', url=url)
    assert got.returncode == 1
    assert "stdin line 3" in got.stderr and "not JSON" in got.stderr
    assert got.stderr.endswith(
        "(the import stopped there: the 2 messages before it were published, the lines after it were not read)\n"
    )
    assert got.stdout == f"published 2 messages to {queue} (offsets 0..1)\n"
    first = run("pub", queue, "ROW", input="{oops\n1\n", url=url)
    assert first.returncode == 1 and "(the import stopped there: nothing was published," in first.stderr


def test_pub_stdin_ctrl_c_exits_130_after_the_summary(url: str, queue: str) -> None:
    """Ctrl-C ends an import where it is: what was sent is confirmed and
    counted, and the exit status says it did not finish (it was 0)."""
    proc = start("pub", queue, "ROW", url=url, stdin=subprocess.PIPE)
    assert proc.stdin is not None
    proc.stdin.write(b"1\n")
    proc.stdin.flush()
    # A long poll returns once the line is stored: then the import is under way.
    stored = run("fetch", queue, "--wait", 20, "--max", 1, url=url)
    assert json.loads(stored.stdout)["payload"] == 1
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=20) == 130  # stdin still open: it stopped at the signal, not at EOF
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.read() == f"published 1 message to {queue} (offset 0)\n".encode()
    assert proc.stderr.read() == b""
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        pipe.close()


def test_pub_message_id_deduplicates_and_says_so(url: str, queue: str) -> None:
    assert run("pub", queue, "E", "1", url=url).stdout == "0\n"
    first = run("pub", queue, "E", "2", "--id", "order-7", url=url)
    assert (first.returncode, first.stdout, first.stderr) == (0, "1\n", "")
    repeat = run("pub", queue, "E", "2", "--id", "order-7", url=url)
    assert (repeat.returncode, repeat.stdout) == (0, "1\n")
    assert (
        repeat.stderr == "tidings: duplicate: message id 'order-7' was stored before, at offset 1; not stored again\n"
    )
    lines = run("pub", queue, "E", "--id", "imp", input="1\n2\n", url=url)
    assert lines.stdout == f"published 2 messages to {queue} (offsets 2..3)\n"
    again = run("pub", queue, "E", "--id", "imp", input="1\n2\n3\n", url=url)  # ids imp-1, imp-2 again; imp-3 new
    assert again.stdout == f"published 3 messages to {queue} (offsets 2..4): 2 duplicates, not stored again\n"
    empty = run("pub", queue, "E", "3", "--id", "", url=url)  # say, --id "$UNSET": refused, not taken for an id
    assert empty.returncode == 1 and "argument --id: must not be empty" in empty.stderr


def test_sub_exits_cleanly_when_the_reader_closes_the_pipe(url: str, queue: str) -> None:
    run("pub", queue, "E", "1", url=url)
    # The reader takes one line and goes away while tidings waits for more.
    proc = start("sub", queue, "--from", "earliest", "-n", 100, url=url)
    assert proc.stdout is not None
    assert json.loads(Lines(proc.stdout.fileno()).readline())["offset"] == 0
    proc.stdout.close()
    code, err = finish(proc)
    assert code == 0, err
    assert err == ""

    # Same, but more messages arrive after the close: tidings finds out by writing, or by its pipe watch.
    proc = start("sub", queue, "--from", "earliest", "-n", 100, url=url)
    assert proc.stdout is not None
    assert json.loads(Lines(proc.stdout.fileno()).readline())["offset"] == 0
    proc.stdout.close()
    run("pub", queue, "E", "--inflight", 10, input="\n".join(map(str, range(50))), url=url)
    code, err = finish(proc)
    assert (code, err) == (0, "")


def test_sub_count_into_head_in_a_shell_pipe(url: str, queue: str) -> None:
    run("pub", queue, "E", input="\n".join(map(str, range(20))), url=url)
    cmd = " ".join(TIDINGS) + f" sub {queue} --from earliest -n 1000 --url {url} | head -1"
    got = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, text=True, timeout=20,
                         env=cli_env(), stdin=subprocess.DEVNULL, cwd=os.getcwd())  # fmt: skip
    assert got.returncode == 0, got.stderr  # pipefail: this is tidings' own exit status
    assert got.stderr == ""
    assert json.loads(got.stdout)["offset"] == 0


def test_sub_ctrl_c_exits_0_with_acks_flushed(url: str, queue: str) -> None:
    run("pub", queue, "E", input="1\n2\n3\n", url=url)
    proc = start("sub", queue, "--durable", "worker", "--from", "earliest", url=url)
    assert proc.stdout is not None
    got = [json.loads(line)["offset"] for line in Lines(proc.stdout.fileno()).readlines(3)]
    assert got == [0, 1, 2]
    proc.send_signal(signal.SIGINT)
    code, err = finish(proc)
    assert (code, err) == (0, "")
    status = json.loads(run("status", "--json", url=url).stdout)
    (durable,) = [d for d in status["durables"] if d["queue"] == queue]
    assert (durable["name"], durable["ack_floor"], durable["lag"], durable["in_flight"]) == ("worker", 3, 0, 0)


def test_sub_durable_resumes_after_what_it_acked(url: str, queue: str) -> None:
    run("pub", queue, "E", input="\n".join(map(str, range(5))), url=url)
    a = run("sub", queue, "-d", "d", "--from", "earliest", "-n", 2, url=url)
    assert [json.loads(x)["offset"] for x in lines_of(a.stdout)] == [0, 1]
    b = run("sub", queue, "-d", "d", "-n", 3, "--prefetch", 1, url=url)
    assert [json.loads(x)["offset"] for x in lines_of(b.stdout)] == [2, 3, 4]


def test_sub_count_takes_at_most_count_of_a_durable(url: str, queue: str) -> None:
    """-n COUNT caps the prefetch at COUNT, and its last acks go with the
    UNSUBSCRIBE: the durable's later messages are not taken and given back
    unseen. With the default prefetch of 100 each
    run took every message, and each one it did not print counted a
    delivery (towards max_deliveries and the dead-letter queue)."""
    run("pub", queue, "E", input="\n".join(map(str, range(30))), url=url)
    first = run("sub", queue, "--durable", "d", "--from", "earliest", "-n", 3, url=url)
    assert [json.loads(x)["offset"] for x in lines_of(first.stdout)] == [0, 1, 2]
    rest = [json.loads(x) for x in lines_of(run("fetch", queue, "--durable", "d", "--max", 100, url=url).stdout)]
    assert [m["offset"] for m in rest] == list(range(3, 30))
    # Its last acks went with the UNSUBSCRIBE, so none was sent for them and
    # given back (each counting a delivery; up to COUNT were).
    assert all(m["deliveries"] == 1 for m in rest), rest

    # The peek of `tidings sub --help`: exactly one message taken, and redelivered.
    peek = run("sub", queue, "--durable", "p", "--from", "earliest", "--no-ack", "-n", 1, url=url)
    assert json.loads(peek.stdout)["offset"] == 0
    again = [json.loads(x) for x in lines_of(run("fetch", queue, "--durable", "p", "--max", 3, url=url).stdout)]
    assert [(m["offset"], m["deliveries"]) for m in again] == [(0, 2), (1, 1), (2, 1)]


def test_sub_count_follow_prints_each_message_once_across_a_broker_restart(tmp_path: Path) -> None:
    """sub -n COUNT keeps the acks of its last messages for the UNSUBSCRIBE;
    when --follow reconnected before that, the broker redelivered those
    messages (it never had their acks) and sub printed them again, counted
    among the COUNT (found by an operator walkthrough). Now a message that
    comes again is not printed: the ack held for it covers the copy too."""
    with broker_process(tmp_path) as bp:
        run("pub", "Q", "E", input="1\n2\n3\n", url=bp.url)
        proc = start("sub", "Q", "--durable", "d", "--from", "earliest", "-n", 5, "--follow", url=bp.url)
        assert proc.stdout is not None
        lines = Lines(proc.stdout.fileno())
        printed = lines.readlines(3)  # their acks held for the UNSUBSCRIBE, all five being in the window
        port = bp.port
        bp.stop()
    with broker_process(tmp_path, "--port", str(port)) as again:
        run("pub", "Q", "E", input="4\n5\n", url=again.url)
        printed += lines.readlines(2)
        code, err = finish(proc)
        status = json.loads(run("status", "--json", url=again.url).stdout)
    assert [(json.loads(x)["offset"], json.loads(x)["payload"]) for x in printed] == [(i, i + 1) for i in range(5)]
    assert (code, err) == (0, ""), err
    (durable,) = status["durables"]
    assert (durable["ack_floor"], durable["in_flight"]) == (5, 0)


def test_sub_follow_prints_once_what_was_in_flight_when_the_broker_restarted(tmp_path: Path) -> None:
    """Messages taken but not yet acked when the connection broke (being
    written to a stdout nobody reads yet) come again after the reconnect, and
    their acks, sent once they are written, reach the broker before the
    copies are read: sub printed the copies too, and acked them again, so
    it exited 3 on its own acks (BAD_ACK: already acknowledged)."""
    big = "x" * 70_000  # one line fills a pipe (64 KiB): the first write blocks
    with broker_process(tmp_path) as bp:
        run("pub", "Q", "E", input="".join(json.dumps(f"{i} {big}") + "\n" for i in range(10)), url=bp.url)
        proc = start("sub", "Q", "--durable", "d", "--from", "earliest", "-n", 10, "--prefetch", 5, "--follow",
                     "--format", "raw", url=bp.url)  # fmt: skip
        _wait_for_durable(bp, in_flight=5, ack_floor=0)  # the window taken, nothing acked
        port = bp.port
        bp.stop()
    with broker_process(tmp_path, "--port", str(port)) as again:
        _wait_for_durable(again, in_flight=5, consumers=1)  # subscribed again: the five came again
        assert proc.stdout is not None
        printed = Lines(proc.stdout.fileno()).readlines(10)
        code, err = finish(proc)
        (durable,) = (again.status() or {})["durables"]
    assert [line.split()[0] for line in printed] == [str(i).encode() for i in range(10)]
    assert (code, err) == (0, "")
    assert (durable["ack_floor"], durable["in_flight"]) == (10, 0)


def _wait_for_durable(bp: BrokerProcess, **want: int) -> None:
    """Wait until the broker's one durable shows ``want`` in STATUS (polled, 20 s at most)."""
    deadline = time.monotonic() + 20
    while True:
        durables = (bp.status() or {}).get("durables", [])
        if durables and all(durables[0].get(k) == v for k, v in want.items()):
            return
        assert time.monotonic() < deadline, durables
        time.sleep(0.02)  # polling a condition with a deadline: STATUS is all there is to watch


def test_fetch_with_a_durable_acks_what_it_printed(url: str, queue: str) -> None:
    run("pub", queue, "E", input="\n".join(map(str, range(5))), url=url)
    a = run("fetch", queue, "--durable", "poller", "--max", 3, url=url)
    assert a.returncode == 0, a.stderr
    assert [json.loads(x)["offset"] for x in lines_of(a.stdout)] == [0, 1, 2]
    b = run("fetch", queue, "--durable", "poller", "--max", 10, "--format", "text", url=url)
    assert [x.split()[1] for x in lines_of(b.stdout)] == [f"{queue}#3", f"{queue}#4"]
    c = run("fetch", queue, "--durable", "poller", url=url)
    assert (c.returncode, c.stdout) == (0, "")
    peek = run("fetch", queue, "--durable", "peeker", "--no-ack", "--max", 1, url=url)
    assert json.loads(peek.stdout)["offset"] == 0
    plain = run("fetch", queue, "--from", 3, "--max", 1, url=url)  # a plain read remembers nothing
    assert json.loads(plain.stdout)["offset"] == 3
    status = json.loads(run("status", "--json", url=url).stdout)
    floors = {d["name"]: d["ack_floor"] for d in status["durables"] if d["queue"] == queue}
    assert floors["poller"] == 5


def test_a_durable_given_no_events_keeps_its_filter_and_sub_and_fetch_say_so(url: str, queue: str) -> None:
    """A SUBSCRIBE or FETCH without events keeps a durable's filter (the
    SPEC's rule), while -e said "default: every event": `sub --durable d`
    after `-e A` waited for a B forever, B passed over for good, and nothing
    said why (found by a new-user walkthrough). Now sub and fetch name the
    filter in force on stderr, and -e '*' widens it; no note when the
    durable takes every event, or is new."""
    run("pub", queue, "A", input="1\n", url=url)
    run("pub", queue, "B", input="2\n", url=url)
    made = run("fetch", queue, "--durable", "d", "-e", "A", url=url)
    assert ([json.loads(x)["payload"] for x in lines_of(made.stdout)], made.stderr) == ([1], "")
    note = (
        "tidings: durable 'd' keeps its event filter: A "
        "(without -e a durable keeps the filter it has; -e '*' for every event)\n"
    )
    kept = run("fetch", queue, "--durable", "d", url=url)
    assert (kept.returncode, kept.stdout, kept.stderr) == (0, "", note)
    run("pub", queue, "A", input="3\n", url=url)
    sub = run("sub", queue, "--durable", "d", "-n", 1, "--format", "raw", url=url)
    assert (sub.returncode, sub.stdout, sub.stderr) == (0, "3\n", note)
    (row,) = lines_of(run("durables", queue, url=url).stdout)[1:]
    assert row.split()[1:3] == ["d", "A"]

    widened = run("fetch", queue, "--durable", "d", "-e", "*", url=url)
    assert widened.stderr == ""
    run("pub", queue, "B", input="4\n", url=url)
    every = run("fetch", queue, "--durable", "d", "--format", "raw", url=url)
    assert (every.stdout, every.stderr) == ("4\n", "")
    fresh = run("sub", queue, "--durable", "fresh", "--from", "earliest", "-n", 1, url=url)
    assert (fresh.returncode, fresh.stderr) == (0, "")


def test_fetch_of_a_queue_that_does_not_exist_says_so(url: str, queue: str) -> None:
    """`tidings fetch typo-queue` printed nothing and exited 0, and with
    --wait (or --durable) it created the typo's queue, without a word (found
    by a new-user walkthrough). A fetch that gets nothing says on stderr
    when the queue does not exist, or that the fetch created it; a queue
    that exists and has nothing to give gets no note."""
    missing = run("fetch", queue, url=url)
    assert (missing.returncode, missing.stdout) == (0, "")
    assert missing.stderr == f"tidings: queue '{queue}' does not exist (nothing fetched)\n"
    assert queue not in run("queues", "--json", url=url).stdout  # a plain fetch creates nothing

    made = run("fetch", queue, "--wait", 0.1, url=url)  # waiting on it creates it (SPEC section 5, FETCH)
    assert (made.returncode, made.stdout) == (0, "")
    assert made.stderr == (
        f"tidings: queue '{queue}' did not exist: this fetch created it, empty (tidings delete {queue} removes it)\n"
    )
    durable = run("fetch", f"{queue}-d", "--durable", "d", url=url)
    assert durable.stderr.startswith(f"tidings: queue '{queue}-d' did not exist: this fetch created it, empty")
    for args in (["--wait", 0.1], ["--durable", "d"], []):  # the queue exists now: nothing to say
        empty = run("fetch", queue, *args, url=url)
        assert (empty.returncode, empty.stdout, empty.stderr) == (0, "", ""), args
    run("pub", queue, "E", input="1\n", url=url)
    past = run("fetch", queue, "--from", 5, url=url)
    assert (past.returncode, past.stdout, past.stderr) == (0, "", "")


def test_sub_and_fetch_from_an_offset_or_a_time(url: str, queue: str) -> None:
    run("pub", queue, "E", input="1\n2\n3\n", url=url)
    last = json.loads(run("fetch", queue, "--from", 2, "--max", 1, url=url).stdout)
    assert last["offset"] == 2
    assert run("pub", queue, "LATER", "4", url=url).stdout == "3\n"
    later = json.loads(run("fetch", queue, "--from", 3, url=url).stdout)
    assert later["event"] == "LATER"
    # The first message stored at or after a time; "Z" and offsets like +00:00 both work.
    when = datetime.fromtimestamp(later["timestamp"] / 1000, UTC)
    for stamp in (when.isoformat(), when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")):
        got = run("sub", queue, "--from", stamp, "-n", 1, url=url)
        assert json.loads(got.stdout)["offset"] == 3, (stamp, got.stderr)
    one = run("sub", queue, "--from", 1, "-n", 1, "--format", "raw", url=url)
    assert one.stdout == "2\n"
    future = run("fetch", queue, "--from", "2999-01-01T00:00:00Z", url=url)
    assert (future.returncode, future.stdout) == (0, "")
