"""Retention: whole segments dropped by size or age, never what a durable
still needs when --keep-unacked is on; readers continue from the first
retained message."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import pytest

from broker.config import QueueRetention, Retention, load_queue_config
from client import Client
from tests.helpers import broker_process, connected, running_broker

SEGMENT = 4096
PAYLOAD = b"x" * 200  # ~230 bytes a record: ~17 records a segment
# Tests that call enforce_retention() themselves keep the broker's own passes out of the way.
MANUAL = 3600.0


async def publish(c: Client, n: int) -> None:
    """In small batches: a segment rolls between appends, and one append may be a whole batch."""
    for _ in range(n // 10):
        await c.publish_many("Q", [("E", PAYLOAD)] * 10)


async def test_size_limit_drops_the_oldest_segments(tmp_path: Path) -> None:
    overrides = {"segment_bytes": SEGMENT, "retention_bytes": 3 * SEGMENT, "retention_check": MANUAL}
    async with running_broker(tmp_path, **overrides) as broker, connected(broker) as c:
        sub = await c.subscribe("Q", durable="slow", start="earliest", prefetch=1)
        await publish(c, 200)
        dropped = broker.store.enforce_retention(int(time.time() * 1000))
        info = (await c.status())["queues"][0]
        assert dropped == info["first_offset"] > 100 and info["bytes"] <= 4 * SEGMENT
        batch = await c.fetch("Q", start="earliest", max_messages=1000)
        assert batch[0].offset == info["first_offset"] and batch[-1].offset == 199
        # Its lag is what is left of the log (it counted the dropped messages too).
        assert (await c.status())["durables"][0]["lag"] == 200 - info["first_offset"]
        # The slow durable held offset 0; it continues from the first retained message.
        first = await sub.next(timeout=5)
        assert first.offset == 0  # delivered before the drop
        await first.ack()
        resumed = await sub.next(timeout=5)
        assert resumed.offset == info["first_offset"]
        # A clear signal, not a silent gap: which offsets it never got.
        assert resumed.headers == {"x-retention-gap": f"1-{info['first_offset'] - 1}"}
        await resumed.ack()
        assert (await sub.next(timeout=5)).headers == {}
        info = (await c.status())["durables"][0]
        assert info["ack_floor"] >= resumed.offset


async def test_keep_unacked_never_drops_what_a_durable_needs(tmp_path: Path) -> None:
    overrides = {
        "segment_bytes": SEGMENT, "retention_bytes": SEGMENT, "retention_keep_unacked": True, "retention_check": MANUAL,
    }  # fmt: skip
    async with running_broker(tmp_path, **overrides) as broker, connected(broker) as c:
        sub = await c.subscribe("Q", durable="d", start="earliest", prefetch=1000)
        await publish(c, 100)
        assert broker.store.enforce_retention(int(time.time() * 1000)) == 0
        for _ in range(60):
            await (await sub.next(timeout=5)).ack(wait=True)
        dropped = broker.store.enforce_retention(int(time.time() * 1000))
        assert 0 < dropped <= 60
        assert (await c.status())["queues"][0]["first_offset"] <= 60


async def test_age_limit(tmp_path: Path) -> None:
    async with (
        running_broker(tmp_path, segment_bytes=SEGMENT, retention_age=60, retention_check=MANUAL) as broker,
        connected(broker) as c,
    ):
        await publish(c, 100)
        now = int(time.time() * 1000)
        assert broker.store.enforce_retention(now) == 0
        # A minute later the sealed segments written more than a minute before go.
        newest = broker.store.queues["Q"].log.segments[-2].last_ts
        dropped = broker.store.enforce_retention(newest + 60_001)
        info = (await c.status())["queues"][0]
        assert dropped == info["first_offset"] > 50 and info["next_offset"] == 100


@pytest.mark.parametrize("segment", [SEGMENT, 64 << 20], ids=["small", "default"])
async def test_age_limit_drops_the_segment_being_written_once_all_of_it_is_too_old(
    tmp_path: Path, segment: int
) -> None:
    """A queue nobody publishes to any more keeps nothing past the age: the
    segment being written is sealed and dropped with the others once its
    newest message is too old, and offsets go on from where they were,
    across a restart too. (Only sealed segments went: with 64 MiB segments a
    quiet queue kept its messages for ever.)"""
    overrides = {"segment_bytes": segment, "retention_age": 60, "retention_check": MANUAL}
    async with running_broker(tmp_path, **overrides) as broker, connected(broker) as c:
        sub = await c.subscribe("Q", durable="d", start="earliest")
        await publish(c, 100)
        later = int(time.time() * 1000) + 3_600_000
        assert broker.store.enforce_retention(later) == 100
        info = (await c.status())["queues"][0]
        assert (info["first_offset"], info["next_offset"], info["messages"]) == (100, 100, 0)
        assert broker.store.enforce_retention(later) == 0  # nothing more to seal
        assert await c.publish("Q", "E", b"after") == 100
        got = []
        for _ in range(101):  # those sent before the drop, then the new one
            got.append(await sub.next(5))
            await got[-1].ack()
        assert [m.offset for m in got] == [*range(100), 100]
    async with running_broker(tmp_path, segment_bytes=segment) as broker, connected(broker) as c:
        assert [m.offset for m in await c.fetch("Q", start="earliest")] == [100]
        assert await c.publish("Q", "E", b"again") == 101


@pytest.mark.one_loop
async def test_the_broker_applies_retention_by_itself_and_after_a_restart(tmp_path: Path) -> None:
    args = ("--segment-bytes", str(SEGMENT), "--retention-bytes", str(2 * SEGMENT), "--retention-check", "0.2")
    with broker_process(tmp_path, *args) as bp:
        async with Client(bp.url) as c:
            await publish(c, 200)
            deadline = time.monotonic() + 10
            while (first := (await c.status())["queues"][0]["first_offset"]) == 0:
                assert time.monotonic() < deadline, "retention never ran"
                await asyncio.sleep(0.1)  # polling: the broker checks every 0.2 s
        assert bp.stop() == 0
    with broker_process(tmp_path) as bp:
        async with Client(bp.url) as c:
            assert (await c.status())["queues"][0]["first_offset"] == first
            assert (await c.fetch("Q", start="earliest", max_messages=1))[0].offset == first


async def test_per_queue_retention_from_a_config_file(tmp_path: Path) -> None:
    path = tmp_path / "tidings.toml"
    path.write_text(
        "[queues.audit]\nretention_bytes = 0\nkeep_unacked = true\n\n[queues.tmp]\nretention_bytes = 4096\n"
    )
    queues = load_queue_config(path)
    assert queues == {"audit": QueueRetention(0, None, True), "tmp": QueueRetention(4096, None, None)}
    overrides = {"segment_bytes": SEGMENT, "retention_bytes": SEGMENT, "queues": queues, "retention_check": MANUAL}
    async with running_broker(tmp_path / "data", **overrides) as broker, connected(broker) as c:
        for q in ("audit", "tmp", "other"):
            for _ in range(10):
                await c.publish_many(q, [("E", PAYLOAD)] * 10)
        broker.store.enforce_retention(int(time.time() * 1000))
        first = {q["name"]: q["first_offset"] for q in (await c.status())["queues"]}
        assert first["audit"] == 0  # its own policy: keep everything
        assert first["tmp"] > 0 and first["other"] > 0  # own limit, and the flags' default


async def test_a_config_section_overrides_only_the_keys_it_names(tmp_path: Path) -> None:
    """With --retention-age and the README's ``[queues.audit] keep_unacked =
    true``, audit drops what its durable acked once it is past the age, like
    the queues without a section, and keeps what it has not acked; a section's
    ``retention_age = 0`` switches the age off for its queue alone. (A section
    replaced the flags whole, its missing keys meaning "keep all": audit kept
    every message its durable had acked; found by a new-user walkthrough.)"""
    path = tmp_path / "retention.toml"
    path.write_text("[queues.audit]\nkeep_unacked = true\n\n[queues.forever]\nretention_age = 0\n")
    queues = load_queue_config(path)
    overrides = {"segment_bytes": SEGMENT, "retention_age": 60, "queues": queues, "retention_check": MANUAL}
    async with running_broker(tmp_path / "data", **overrides) as broker, connected(broker) as c:
        for q in ("audit", "forever", "other"):
            for _ in range(10):
                await c.publish_many(q, [("E", PAYLOAD)] * 10)
        assert len(await c.fetch("audit", durable="d", start="earliest", max_messages=100)) == 100
        await c.ack_upto("audit", "d", 49)  # 50..99 stay unacked
        assert broker.store.enforce_retention(int(time.time() * 1000)) == 0  # nothing is a minute old yet
        broker.store.enforce_retention(int(time.time() * 1000) + 3_600_000)  # an hour later
        first = {q["name"]: q["first_offset"] for q in (await c.status())["queues"]}
        assert first["other"] == 100  # the flags: all past the age
        assert first["forever"] == 0  # its own age: none
        assert 0 < first["audit"] <= 50  # the flags' age, but only what its durable acked (whole segments)
    assert broker.config.retention_for("audit") == Retention(0, 60.0, True)
    assert broker.config.retention_for("forever") == Retention(0, 0.0, False)
    assert broker.config.retention_for("other") == Retention(0, 60.0, False)


def test_the_retention_in_force_for_each_queue_of_the_config_file_is_logged(tmp_path: Path) -> None:
    """An operator sees, at start-up, each configured queue's retention and
    where each key of it comes from (``--config`` was not logged at all)."""
    path = tmp_path / "retention.toml"
    path.write_text("[queues.audit]\nkeep_unacked = true\n\n[queues.metrics]\nretention_bytes = 1_000_000\n")
    with broker_process(tmp_path / "data", "--retention-age", "2", "--config", str(path)) as bp:
        lines = [line.split(" broker: ", 1)[1].rstrip() for line in bp.log if " broker: retention of " in line]
    assert lines == [
        "retention of queue audit: retention_bytes off (--retention-bytes), retention_age 2 s (--retention-age), "
        f"keep_unacked true ({path})",
        f"retention of queue metrics: retention_bytes 1000000 bytes ({path}), retention_age 2 s (--retention-age), "
        "keep_unacked false (--keep-unacked)",
        "retention of other queues: retention_bytes off, retention_age 2 s, keep_unacked false (the flags)",
    ]
    assert all("INFO" in line for line in bp.log if " broker: retention of " in line)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[queues.x]\nretention_days = 3\n", "unknown key 'retention_days'"),
        ("[queues.x]\nretention_bytes = -1\n", "is not valid"),
        ('[queues."../x"]\nkeep_unacked = true\n', "invalid queue name"),
        ("[server]\nport = 1\n", "unknown section"),
        ("not toml at all [", "config file"),
    ],
)
def test_a_bad_config_file_is_a_clear_start_up_error(tmp_path: Path, text: str, message: str) -> None:
    """A file the command line names that cannot be used stops the start (exit
    1, as for the --users and TLS files), said as such; not a usage error (2),
    which is for a command line wrong in itself."""
    path = tmp_path / "bad.toml"
    path.write_text(text)
    result = subprocess.run(
        [sys.executable, "-m", "broker", "--port", "0", "--data-dir", str(tmp_path / "d"), "--config", str(path)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 1 and message in result.stderr and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"tidings-broker: cannot start: config file {path}"), result.stderr


@pytest.mark.parametrize("producer", [False, True])
def test_the_largest_record_still_fits_a_frame_with_the_broker_headers(tmp_path: Path, producer: bool) -> None:
    """A record at the size limit, plus everything the broker may add to it (a
    producer's x-producer-seq, then x-retention-gap at delivery), still fits in
    a DELIVER and in a one-record BATCH under the frame limit."""
    from broker import BrokerConfig
    from broker.publishing import SEQUENCE_HEADER_ROOM
    from broker.queue import GAP_HEADER, with_header
    from protocol import PRODUCER_HEADER, encode_batch, encode_deliver, encode_record

    config = BrokerConfig(host="127.0.0.1", port=0, data_dir=tmp_path)
    limit = config.max_message_bytes - (SEQUENCE_HEADER_ROOM if producer else 0)
    event, ts, big = "e" * 128, 2**62, 2**64 - 1
    n = limit - 200
    while len(encode_record(event, ts, None, b"x" * (n + 1))) <= limit:
        n += 1
    body = encode_record(event, ts, None, b"x" * n)
    assert limit - 5 <= len(body) <= limit
    if producer:
        body = with_header(body, PRODUCER_HEADER, f"{'p' * 64}:{big}-{big}")
    body = with_header(body, GAP_HEADER, f"{big}-{big}")
    # Every number at its widest (sub_id, offset, deliveries, req):
    for frame in (encode_deliver(big, big, big, body), encode_batch(big, big, [(big, big, body)])):
        assert len(frame) - 4 <= config.limits.max_frame_size, len(frame) - 4 - config.limits.max_frame_size
