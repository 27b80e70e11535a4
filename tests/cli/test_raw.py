"""``tidings raw``: frames as JSON lines, and ``--decode`` of captured bytes."""

from __future__ import annotations

import base64
import json
import subprocess
from pathlib import Path
from typing import Any

from protocol import Deliver, Err, FrameType, PubAck, Publish, encode_frame
from tests.helpers import broker_process

from .conftest import Lines, finish, lines_of, run, start


def frames(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in lines_of(stdout)]


def test_raw_sends_frames_and_prints_replies(url: str, queue: str) -> None:
    script = "\n".join([
        "# a comment, then a blank line",
        "",
        json.dumps([3, 1, queue, "CREATE", {"id": 1}, None, None]),
        json.dumps(["PUBLISH", 2, queue, "BLOB", {"$base64": "AAEC"}, {"h": "v"}, None]),
        json.dumps(["status", 3]),
        json.dumps(["PING", 4]),
        json.dumps([3, 5, "../x", "E", None, None, None]),  # the broker refuses the name
    ])  # fmt: skip
    got = run("raw", input=script + "\n", url=url)
    assert got.returncode == 0, got.stderr
    out = frames(got.stdout)
    assert out[0]["type"] == "WELCOME" and out[0]["frame"][:3] == [2, 1, 1]
    by_req = {f["frame"][1]: f for f in out[1:] if f["type"] != "PING"}
    assert by_req[1] == {"type": "PUBACK", "frame": [4, 1, 0, False]}
    assert by_req[2] == {"type": "PUBACK", "frame": [4, 2, 1, False]}
    assert by_req[3]["type"] == "STATUS_REPLY" and "queues" in by_req[3]["frame"][2]
    assert by_req[4] == {"type": "PONG", "frame": [16, 4]}
    assert by_req[5]["type"] == "ERR" and by_req[5]["frame"][2] == 21  # INVALID_NAME, from the broker
    assert "'../x'" in by_req[5]["frame"][3]
    assert all("invalid" not in f for f in out)

    fetch = json.dumps(["FETCH", 6, queue, None, [], 10, 0, "earliest", None, 0])
    (batch,) = [f for f in frames(run("raw", input=fetch, url=url).stdout) if f["type"] == "BATCH"]
    assert batch["frame"][:3] == [12, 6, 2]
    records = batch["frame"][3]
    assert [r[0] for r in records] == [0, 1]
    assert records[1][2] == "BLOB" and records[1][4] == {"h": "v"}
    assert records[1][5] == {"$base64": base64.b64encode(b"\x00\x01\x02").decode()}


def test_raw_hex_shows_wire_bytes_and_flags_invalid_frames(url: str) -> None:
    got = run("raw", "--hex", "--echo", input='["PING", 9]\n[16, "x"]\n', url=url)
    assert got.returncode == 2, got.stderr  # (the broker ends the connection: see below)
    out = frames(got.stdout)
    sent = [f for f in out if f.get("sent")]
    assert sent[0]["type"] == "HELLO"
    assert sent[1]["hex"] == encode_frame([15, 9]).hex()
    assert "invalid" in sent[2] and "req must be an integer" in sent[2]["invalid"]
    (pong,) = [f for f in out if f["type"] == "PONG" and not f.get("sent")]
    assert pong == {"type": "PONG", "frame": [16, 9], "hex": encode_frame([16, 9]).hex()}
    # The malformed PONG makes the broker close the connection with a fatal ERR.
    assert any(f["type"] == "ERR" and f["frame"][2] in (1, 3) for f in out)


def test_raw_subscribe_prints_deliveries_while_lingering(url: str, queue: str) -> None:
    run("pub", queue, "E", input="1\n2\n", url=url)
    sub = json.dumps(["SUBSCRIBE", 1, 7, queue, [], None, "earliest", None, 10, 0, 0, None])
    got = run("raw", "--linger", 1, input=sub + "\n", url=url)
    delivered = [f["frame"] for f in frames(got.stdout) if f["type"] == "DELIVER"]
    assert [(d[1], d[2], d[7]) for d in delivered] == [(7, 0, 1), (7, 1, 2)]


def test_raw_without_hello_and_bad_input(url: str) -> None:
    got = run("raw", "--no-hello", input='["PING", 1]\n', url=url)
    out = frames(got.stdout)  # PING before HELLO is a protocol violation: the broker says so and closes
    assert out and out[0]["type"] == "ERR" and out[0]["frame"][2] == 3  # UNEXPECTED_FRAME

    bad = run("raw", input='["PING", 1]\n{"not": "a frame"}\n', url=url)
    assert bad.returncode == 1
    assert "stdin line 2" in bad.stderr
    assert any(f["type"] == "PONG" for f in frames(bad.stdout))  # what was sent still got its reply
    unknown = run("raw", input='["NOPE", 1]\n', url=url)
    assert unknown.returncode == 1 and "unknown frame type 'NOPE'" in unknown.stderr


