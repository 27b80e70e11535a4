"""Durable cursors: what a durable subscription has acknowledged, and its file.

A :class:`Cursor` is an *ack floor* (every offset below it is done) plus the
set of offsets above it acked out of order. Acks only move it forward.

On disk each durable of a queue has ``<queue>/durables/<durable>.cursor``: a
msgpack value ``[version, ack_floor, acked, meta]`` followed by its CRC-32
(4 bytes, big-endian). A save writes ``.cursor.tmp``, fsyncs it, keeps the
current file as ``.cursor.prev``, renames the temp file into place and fsyncs
the directory (R6). Loading tries ``.cursor``, then ``.cursor.tmp``, then
``.cursor.prev`` and takes the first whole one; if none is whole, the
durable starts again at offset 0 (the oldest retained message). Every
fallback is older than the truth, so damage costs redeliveries, never a skip
(R8, S8).
"""

from __future__ import annotations

import logging
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import msgpack

from . import faults
from .log import fsync_dir

__all__ = ["DURABLES_DIR", "Cursor", "CursorFiles", "CursorState", "CursorStore", "cursor_file"]

logger = logging.getLogger(__name__)

VERSION: Final = 1
_CRC: Final = struct.Struct(">I")
_SUFFIXES: Final = (".cursor", ".cursor.tmp", ".cursor.prev")
#: The folder of a queue's directory that holds its durables' cursor files.
DURABLES_DIR: Final = "durables"


class Cursor:
    """An ack floor plus the offsets above it acked out of order.

    Args:
        ack_floor: every offset below it is acked.
        acked: offsets at or above the floor that are acked.
    """

    __slots__ = ("ack_floor", "acked")

    def __init__(self, ack_floor: int = 0, acked: set[int] | None = None) -> None:
        self.ack_floor = ack_floor
        self.acked: set[int] = set()
        for offset in acked or ():
            self.ack(offset)

    def __repr__(self) -> str:
        return f"<Cursor floor={self.ack_floor} +{sorted(self.acked)[:8]}>"

    def is_acked(self, offset: int) -> bool:
        """Has ``offset`` been acked?"""
        return offset < self.ack_floor or offset in self.acked

    def ack(self, offset: int) -> None:
        """Ack one offset; the floor moves over every contiguous acked offset."""
        if offset < self.ack_floor:
            return
        if offset != self.ack_floor:
            self.acked.add(offset)
            return
        floor = offset + 1
        acked = self.acked
        while floor in acked:
            acked.discard(floor)
            floor += 1
        self.ack_floor = floor

    def ack_upto(self, offset: int) -> None:
        """Ack every offset up to and including ``offset``."""
        if offset < self.ack_floor:
            return
        self.acked = {o for o in self.acked if o > offset}
        self.ack_floor = offset
        self.ack(offset)


@dataclass(frozen=True, slots=True)
class CursorState:
    """A cursor as persisted: floor, out-of-order acks, and the durable's settings."""

    ack_floor: int
    acked: frozenset[int] = frozenset()
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class CursorFiles:
    """What a load of one durable's cursor finds, read without changing anything (``--check`` shows it)."""

    #: The suffix of the copy a load takes (``.cursor`` unless that one is missing or damaged), or None.
    used: str | None
    #: Its state; offset 0 when no copy is whole.
    state: CursorState
    #: The copies tried before it that exist but are not whole.
    damaged: tuple[str, ...] = ()


def cursor_file(name: str) -> tuple[str, str] | None:
    """``(durable, suffix)`` if ``name`` is a copy of a durable's cursor (``.cursor``, ``.cursor.tmp``,
    ``.cursor.prev``), else None: a file a load never reads."""
    for suffix in _SUFFIXES:  # ".cursor" first: a name never ends in ".tmp" by accident
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)], suffix
    return None


def encode_state(state: CursorState) -> bytes:
    """The file contents for ``state``."""
    body: bytes = msgpack.packb([VERSION, state.ack_floor, sorted(state.acked), state.meta], use_bin_type=True)
    return body + _CRC.pack(zlib.crc32(body))


def decode_state(data: bytes) -> CursorState | None:
    """Parse a cursor file, or None if it is damaged in any way."""
    if len(data) < 5:
        return None
    body, (crc,) = data[:-4], _CRC.unpack(data[-4:])
    if zlib.crc32(body) != crc:
        return None
    try:
        version, floor, acked, meta = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except (ValueError, TypeError, msgpack.UnpackException):
        return None
    if (
        version != VERSION
        or type(floor) is not int
        or floor < 0
        or not isinstance(acked, list)
        or not all(type(o) is int and o > floor for o in acked)
        or not isinstance(meta, dict)
    ):
        return None
    return CursorState(floor, frozenset(acked), meta)


class CursorStore:
    """The cursor files of one queue's durables.

    Args:
        directory: ``<queue>/durables``; created on the first save.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _path(self, name: str, suffix: str = ".cursor") -> Path:
        return self.directory / f"{name}{suffix}"

    def names(self) -> set[str]:
        """Every durable with at least one cursor file."""
        if not self.directory.is_dir():
            return set()
        return {split[0] for path in self.directory.iterdir() if (split := cursor_file(path.name)) is not None}

    def load(self, name: str) -> CursorState:
        """The newest whole copy of ``name``'s cursor (offset 0 if none is whole)."""
        found = self.examine(name)
        if found.used is None:
            logger.warning("%s: no whole cursor file for %r: it restarts at the oldest message", self.directory, name)
        elif found.used != ".cursor":
            logger.warning("%s: cursor file damaged or missing, using %s%s", self.directory, name, found.used)
        return found.state

    def examine(self, name: str) -> CursorFiles:
        """Which copy of ``name``'s cursor a load takes, and which it passes over as damaged (reads only).

        Raises:
            OSError: a copy exists but cannot be read.
        """
        damaged: list[str] = []
        for suffix in _SUFFIXES:
            try:
                data = self._path(name, suffix).read_bytes()
            except FileNotFoundError:
                continue
            state = decode_state(data)
            if state is not None:
                return CursorFiles(suffix, state, tuple(damaged))
            damaged.append(suffix)
        return CursorFiles(None, CursorState(0), tuple(damaged))

    def load_all(self) -> dict[str, CursorState]:
        """Every durable's cursor."""
        return {name: self.load(name) for name in sorted(self.names())}

    def save(self, name: str, state: CursorState) -> None:
        """Persist ``state`` atomically (temp, fsync, rename, fsync directory)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp, current = self._path(name, ".cursor.tmp"), self._path(name)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            data = encode_state(state)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        if current.exists():
            os.replace(current, self._path(name, ".cursor.prev"))
        faults.hit("during_cursor_rename")
        os.replace(tmp, current)
        fsync_dir(self.directory)

    def delete(self, name: str) -> None:
        """Remove every file of ``name``'s cursor."""
        for suffix in _SUFFIXES:
            self._path(name, suffix).unlink(missing_ok=True)
        if self.directory.is_dir():
            fsync_dir(self.directory)
