"""The subcommands that carry messages: pub, sub, fetch (the others are in :mod:`client.cli.admin`)."""

from __future__ import annotations

import argparse
import asyncio
import os
from datetime import datetime
from typing import Any, Final

from protocol import ErrorCode, ServerError, TidingsError
from protocol.messages import MAX_MESSAGE_ID_LENGTH
from protocol.wording import many

from ..client import Client
from ..subscription import Message, Subscription
from .admin import render_status
from .common import EXIT_OK, EXIT_REFUSED, Context, Stopped, UsageError
from .notes import created_note, filter_note, missing_note, queue_exists, status_or_none
from .streams import LineReader
from .values import format_message, parse_payload

# render_status and Context stay importable from here (client.cat, and code written against it, do).
__all__ = ["Context", "parse_headers", "parse_start", "render_status", "run_fetch", "run_pub", "run_sub"]

#: The largest offset (the protocol's offsets are unsigned 64-bit).
MAX_OFFSET: Final = (1 << 64) - 1


# --- argument helpers (used by the parser as ``type=``) -----------------------


def parse_start(text: str) -> str | int | datetime:
    """``--from``: new, earliest, an offset, or an ISO 8601 time (naive = local time).

    An offset past 2^64 - 1, or a time before 1970, is refused here: the
    protocol carries neither (an unsigned 64-bit offset, ms since the epoch).
    """
    if text in ("new", "earliest"):
        return text
    if text.isdigit():
        if int(text) > MAX_OFFSET:
            raise argparse.ArgumentTypeError(f"{text} is more than the largest offset, {MAX_OFFSET}")
        return int(text)
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not new, earliest, an offset or an ISO time such as 2024-05-01T12:00:00Z"
        ) from None
    try:
        before_1970 = when.timestamp() < 0
    except (OverflowError, OSError, ValueError):  # a naive time the platform cannot place
        before_1970 = True
    if before_1970:
        raise argparse.ArgumentTypeError(f"{text!r} is before 1970-01-01T00:00:00Z, where every log begins")
    return when


def parse_headers(items: list[str] | None) -> dict[str, str] | None:
    """``--header k=v`` (repeatable) as a dict, or None when there are none."""
    if not items:
        return None
    headers: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--header wants KEY=VALUE, not {item!r}")
        headers[key] = value
    return headers


def parse_events(items: list[str] | None) -> list[str]:
    """``-e EVENT`` (repeatable, or comma-separated)."""
    return [e for item in items or () for e in item.split(",") if e]


# --- pub ----------------------------------------------------------------------


def pub_reads_stdin(args: argparse.Namespace) -> bool:
    """No PAYLOAD and stdin is not a terminal: one message per stdin line."""
    return args.payload is None and not os.isatty(0)


def check_pub(args: argparse.Namespace) -> None:
    """Validate what can be validated before connecting (exit 1 early)."""
    args.headers = parse_headers(args.header)
    if not pub_reads_stdin(args):
        args.payload_value = None if args.payload is None else parse_payload(args.payload, as_string=args.string)


async def run_pub(ctx: Context, client: Client) -> int:
    args = ctx.args
    if not pub_reads_stdin(args):
        offset, duplicate = await client.publish_ack(args.queue, args.event, args.payload_value,
                                                     headers=args.headers, message_id=args.id)  # fmt: skip
        await ctx.out.line(str(offset))
        if duplicate:
            ctx.warn(f"duplicate: message id {args.id!r} was stored before, at offset {offset}; not stored again")
        return EXIT_OK
    return await _pub_lines(ctx, client)


