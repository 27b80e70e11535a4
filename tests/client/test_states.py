"""A client's states and what a call raises in each: new (never connected),
open, closed (by us), broken (its connection ended for good)."""

from __future__ import annotations

from pathlib import Path

import pytest

from client import Client, ConnectionClosed, ServerError
from protocol import ErrorCode, encode_frame
from tests.helpers import connected, running_broker, url_of


async def test_a_call_before_connect_says_the_client_is_not_connected(tmp_path: Path) -> None:
    """(It said "connection is closed", as if it had been closed.)"""
    async with running_broker(tmp_path) as broker:
        c = Client(url_of(broker))
        assert " new " in repr(c)
        for call in (lambda: c.publish("Q", "E"), c.ping, lambda: c.subscribe("Q")):
            with pytest.raises(ConnectionClosed, match=r"^not connected: call connect\(\) or use async with$"):
                await call()
        await c.connect()
        await c.connect()  # connected already: nothing to do (no second connection)
        assert await c.publish("Q", "E") == 0
        assert [x["name"] for x in (await c.status())["connections"]] == ["python"]
        await c.aclose()


async def test_connect_after_aclose_raises_and_connects_nothing(tmp_path: Path) -> None:
    """(It returned quietly, the client still closed, and the socket it opened
    was never closed.)"""
    async with running_broker(tmp_path) as broker:
        async with connected(broker) as c:
            pass
        assert " closed " in repr(c)
        with pytest.raises(ConnectionClosed, match="this client was closed: make a new Client to connect again"):
            await c.connect()
        with pytest.raises(ConnectionClosed, match=r"^connection is closed$"):
            await c.publish("Q", "E")
        async with connected(broker, name="other") as other:
            assert [x["name"] for x in (await other.status())["connections"]] == ["other"]


async def test_a_fatal_error_from_the_broker_leaves_the_client_broken_and_saying_so(tmp_path: Path) -> None:
    """The broker ends the connection with a fatal ERR that reconnecting
    cannot help (here MALFORMED_FRAME, for bytes that are not msgpack): the
    client is broken. repr() says so and why; every later call raises that
    error, with a note that the connection ended for good; a subscription
    ends with it; aclose() is harmless and the client is then closed. (repr()
    said "open" while every call raised the stale error, with no word that
    the connection was gone.)"""
    async with running_broker(tmp_path) as broker:
        c = await Client.open(url_of(broker))
        sub = await c.subscribe("Q")
        assert c._sock is not None
        c._sock.write(encode_frame([250]))  # no such frame type: the broker answers MALFORMED_FRAME and closes
        with pytest.raises(ServerError, match="MALFORMED_FRAME") as first:
            await c.ping()  # sent after the bad frame: failed by the broker's close
        error = first.value
        assert error.code is ErrorCode.MALFORMED_FRAME and error.fatal
        assert f"broken (ServerError: {error})" in repr(c)
        note = "ended with this error, for good: every call on this client raises it (make a new Client)"
        for call in (c.ping, lambda: c.publish("Q", "E"), c.connect, sub.next):
            with pytest.raises(ServerError) as later:
                await call()
            assert later.value is error and any(note in n for n in error.__notes__)
        assert len(error.__notes__) == 1
        await c.aclose()
        await c.aclose()
        assert " closed " in repr(c)
        with pytest.raises(ConnectionClosed):
            await c.ping()
        assert c.reconnects == 0