def test_raw_decode_captured_bytes(tmp_path: Path) -> None:
    publish = Publish(1, "DB", "CREATE", {"id": 7, "blob": b"\x00\xff"}, {"k": "v"}, "m-1")
    capture = b"".join([
        encode_frame(publish.to_wire()),
        encode_frame(PubAck(1, 42, False).to_wire()),
        encode_frame(Deliver(3, 42, 2, "CREATE", 1_700_000_000_000, None, b"raw").to_wire()),
        encode_frame(Err(0, 2, "frame too large").to_wire()),
        encode_frame([99, 1]),
        encode_frame([int(FrameType.PUBACK), "not-an-int", 0, False]),
    ])  # fmt: skip
    path = tmp_path / "capture.bin"
    path.write_bytes(capture)
    got = run("raw", "--decode", str(path))
    assert got.returncode == 0, got.stderr
    out = frames(got.stdout)
    assert [f["type"] for f in out] == ["PUBLISH", "PUBACK", "DELIVER", "ERR", "UNKNOWN(99)", "PUBACK"]
    assert out[0]["frame"] == [3, 1, "DB", "CREATE", {"id": 7, "blob": {"$base64": "AP8="}}, {"k": "v"}, "m-1"]
    assert out[1]["frame"] == [4, 1, 42, False]
    assert out[2]["frame"][-1] == {"$base64": base64.b64encode(b"raw").decode()}
    assert "invalid" in out[4] and "invalid" in out[5]
    assert all("invalid" not in f for f in out[:4])

    hexed = run("raw", "--decode", "--hex", input=capture[: len(encode_frame(publish.to_wire()))])
    (one,) = frames(hexed.stdout)
    assert one["hex"] == encode_frame(publish.to_wire()).hex()
    assert one["frame"][4]["blob"] == {"$hex": "00ff"}

    cut = run("raw", "--decode", input=capture[:-3])
    assert cut.returncode == 1
    assert "do not form a complete frame" in cut.stderr
    assert len(frames(cut.stdout)) == 5  # everything before the cut is still shown
    first = len(encode_frame(publish.to_wire()))
    one = run("raw", "--decode", input=capture[: first + 1])
    assert (
        one.stderr == f"tidings: 1 byte at offset {first} does not form a complete frame (1 frame decoded before it)\n"
    )
    missing = run("raw", "--decode", str(tmp_path / "nope.bin"))
    assert missing.returncode == 1 and "cannot read" in missing.stderr


def test_raw_exits_when_the_broker_closes_even_with_stdin_open(url: str) -> None:
    proc = start("raw", url=url, stdin=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(b'[16, "not a req"]\n')  # malformed: a fatal ERR, then the broker closes
    proc.stdin.flush()
    lines = Lines(proc.stdout.fileno())
    assert json.loads(lines.readline())["type"] == "WELCOME"
    err = json.loads(lines.readline())
    assert err["type"] == "ERR" and err["frame"][2] == 1  # MALFORMED_FRAME
    proc.wait(timeout=20)  # stdin is still open: tidings must not wait for it
    code, stderr = finish(proc)
    # Exit 2, as the exit codes say for a connection the broker ended (it was 0).
    assert code == 2, stderr
    assert stderr.startswith("tidings: the broker ended the connection (after stdin line 1): MALFORMED_FRAME: ")


def test_raw_exits_2_when_the_broker_ends_the_connection_while_it_lingers(tmp_path: Path) -> None:
    """After stdin ends, raw waits for replies and lingers; a broker that
    closes the connection then ended it as much as before: exit 2 with a
    line on stderr (it was exit 0 and nothing said). A BYE of our own is a
    clean end (exit 0)."""
    with broker_process(tmp_path) as bp:
        proc = start("raw", "--linger", 60, url=bp.url)  # stdin: /dev/null, so at its end at once
        assert proc.stdout is not None
        assert json.loads(Lines(proc.stdout.fileno()).readline())["type"] == "WELCOME"
        bp.stop()  # SHUTTING_DOWN, then the broker closes
        code, stderr = finish(proc)
    assert code == 2, stderr
    assert stderr == (
        "tidings: the broker ended the connection (before any stdin line was sent): "
        "SHUTTING_DOWN: broker is shutting down\n"
    )
    with broker_process(tmp_path) as bp:
        bye = run("raw", input='["PING", 1]\n["BYE", 2]\n', url=bp.url)
        assert (bye.returncode, bye.stderr) == (0, ""), bye.stderr
        assert frames(bye.stdout)[-1]["type"] == "PONG"
