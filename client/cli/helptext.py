"""The help texts of ``tidings``: the epilog of each command, and the exit codes.

Kept apart from the parser (:mod:`client.cli.app`) so that the words a user
reads are in one place; each one is shown by ``tidings COMMAND --help``, and
the README's section "The ``tidings`` command" says the same.
"""

from __future__ import annotations

from typing import Final

from ..client import DEFAULT_URL

__all__ = [
    "DELETE_EPILOG",
    "DURABLES_EPILOG",
    "EXIT_CODES",
    "FETCH_EPILOG",
    "MAIN_EPILOG",
    "PING_EPILOG",
    "PUB_EPILOG",
    "QUEUES_EPILOG",
    "RAW_EPILOG",
    "SEEK_EPILOG",
    "STATUS_EPILOG",
    "SUB_EPILOG",
]

EXIT_CODES: Final = """\
exit codes:
  0  ok (also after Ctrl-C ends sub, status --watch, ping or raw, or when
     the reader of stdout goes away)
  1  usage error: bad arguments (an option value out of its range, such as
     --max 2000000 or --id '', is one) or bad input (a payload that is not JSON)
  2  cannot connect to the broker, the connection broke or was ended by the
     broker (SHUTTING_DOWN, SLOW_CONSUMER, ...), or the peer is not a broker
  3  refused: the broker answered a request (or the credentials) with an
     error, its code and message on stderr; or a name the protocol does not
     allow (INVALID_NAME)
  130 interrupted (Ctrl-C): any command but sub, status, ping and raw while
      it was connecting, sub --follow while it waited for a broker not up at
      its start, fetch while it waited, pub while it read stdin (after the
      summary of what it published); a second Ctrl-C exits at once"""

MAIN_EPILOG: Final = f"""\
examples:
  tidings ping
  tidings pub DB CREATE '{{"id": 7}}'
  tidings sub DB --from earliest -n 10 | jq .payload
  tidings status --watch 2

environment:
  TIDINGS_URL       default for --url ({DEFAULT_URL})
  TIDINGS_TOKEN     default for --token
  TIDINGS_TLS_CA    default for --tls-ca
  TIDINGS_TLS_CERT  default for --tls-cert
  TIDINGS_TLS_KEY   default for --tls-key
  TIDINGS_DEBUG     set to 1 to print tracebacks of unexpected errors
The --tls-* options are for tidingss:// URLs: with a tidings:// URL they are a
usage error (exit 1), and the TIDINGS_TLS_* variables are ignored.

{EXIT_CODES}

'tidings COMMAND --help' shows the options and examples of each command."""

PUB_EPILOG: Final = """\
PAYLOAD is JSON; a bare word (no spaces, quotes or brackets) is a string.
Bytes are written {"$base64": "..."} or {"$hex": "..."}. Without PAYLOAD,
and with stdin not a terminal, every stdin line is one message (JSON lines,
blank lines skipped), published pipelined (--inflight at once), in order;
the count and the first and last offsets are printed at the end, and how
many were duplicates (--id: stored before, not stored again). A line that
is not JSON (nor a bare word) stops the import there, exit 1: the lines
before it are published and counted, the rest are not read (with --id, fix
the line and run the same import again: nothing is stored twice). Ctrl-C
stops it the same way, exit 130. Otherwise prints the offset the broker
confirmed (no PAYLOAD at a terminal: null); for a duplicate, the first
one's, and a note on stderr.

examples:
  tidings pub DB CREATE '{"id": 7, "name": "ann"}'
  tidings pub DB DELETE 7 --header source=cli --header trace=abc
  tidings pub DB NOTE hello                  # the string "hello"
  tidings pub DB NOTE --string 'two words'   # any text, as a string
  tidings pub DB CREATE '{"id": 7}' --id order-7   # a repeat prints the first offset
  seq 1000 | tidings pub DB TICK            # 1000 messages, payloads 1..1000
  jq -c '.[]' rows.json | tidings pub DB CREATE --id import-1   # ids import-1-1, import-1-2, ...
"""

SUB_EPILOG: Final = """\
Prints one message per line and acks each once it is written (durable
subscriptions; ephemeral ones have nothing to ack). Exits after -n COUNT
messages, on Ctrl-C (acks flushed), or when the reader of stdout goes away,
with status 0 (3 if the broker refused some acks). A lost connection or a
broker restart ends it with status 2, unless --follow: then it reconnects
and carries on (a durable from its cursor, an ephemeral subscription after
the last message it printed), and a broker not up at its start is waited
for (one line on stderr says so), each for up to 60 s. A durable's message that comes again because
its ack did not reach the broker (lost with the connection, or held for -n)
is not printed twice, unless --no-ack. With -n the prefetch is at most
COUNT and the last acks go with the unsubscribe, so a durable's messages
after the COUNT printed are not taken (none is given back with a delivery
counted).

formats:
  json  {"queue","event","offset","timestamp" (ms),"headers","payload","deliveries"}
        (bytes as {"$base64": "..."})
  text  2024-05-01T12:00:00.123Z DB#42 CREATE {"id":7} source=api (delivery 2)
  raw   the payload alone: strings and bytes as they are, anything else as JSON

-e with --durable: a durable keeps its event filter, and messages it
filters out are passed over for good. Without -e, a new durable takes every
event and an existing one keeps the filter it has (a note on stderr names it
when that is not every event); -e '*' widens it to every event again. A
durable's filter changes only while nobody else is attached (else CONFLICT).

--from applies to ephemeral subscriptions and to a durable's first use:
new (the default), earliest, an offset, or an ISO 8601 time (2024-05-01T12:00:00Z;
without a zone, local time).

examples:
  tidings sub DB                               # live, until Ctrl-C
  tidings sub DB -e CREATE -e 'user.*' --from earliest -n 10
  tidings sub DB --durable audit -n 100 | jq -c .payload
  tidings sub DB --durable audit --no-ack -n 1  # peek at one: redelivered later, one delivery more
  tidings sub DB --durable audit --follow      # like tail -F: carries on across broker restarts
  tidings sub DB --from 2024-05-01T00:00:00Z --format text
"""

