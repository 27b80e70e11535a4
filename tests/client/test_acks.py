"""Acks leave in batches: one ACK frame per durable per loop turn, and one
every ACK_FLUSH acks (or half the prefetch, if less) within a turn, so that
a subscriber working through its window returns credit while it works (not
all at the end)."""

from __future__ import annotations

from pathlib import Path

import pytest

from client import ConfigError, ServerError
from client._transport import ACK_FLUSH
from tests.helpers import connected, running_broker

pytestmark = pytest.mark.one_loop


@pytest.mark.parametrize("window", [2 * ACK_FLUSH + 44, 101])  # every ACK_FLUSH; every half window
async def test_acks_leave_every_ack_flush_or_half_window_within_one_turn(tmp_path: Path, window: int) -> None:
    every = min(ACK_FLUSH, window // 2)
    async with running_broker(tmp_path) as broker, connected(broker) as c:
        sub = await c.subscribe("Q", durable="d", start="earliest", prefetch=window)
        await c.publish_many("Q", [("E", i) for i in range(window)])
        messages = [await sub.next(5)]
        while len(messages) < window:
            messages.append(await sub.next(5))
        # One stretch without suspending (ack() queues and returns): what left meanwhile?
        for m in messages:
            await m.ack()
        assert sum(map(len, c._acks.values())) == window % every  # the ACK frames before them are written
        await c.ping()  # the rest leave with this turn; the broker has read them all
        [durable] = (await c.status())["durables"]
        assert (durable["ack_floor"], durable["in_flight"]) == (window, 0)


async def test_close_acks_the_last_messages_with_the_unsubscribe(tmp_path: Path) -> None:
    """``sub.close(ack=messages)``: a consumer that takes exactly N acks the
    last ones with the UNSUBSCRIBE, in one write, so the broker sends it no
    more for them (acked before, each would bring one more message, given
    back unseen with a delivery counted). A refused ack is raised, and the
    subscription is closed all the same."""
    async with running_broker(tmp_path) as broker, connected(broker) as c:
        await c.publish_many("Q", [("E", i) for i in range(10)])
        sub = await c.subscribe("Q", durable="d", start="earliest", prefetch=3)
        taken = [await sub.next(5) for _ in range(3)]
        await sub.close(ack=taken)
        rest = await c.fetch("Q", durable="d", max_messages=100)
        assert [(m.offset, m.deliveries) for m in rest] == [(o, 1) for o in range(3, 10)]
        for m in rest:
            await m.ack()

        sub = await c.subscribe("Q", durable="e", start="earliest", prefetch=3)
        taken = [await sub.next(5) for _ in range(3)]
        await c.ack_upto("Q", "e", 0)  # offset 0 acked another way: acking it again is refused
        with pytest.raises(ServerError, match="already acknowledged"):
            await sub.close(ack=taken)
        assert sub not in c._subs.values()
        [durable] = [d for d in (await c.status())["durables"] if d["name"] == "e"]
        assert durable["ack_floor"] == 3  # the others were acked all the same


async def test_close_takes_one_message_and_refuses_what_is_not_its_durables_before_closing(tmp_path: Path) -> None:
    """``sub.close(ack=last)``, as the README writes it, acks that one message
    with the UNSUBSCRIBE. An ``ack`` that is not messages of this
    subscription's durable (another durable's would be acked on this one) is
    refused before anything changes: the subscription is still open and
    closes after. (``ack=last`` raised TypeError after the subscription had
    ended locally: the UNSUBSCRIBE was never sent, the broker kept its
    messages in flight, and a second close() did nothing.)"""
    async with running_broker(tmp_path) as broker, connected(broker) as c:
        await c.publish_many("Q", [("E", i) for i in range(5)])
        other = await c.subscribe("Q", durable="other", start="earliest")
        foreign = await other.next(5)
        sub = await c.subscribe("Q", durable="d", start="earliest", prefetch=2)
        first = await sub.next(5)
        await first.ack()
        last = await sub.next(5)
        for bad, why in [
            (42, "ack takes a Message or messages, not int"),
            ([last, "x"], "ack takes a Message or messages, not str"),
            ([foreign], "not one of durable 'other' of 'Q' \\(offset 0\\)"),
        ]:
            with pytest.raises(ConfigError, match=why):
                await sub.close(ack=bad)  # type: ignore[arg-type]
            assert sub in c._subs.values()
        assert not last._settled and not foreign._settled
        await sub.close(ack=last)
        assert sub not in c._subs.values()
        status = await c.status()
        [durable] = [d for d in status["durables"] if d["name"] == "d"]
        assert (durable["ack_floor"], durable["in_flight"], durable["consumers"]) == (2, 0, 0)
        [me] = status["connections"]
        assert [s["durable"] for s in me["subscriptions"]] == ["other"]
        await other.close()


async def test_a_wait_under_a_millisecond_is_one_and_fetch_takes_an_ack_wait(tmp_path: Path) -> None:
    """ack_wait is sent in whole milliseconds: one under 1 ms was rounded
    down to 0, which asks for the broker's default, 30 s. It is 1 ms now;
    and fetch() takes an ack_wait as FETCH does (it had none)."""
    async with running_broker(tmp_path) as broker, connected(broker) as c:
        await c.publish("Q", "E", 1)
        sub = await c.subscribe("Q", durable="d", start="earliest", ack_wait=0.0004)
        first = await sub.next(5)
        again = await sub.next(5)  # within the broker's next check (0.2 s), not 30 s later
        assert (again.offset, again.deliveries) == (first.offset, 2)
        await again.ack()
        await sub.close()

        await c.publish("F", "E", 1)
        (fetched,) = await c.fetch("F", durable="f", ack_wait=0.05)
        (back,) = await c.fetch("F", durable="f", wait=5)
        assert (back.offset, back.deliveries) == (fetched.offset, 2)
        await back.ack()
