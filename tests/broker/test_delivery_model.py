"""A stateful model of a durable's delivery: the real log, queue and group
against a set-based model, through publishes, acks, nacks, consumers coming
and going, clean restarts and crashes with a stale cursor file."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from broker.cursors import Cursor, CursorState, decode_state, encode_state
from broker.log import QueueLog
from broker.queue import Queue
from broker.router import Consumer, Group
from broker.store import Store, group_from_state
from protocol import Deliver, FrameDecoder, encode_record
from protocol.framing import unpack_body


class Target:
    """Stands in for a session's socket: collects the DELIVER frames written to it."""

    def __init__(self, sub_id: int) -> None:
        self.sub_id = sub_id
        self.decoder = FrameDecoder(1 << 20)
        self.got: list[Deliver] = []

    def write(self, data: bytes) -> None:
        for body in self.decoder.feed(data):
            self.got.append(Deliver.from_wire(unpack_body(body, 1 << 20)))  # type: ignore[arg-type]


class DeliveryModel(RuleBasedStateMachine):
    @initialize(events=st.sampled_from([(), ("a",), ("a*",)]))
    def open(self, events: tuple[str, ...]) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="tidings-model-"))
        self.events = events
        self.queue = Queue("Q", QueueLog.open(self.dir, segment_bytes=4096))
        self.group = Group("Q", "d", events, Cursor(), 0)
        self.queue.groups["d"] = self.group
        self.consumers: list[tuple[Consumer, Target]] = []
        self.acked: set[int] = set()  # the model: offsets acked (or filtered out)
        self.matching: list[bool] = []  # per offset: does it pass the filter
        self.delivered: set[int] = set()
        self.snapshot: CursorState = Store.state_of(self.group)
        self.now = 0.0

    def teardown(self) -> None:
        self.queue.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _pump(self) -> None:
        self.queue.pump(self.group, self.now)
        for _, target in self.consumers:
            for frame in target.got:
                assert frame.offset not in self.acked, f"acked offset {frame.offset} delivered again"
                assert self.matching[frame.offset]
                self.delivered.add(frame.offset)
            target.got.clear()

    @rule(events=st.lists(st.sampled_from(["a", "b"]), min_size=1, max_size=5))
    def publish(self, events: list[str]) -> None:
        self.queue.append([encode_record(e, 1, None, i) for i, e in enumerate(events)], 1, dedup_until=0)
        self.matching += [self.group.filter(e) for e in events]
        self.queue.commit(self.queue.log.next_offset)
        self._pump()

    @rule(prefetch=st.integers(1, 4))
    def attach(self, prefetch: int) -> None:
        target = Target(len(self.consumers) + 1)
        consumer = Consumer(target, prefetch)
        self.group.attach(consumer)
        self.consumers.append((consumer, target))
        self._pump()

    @precondition(lambda self: self.consumers)
    @rule(data=st.data())
    def detach(self, data: st.DataObject) -> None:
        consumer, _ = self.consumers.pop(data.draw(st.integers(0, len(self.consumers) - 1)))
        self.group.detach(consumer)
        self._pump()

    def _held(self) -> list[int]:
        return sorted(o for c, _ in self.consumers for o in c.held)

    @precondition(lambda self: any(c.held for c, _ in self.consumers))
    @rule(data=st.data())
    def ack(self, data: st.DataObject) -> None:
        offset = data.draw(st.sampled_from(self._held()))
        self.group.ack((offset,), None)
        self.acked.add(offset)
        self._pump()

    @precondition(lambda self: self.group.read_pos > self.group.cursor.ack_floor)
    @rule(data=st.data())
    def ack_upto(self, data: st.DataObject) -> None:
        upto = data.draw(st.integers(self.group.cursor.ack_floor, self.group.read_pos - 1))
        self.group.ack((), upto)
        self.acked.update(range(upto + 1))
        self._pump()

    @precondition(lambda self: any(c.held for c, _ in self.consumers))
    @rule(data=st.data(), delay=st.sampled_from([0.0, 1.0]))
    def nack(self, data: st.DataObject, delay: float) -> None:
        self.group.nack((data.draw(st.sampled_from(self._held())),), delay, self.now)
        self._pump()

    @rule()
    def time_passes(self) -> None:
        self.now += 40.0  # past every ack wait and nack delay
        self.group.expire(self.now)
        self._pump()

    @rule()
    def flush_cursor(self) -> None:
        self.snapshot = Store.state_of(self.group)

    @rule(crash=st.booleans())
    def restart(self, crash: bool) -> None:
        """Clean: the current cursor is saved. Crash: the last flushed one is loaded."""
        state = self.snapshot if crash else Store.state_of(self.group)
        state = decode_state(encode_state(state))
        assert state is not None
        if crash:
            self.acked = {o for o in self.acked if state.ack_floor > o or o in state.acked}
        self.queue.log.close()
        self.queue = Queue("Q", QueueLog.open(self.dir, segment_bytes=4096))
        self.group = group_from_state(self.queue, "d", state)
        self.queue.groups["d"] = self.group
        self.consumers = []
        self.snapshot = Store.state_of(self.group)

    @invariant()
    def nothing_is_lost(self) -> None:
        g = self.group
        for offset in range(g.cursor.ack_floor, g.read_pos):
            assert g.cursor.is_acked(offset) or offset in g.in_flight or offset in g.ready or offset in g.delayed, (
                f"offset {offset} forgotten"
            )
        for offset in range(self.queue.log.next_offset):
            if offset in self.acked:
                assert g.cursor.is_acked(offset)

    @invariant()
    def credit_is_respected(self) -> None:
        for consumer, _ in self.consumers:
            assert len(consumer.held) <= consumer.prefetch

    @rule()
    def drain_everything(self) -> None:
        """The other consumers leave; one with room for everything acks until nothing is left."""
        for consumer, _ in self.consumers:
            self.group.detach(consumer)
        self.consumers = []
        self.now += 40.0
        self.group.expire(self.now)
        self.attach(1000)
        consumer = self.consumers[-1][0]
        for _ in range(100):
            for offset in sorted(consumer.held):
                self.group.ack((offset,), None)
                self.acked.add(offset)
            self._pump()
            if not consumer.held and self.group.read_pos == self.queue.log.next_offset:
                break
        for offset in range(self.queue.log.next_offset):
            assert self.group.cursor.is_acked(offset), f"offset {offset} never completed"
            assert offset in self.delivered or not self.matching[offset] or offset in self.acked


DeliveryModel.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
TestDeliveryModel = DeliveryModel.TestCase