FETCH_EPILOG: Final = """\
Pulls up to --max messages once, waiting up to --wait seconds when none is
there. With --durable the messages come from that durable's cursor and are
acked after printing (unless --no-ack); without it this is a plain read of
the log from --from (default: earliest) and nothing is remembered (a
queue that does not exist reads as empty and is not created, unless
--wait is given: the fetch then waits on it like a subscriber; with
--durable it is created too). When nothing comes, a note on stderr says if
the queue does not exist, or was created by this fetch. -e with
--durable is as for sub: without it, a durable keeps the filter it has (a
note on stderr names it when that is not every event); -e '*' for every event.

examples:
  tidings fetch DB --max 5                      # the first five messages
  tidings fetch DB --from 120 --max 1            # the message at offset 120
  tidings fetch DB --durable poller --wait 5     # next batch of the durable
  tidings fetch DB --durable poller --no-ack --format text
"""

STATUS_EPILOG: Final = """\
Connections, subscriptions, queues (offsets, size, message rate) and
durables (filter, cursor, lag, in flight), as tables or as JSON.

examples:
  tidings status
  tidings status --json | jq '.queues[] | {name, next_offset}'
  tidings status --watch 2          # refresh every 2 s; rates measured between polls
  tidings status --json --watch 10  # one JSON document per line
"""

QUEUES_EPILOG: Final = """\
The queues the broker has: offsets of the first retained and the next
message, messages, size on disk, average publish rate. Delete one with
`tidings delete QUEUE`. Queues the broker refused at start-up (damage, an
I/O error) are not listed: stderr names them (`tidings status` says why).

examples:
  tidings queues
  tidings queues --json | jq -r '.[].name'
"""

DURABLES_EPILOG: Final = """\
Durable cursors, of every queue or of QUEUE: their event filter, cursor (ack
floor), lag (messages not yet acked), messages in flight, consumers
attached (push subscriptions) and fetchers (connections holding fetched
messages unacked: they, too, keep a seek or delete of the durable waiting). Delete one with `tidings delete QUEUE --durable NAME`, rewind or
skip one with `tidings seek QUEUE --durable NAME --to POSITION`. A QUEUE
that does not exist, or that the broker refused at start-up, is exit 3.
A cursor shown "0 (behind FIRST 200)" is behind the queue's first message
kept: retention dropped messages the durable had not acked; they count as
done (and are not in its lag), and its next message says which in its
x-retention-gap header.

examples:
  tidings durables
  tidings durables DB --json
"""

PING_EPILOG: Final = """\
examples:
  tidings ping
  tidings ping -c 5 -i 0.2
  tidings ping -c 0                 # until Ctrl-C
"""

DELETE_EPILOG: Final = """\
Deletes a durable (its cursor) or, without --durable, a whole queue with
its messages and durables. Refused (exit 3, CONFLICT) while someone is
subscribed to it or holds messages of it fetched and not yet acked (for a
queue also: while a FETCH waits on it or publishes to it are not yet
confirmed); NOT_FOUND if it does not exist.

examples:
  tidings delete DB --durable audit
  tidings delete scratch
"""

SEEK_EPILOG: Final = """\
Moves a durable: it next delivers from --to (earliest, new, an offset, or an
ISO 8601 time); what it had in flight is forgotten. An offset past the end
of the log moves it to the end, one before the first message kept to that
message; the offset it was moved to is printed (read from STATUS after the
move). Refused (exit 3, CONFLICT) while someone is subscribed with it or
holds messages of it fetched and not yet acked.

examples:
  tidings seek DB --durable audit --to earliest        # replay everything
  tidings seek DB --durable audit --to 2026-11-23T09:00:00Z
  tidings seek DB --durable audit --to new             # skip the backlog
"""

RAW_EPILOG: Final = """\
The netcat mode. Connects, does the HELLO handshake (unless --no-hello),
sends every stdin line as one frame and prints every frame received as one
JSON line; exits when stdin ends and every request sent has its reply
(waiting at most --wait seconds), after --linger more seconds (status 0).
If the broker closes the connection first, unless after a BYE you sent, it
says so on stderr and exits 2, as for a connection the broker ended.

input: one frame per line, its wire list in the order of protocol/messages.py;
the type may be its number or its name; '#' lines are comments:
  [3, 1, "DB", "CREATE", {"id": 1}, null, null]      PUBLISH req 1
  ["STATUS", 2]
  ["PUBLISH", 3, "DB", "BLOB", {"$base64": "AAEC"}, null, null]

output: {"type":"PUBACK","frame":[4,1,0,false]}; "invalid" says why a frame
breaks the protocol's rules; bytes are {"$base64": "..."}, or with --hex
{"$hex": "..."} plus the frame's wire bytes as "hex". The broker's heartbeat
PINGs are printed and answered automatically.

--decode FILE (or stdin) decodes a captured byte stream into the same JSON
lines without a broker.

examples:
  echo '["PING", 7]' | tidings raw
  printf '%s\\n' '["SUBSCRIBE", 1, 1, "DB", [], null, "earliest", null, 10, 0, 0, null]' \\
      | tidings raw --linger 1
  tidings raw --hex < frames.jsonl
  tidings raw --decode capture.bin
  xxd -r -p dump.hex | tidings raw --decode
"""
