"""STATUS replies: server, connections, queues, durables, in pages that fit a frame.

A broker with thousands of connections has more to say than one frame holds
(about 150 bytes per connection: the default 1 MiB frame is full near 7,000
of them). A reply is therefore one *page*: the ``server`` map, then entries
of the four lists in order, each list sorted by its key, for as long as they
fit in ``max_bytes``. When something is left, the page says where to go on::

    "more": {"section": "durables", "after": ["DB", "logger"]}

and the client sends that map back in its next STATUS (``Status.page``). A
page resumes strictly after the key, so entries that come or go between
pages are neither repeated nor skipped among the ones that stay. An entry
too large for any page on its own (a connection with tens of thousands of
subscriptions) is sent without its lists, which it counts under
``"omitted"`` instead.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Final

from protocol import STATUS_SECTIONS as SECTIONS
from protocol.framing import pack_body

if TYPE_CHECKING:
    from .server import Broker

__all__ = ["StatusPageError", "status_page"]

#: Room kept in a page for what goes around the entries: the frame's array,
#: type and req, the map and its keys, four list headers, and ``more`` (whose
#: key holds at most two 128-character names).
RESERVE: Final = 512


class StatusPageError(ValueError):
    """A STATUS ``page`` that is not one this broker handed out (BAD_REQUEST)."""


def status_page(broker: Broker, page: dict[str, Any] | None, max_bytes: int) -> dict[str, Any]:
    """One page of the broker's status, its msgpack encoding at most ``max_bytes``
    (less ``RESERVE``); ``page`` is the previous page's ``more`` (None: the first).

    Raises:
        StatusPageError: ``page`` is malformed.
    """
    first, after = _resume(page)
    now = time.time()
    info: dict[str, Any] = {"server": _server(broker, now)}
    room = max_bytes - RESERVE - len(pack_body(info))
    added = 0  # entries on this page
    for index, section in enumerate(SECTIONS):
        entries: list[dict[str, Any]] = []
        info[section] = entries
        if index < first:
            continue
        last: Any = after if index == first else None
        for key, entry in _entries(broker, section, last, now):
            size = len(pack_body(entry))
            if size > room and added:
                info["more"] = {"section": section, "after": last}
                for rest in SECTIONS[index + 1 :]:
                    info[rest] = []
                return info
            if size > room:  # alone on a page and still too large
                entry = _without_lists(entry)
                size = len(pack_body(entry))
            entries.append(entry)
            added += 1
            room -= size
            last = key
    return info


def _resume(page: dict[str, Any] | None) -> tuple[int, Any]:
    """(index of the section to start in, key to start after or None)."""
    if page is None:
        return 0, None
    section, after = page.get("section"), page.get("after")
    if section not in SECTIONS or set(page) - {"section", "after"}:
        raise StatusPageError(f"STATUS page must be a reply's 'more' map, not {page!r}")
    if after is not None:
        if section == "connections":
            ok = type(after) is int
        elif section == "durables":
            ok = type(after) is list and len(after) == 2 and all(type(x) is str for x in after)
        else:
            ok = type(after) is str
        if not ok:
            raise StatusPageError(f"STATUS page: bad 'after' {after!r} for section {section!r}")
        if section == "durables":
            after = tuple(after)
    return SECTIONS.index(section), after


def _server(broker: Broker, now: float) -> dict[str, Any]:
    return {
        "version": broker.version,
        "uptime": round(now - broker.started, 3),
        "conn_count": len(broker.sessions),
        "fsync": broker.config.fsync.value,
        "fsyncs": broker.store.fsyncs,
        "data_dir": str(broker.store.root),
    }


def _entries(broker: Broker, section: str, after: Any, now: float) -> Iterator[tuple[Any, dict[str, Any]]]:
    """``(key, entry)`` of ``section`` in key order, those after ``after`` (None: all)."""
    queues = broker.store.queues
    if section == "connections":
        for session in sorted(broker.sessions, key=lambda s: s.conn_id):
            if after is None or session.conn_id > after:
                yield session.conn_id, session.describe()
    elif section == "queues":
        for name in sorted(queues):
            if after is None or name > after:
                yield name, _queue(broker, name, now)
    elif section == "durables":
        for qname in sorted(queues):
            if after is not None and qname < after[0]:
                continue
            queue = queues[qname]
            for dname, group in sorted(queue.groups.items()):
                if after is not None and (qname, dname) <= after:
                    continue
                yield (
                    [qname, dname],
                    {
                        "queue": qname,
                        "name": dname,
                        "events": list(group.filter.patterns),
                        "ack_floor": group.cursor.ack_floor,
                        "lag": group.lag(queue.log.first_offset, queue.log.next_offset),
                        "in_flight": len(group.in_flight),
                        "consumers": sum(1 for c in group.consumers if c.push),
                        # Connections holding fetched messages unacked: with
                        # "consumers", what makes SEEK and DELETE a CONFLICT.
                        "fetchers": sum(1 for c in group.consumers if not c.push and c.held),
                    },
                )
    else:
        for name, why in sorted(broker.store.failed.items()):
            if after is None or name > after:
                yield name, {"name": name, "error": why}


def _queue(broker: Broker, name: str, now: float) -> dict[str, Any]:
    queue = broker.store.queues[name]
    log = queue.log
    return {
        "name": name,
        "first_offset": log.first_offset,
        "next_offset": log.next_offset,
        "messages": log.next_offset - log.first_offset,
        "bytes": log.size_bytes,
        "published": queue.published,
        "publish_rate": round(queue.published / max(now - broker.started, 1e-3), 1),
        "damaged": None if queue.damage is None else {"offset": queue.damage[0], "error": queue.damage[1]},
    }


def _without_lists(entry: dict[str, Any]) -> dict[str, Any]:
    """``entry`` with every list emptied, and how long each was under ``omitted``."""
    omitted = {k: len(v) for k, v in entry.items() if type(v) is list and v}
    slim = {k: ([] if k in omitted else v) for k, v in entry.items()}
    slim["omitted"] = omitted
    return slim
