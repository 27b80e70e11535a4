"""The count-and-noun helper both the broker and the client print with."""

from __future__ import annotations

from protocol.wording import many


def test_one_is_singular_and_every_other_count_plural() -> None:
    assert [many(n, "connection") for n in (0, 1, 2)] == ["0 connections", "1 connection", "2 connections"]
    assert [many(n, "reply", "replies") for n in (1, 3)] == ["1 reply", "3 replies"]