async def _pub_lines(ctx: Context, client: Client) -> int:
    """Publish every stdin line, up to ``--inflight`` at once, in order.

    A bad line ends the import there (exit 1), and Ctrl-C ends it where it
    is (exit 130); either way what was sent before is confirmed first and
    counted in the summary line.
    """
    args = ctx.args
    slots = asyncio.Semaphore(args.inflight)
    offsets: dict[int, int] = {}
    duplicates = 0  # confirmed with the offset of a message stored before (--id): not stored again
    failure: list[BaseException] = []
    tasks: set[asyncio.Task[None]] = set()

    async def one(index: int, payload: Any, message_id: str | None) -> None:
        nonlocal duplicates
        try:
            offsets[index], duplicate = await client.publish_ack(args.queue, args.event, payload,
                                                                 headers=args.headers, message_id=message_id)  # fmt: skip
            duplicates += duplicate
        except (TidingsError, OSError) as exc:
            if not failure:
                failure.append(exc)
        finally:
            slots.release()

    bad_input: UsageError | None = None
    interrupted = False
    count = lineno = 0
    lines = LineReader(0)
    try:
        while not failure:
            try:
                raw = await ctx.stopper.race(lines.__anext__())
            except StopAsyncIteration:
                break
            lineno += 1
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                bad_input = UsageError(f"stdin line {lineno} is not UTF-8")
                break
            if not text.strip():
                continue
            try:
                payload = parse_payload(text if args.string else text.strip(), as_string=args.string,
                                        what=f"stdin line {lineno}")  # fmt: skip
            except UsageError as exc:
                bad_input = exc
                break
            mid = f"{args.id}-{lineno}" if args.id is not None else None
            if mid is not None and len(mid) > MAX_MESSAGE_ID_LENGTH:  # (--id itself was checked by the parser)
                bad_input = UsageError(f"the message id of stdin line {lineno} (--id ID-{lineno}) is {len(mid)} "
                                       f"characters, more than {MAX_MESSAGE_ID_LENGTH}")  # fmt: skip
                break
            await ctx.stopper.race(slots.acquire())
            if failure:
                slots.release()
                break
            task = asyncio.ensure_future(one(count, payload, mid))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            count += 1
    except Stopped:
        interrupted = True
    except OSError as exc:
        bad_input = UsageError(f"cannot read stdin: {exc}")
    if tasks:
        await asyncio.gather(*tasks)
    done = [offsets[i] for i in sorted(offsets)]
    summary = f"published {many(len(done), 'message')} to {args.queue}"
    if done:
        summary += f" (offset {done[0]})" if len(done) == 1 else f" (offsets {done[0]}..{done[-1]})"
    if duplicates:
        summary += f": {many(duplicates, 'duplicate')}, not stored again"
    await ctx.out.line(summary)
    if failure:
        raise failure[0]
    if bad_input is not None:
        before = ("nothing was published" if not done else "the message before it was published" if len(done) == 1
                  else f"the {len(done)} messages before it were published")  # fmt: skip
        raise UsageError(f"{bad_input} (the import stopped there: {before}, the lines after it were not read)")
    if interrupted:
        raise Stopped  # Ctrl-C: 130, as for any one-shot command (after the summary of what was published)
    return EXIT_OK


# --- sub and fetch --------------------------------------------------------------

#: Seconds a line being written when Ctrl-C comes may still take (then it is acked).
STOP_GRACE = 1.0
#: Messages already buffered are written together, up to this many.
WRITE_BATCH = 256


class Printed:
    """What ``sub`` printed of a durable lately, to leave out a message that comes again.

    A durable's message comes again when the broker has not had its ack: one
    of the last acks of ``-n COUNT``, kept for the UNSUBSCRIBE, when the
    connection broke (``--follow`` reconnects) or the ack wait ran out; an
    ack written just before the connection broke; a message still in the
    client's buffer when it broke, redelivered while that copy is printed.
    Printed again, it showed twice and counted twice towards COUNT.

    Only the last ``size`` (the prefetch) messages printed can come again:
    those the broker has not had the ack of are all in flight to this
    subscription at once, so at most prefetch, and acks go out in the order
    the messages were printed, so they are the last ones printed. A message
    is known by its offset and its timestamp: an offset alone may come back
    with another message (a queue deleted and made again, or cut by
    ``--repair``, while ``--follow`` was reconnecting).
    """

    def __init__(self, size: int) -> None:
        self._size = size
        #: (offset, timestamp) -> whether its ack was sent (else it is still to be sent: held, or being printed).
        self._acked: dict[tuple[int, int], bool] = {}

    def is_new(self, msg: Message) -> bool:
        """Whether ``msg`` is to be printed (not seen lately); remembers it if so."""
        key = (msg.offset, msg.timestamp)
        if key in self._acked:
            return False
        self._acked[key] = False
        if len(self._acked) > self._size:
            del self._acked[next(iter(self._acked))]
        return True

    def was_acked(self, msg: Message) -> bool:
        """Whether the ack of the message ``msg`` is a copy of was sent.

        If not, the ack still to be sent (held, or after the write) covers
        the copy too; if so, that ack may have been lost with the connection,
        and the copy needs one (:func:`_ack_again`).
        """
        return self._acked.get((msg.offset, msg.timestamp), False)

    def ack_sent(self, msg: Message) -> None:
        """``msg`` was acked: a copy of it from now on needs an ack of its own."""
        key = (msg.offset, msg.timestamp)
        if key in self._acked:
            self._acked[key] = True


