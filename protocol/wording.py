"""Wording shared by the broker's and the client's messages: a count with its noun.

Both sides print counts to people (the broker's log and errors, the
``tidings`` tool's output), and a fixed plural reads wrong for the most
common count there is: ``1 connections`` in a ``tidings status`` that is
the only client. It lives here, the one package both import (it does no
I/O, as everything here).
"""

from __future__ import annotations

__all__ = ["many"]


def many(n: int, thing: str, things: str | None = None) -> str:
    """``1 connection``, ``2 connections``, ``0 connections``.

    Args:
        n: the count.
        thing: the noun, for one.
        things: the noun for any other count, when it is not ``thing`` + "s"
            (``many(n, "reply", "replies")``).

    Returns:
        The count and the noun, separated by a space.
    """
    return f"{n} {thing if n == 1 else things or thing + 's'}"
