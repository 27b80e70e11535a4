"""subscribe() and fetch(): their arguments as the client takes them."""

from __future__ import annotations

from pathlib import Path

import pytest

from client import BadRequest, LocalProtocolError
from tests.helpers import connected, running_broker


async def test_one_string_is_one_event_filter_for_subscribe_and_fetch(tmp_path: Path) -> None:
    """``events="CREATE"`` filters on CREATE. (A str is an iterable too: it
    filtered on the letters C, R, E, A, T, so the event C was delivered and
    CREATE was not.)"""
    async with running_broker(tmp_path) as broker, connected(broker) as c:
        sub = await c.subscribe("Q", events="CREATE")
        durable = await c.subscribe("Q", events="CR*", durable="d")
        await c.publish_many("Q", [("C", 0), ("CREATE", 1), ("E", 2)])
        assert sub.events == ("CREATE",)
        assert [(m.event, m.payload) for m in [await sub.next(5)]] == [("CREATE", 1)]
        assert [(m.event, m.payload) for m in [await durable.next(5)]] == [("CREATE", 1)]
        [me] = (await c.status())["connections"]
        assert sorted(s["events"] for s in me["subscriptions"]) == [["CR*"], ["CREATE"]]
        assert [m.event for m in await c.fetch("Q", events="CREATE")] == ["CREATE"]
        assert [m.event for m in await c.fetch("Q", events=["C", "E"])] == ["C", "E"]
        assert [m.event for m in await c.fetch("Q", events=("E" for _ in range(1)))] == ["E"]


async def test_a_subscribe_refused_before_sending_leaves_no_subscription_behind(tmp_path: Path) -> None:
    """A negative ack_wait (or a prefetch of 0) is refused before sending, and
    the client keeps no subscription for it. (It kept one, never made, which
    a reconnect would have tried to make again.)"""
    async with running_broker(tmp_path) as broker, connected(broker) as c:
        for bad in ({"ack_wait": -0.5}, {"prefetch": 0}):
            with pytest.raises(BadRequest) as info:
                await c.subscribe("Q", durable="d", **bad)
            assert isinstance(info.value, LocalProtocolError)
        assert not c._subs and "subs=0" in repr(c)