async def run_sub(ctx: Context, client: Client) -> int:
    args = ctx.args
    # With -n COUNT, no more than COUNT in flight: a durable's messages taken
    # beyond COUNT would be given back unseen, each counting a delivery (and
    # moving towards max_deliveries and the dead-letter queue).
    prefetch = args.prefetch if args.count is None else min(args.prefetch, args.count)
    # Nor one more sent for an ack: the broker sends one more per ack, so
    # only the first COUNT - prefetch printed are acked as they go, and the
    # rest with the UNSUBSCRIBE (the broker has sent COUNT by then).
    ack_now = None if args.count is None else args.count - prefetch
    last: list[Message] = []
    # --no-ack shows what comes again (one delivery more): that is what it is for.
    printed = Printed(prefetch) if args.durable is not None and not args.no_ack else None
    events = parse_events(args.event)
    sub = await client.subscribe(args.queue, events=events, durable=args.durable, start=args.start,
                                 prefetch=prefetch)  # fmt: skip
    received = 0
    try:
        if args.durable is not None and not events:  # (after the SUBSCRIBE: the filter now in force)
            await _note_durable_filter(ctx, client)
        while (args.count is None or received < args.count) and not ctx.stopper.stopped:
            room = WRITE_BATCH if args.count is None else min(WRITE_BATCH, args.count - received)
            try:
                batch = await _take(ctx, sub, printed, room)
            except StopAsyncIteration:
                break
            written = await _write_or_stop(ctx, b"".join(format_message(m, args.format) for m in batch))
            if written and not args.no_ack:
                for i, m in enumerate(batch, received):
                    if ack_now is None or i < ack_now:
                        await m.ack()
                        if printed is not None:
                            printed.ack_sent(m)
                    else:
                        last.append(m)
            if not written:
                break
            received += len(batch)
    except Stopped:
        pass
    finally:
        try:
            await sub.close(ack=last)  # the queued acks, then those and UNSUBSCRIBE; waits for its OK
        except ServerError as exc:
            sub.ack_errors.append(exc)
    if sub.ack_errors:
        ctx.warn(f"{many(len(sub.ack_errors), 'ack')} refused by the broker, the first: {sub.ack_errors[0]}")
        return EXIT_REFUSED
    return EXIT_OK


async def _take(ctx: Context, sub: Subscription, printed: Printed | None, room: int) -> list[Message]:
    """The next messages to print: one, waited for, and those already
    buffered, up to ``room``; none that ``printed`` says came again.

    Raises:
        StopAsyncIteration: the subscription ended.
        Stopped: a stop came while waiting.
    """
    batch: list[Message] = []
    while not batch or (sub.pending and len(batch) < room):
        # What is already buffered goes out in the same write (one thread hop, not one per line).
        msg = await (sub.__anext__() if batch else ctx.stopper.race(sub.__anext__()))
        if printed is None or printed.is_new(msg):
            batch.append(msg)
        elif printed.was_acked(msg):
            await ctx.stopper.race(_ack_again(msg))
    return batch


async def _ack_again(msg: Message) -> None:
    """Ack a copy of a message acked before, in case that ack was lost with
    the connection; the broker refuses it (BAD_ACK, already acknowledged)
    if it was not, which is fine. Waits for the answer to tell the two apart:
    a refusal of an ack sent without waiting is counted in ``ack_errors``."""
    try:
        await msg.ack(wait=True)
    except ServerError as exc:
        if exc.code is not ErrorCode.BAD_ACK:
            raise


async def _write_or_stop(ctx: Context, data: bytes) -> bool:
    """Write some lines; return whether they went out (False: stdout closed, or stopped while blocked).

    A stop (Ctrl-C) that arrives while the lines are being written gives the
    write a moment: a line the reader has seen must be acked.
    """
    write = asyncio.ensure_future(ctx.out.write(data))
    try:
        await ctx.stopper.race(asyncio.shield(write))
    except Stopped:
        try:
            await asyncio.wait_for(asyncio.shield(write), STOP_GRACE)
        except (TimeoutError, OSError):
            write.cancel()
            return False
    except BrokenPipeError:
        return False
    return True


async def _note_durable_filter(ctx: Context, client: Client, info: dict[str, Any] | None = None) -> None:
    """``sub``/``fetch --durable`` given no ``-e``: say which filter the
    durable keeps, unless it takes every event (see :mod:`client.cli.notes`);
    from ``info`` when the STATUS was asked already."""
    if info is None:
        info = await ctx.stopper.race(status_or_none(client))
    note = None if info is None else filter_note(info, ctx.args.queue, ctx.args.durable)
    if note is not None:
        ctx.warn(note)


async def run_fetch(ctx: Context, client: Client) -> int:
    args = ctx.args
    start = args.start if args.start is not None else "earliest"
    events = parse_events(args.event)
    # A durable's FETCH, or one that waits, creates a queue that does not exist (SPEC section 5):
    # whether it existed is known only before (notes.py).
    creates = args.durable is not None or args.wait > 0
    before = await ctx.stopper.race(status_or_none(client)) if creates else None
    if args.durable is not None and not events and before is not None:  # (before the FETCH, which may wait)
        await _note_durable_filter(ctx, client, before)
    msgs = await ctx.stopper.race(
        client.fetch(args.queue, durable=args.durable, events=events, max_messages=args.max, wait=args.wait,
                     start=start)
    )  # fmt: skip
    if not msgs:  # nothing printed: a typo in the queue's name looks just like this
        after = before if creates else await ctx.stopper.race(status_or_none(client))
        if after is not None and not queue_exists(after, args.queue):
            ctx.warn(created_note(args.queue) if creates else missing_note(args.queue))
    written: list[Message] = []
    try:
        for msg in msgs:
            await ctx.out.write(format_message(msg, args.format))
            written.append(msg)
    except BrokenPipeError:
        pass
    if args.durable is not None and not args.no_ack and written:
        await asyncio.gather(*(m.ack(wait=True) for m in written))
    return EXIT_OK
