"""Test-only fault injection at named points of the storage layer (and one handler).

Enabled by the environment variable ``TIDINGS_FAULT`` when the broker starts,
and never otherwise (the check is one truth test of an empty dict). The
value is a comma-separated list of ``point:action[:n]``:

* ``point`` is one of :data:`POINTS`;
* ``action`` is ``crash`` (``os._exit(137)``, as close to ``kill -9`` as a
  process can do to itself), ``enospc`` or ``eio`` (the operation raises
  that ``OSError``) or ``bug`` (it raises ``RuntimeError``, standing in for
  a bug of ours: see ``Session.internal_error``);
* ``n`` (default 1) fires on the n-th time the point is reached, and for
  ``enospc`` / ``eio`` on every time after it too when written ``n+``.

Example: ``TIDINGS_FAULT=after_write_before_sync:crash:50`` kills the broker
after the 50th append has reached the page cache but before its fsync.
"""

from __future__ import annotations

import errno
import os
from typing import Final

__all__ = ["POINTS", "configure", "hit"]

#: Where the storage layer calls :func:`hit`.
POINTS: Final = frozenset(
    {
        "before_write",
        "mid_write",  # half of the append's bytes are written first
        "after_write_before_sync",
        "extend",  # the zeros of a segment's preallocation are written next
        "sync",
        "after_sync_before_confirm",
        "roll_fsync",  # the fsync that seals a segment before the next is created
        "during_segment_roll",
        "during_cursor_rename",
        "during_recovery",
        "status",  # a STATUS request is about to be answered
    }
)

_ACTIONS: Final = ("crash", "enospc", "eio", "bug")

# point -> [action, n, persistent, count]
_armed: dict[str, list[object]] = {}


def configure(spec: str | None) -> None:
    """Arm the faults described by ``spec`` (see the module docstring); None disarms.

    Raises:
        ValueError: the spec names an unknown point or action.
    """
    _armed.clear()
    if not spec:
        return
    for item in spec.split(","):
        parts = item.strip().split(":")
        if len(parts) not in (2, 3) or parts[0] not in POINTS or parts[1] not in _ACTIONS:
            raise ValueError(f"bad TIDINGS_FAULT entry {item!r}: use point:crash|enospc|eio|bug[:n[+]]")
        nth = parts[2] if len(parts) == 3 else "1"
        persistent = nth.endswith("+")
        _armed[parts[0]] = [parts[1], int(nth.rstrip("+")), persistent, 0]


def hit(point: str) -> None:
    """Fire the fault armed at ``point``, if any. A no-op in production."""
    if not _armed:
        return
    armed = _armed.get(point)
    if armed is None:
        return
    armed[3] = count = int(armed[3]) + 1  # type: ignore[call-overload]
    nth = int(armed[1])  # type: ignore[call-overload]
    if count < nth or (count > nth and not armed[2]):
        return
    action = armed[0]
    if action == "crash":
        os._exit(137)
    if action == "bug":
        raise RuntimeError(f"injected bug at {point}")
    code = errno.ENOSPC if action == "enospc" else errno.EIO
    raise OSError(code, f"{os.strerror(code)} (injected at {point})")


def armed(point: str) -> bool:
    """True when a fault is armed at ``point`` (for the ``mid_write`` split)."""
    return point in _armed


configure(os.environ.get("TIDINGS_FAULT"))
