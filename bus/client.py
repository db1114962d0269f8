"""A process's connection to the broker: publish on lanes, receive with control drained first.

Each lane (see :data:`bus.schema.LANES`) has its own PUB and SUB socket, so a burst of JPEG frames
cannot delay an interrupt: the broker's XSUB fair-queues between connections, each subscriber
connection has its own queue per lane, and :meth:`BusClient.recv` always drains the
highest-priority lane first.

Publishing never blocks: a PUB socket drops at its high-water mark instead. Receiving validates
every frame; bad ones are dropped, counted in :attr:`BusClient.drops` and logged once per kind.
"""

from __future__ import annotations

import argparse
import collections
import time
import uuid
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass

import structlog
import zmq
import zmq.asyncio

from bus import keys as bus_keys
from bus import schema
from bus.schema import LANES, Lane, Message

PROBE = b"_probe\0"


@dataclass(frozen=True, slots=True)
class Endpoints:
    """Where the broker listens; the same defaults serve every process (see core.config)."""

    pub: str = "tcp://127.0.0.1:7701"
    sub: str = "tcp://127.0.0.1:7702"
    keys: str = ""

    @classmethod
    def from_settings(cls, settings: argparse.Namespace) -> Endpoints:
        return cls(pub=settings.bus_pub, sub=settings.bus_sub, keys=settings.bus_keys)


class BusClient:
    """Async publisher and subscriber of one process. Use as ``async with BusClient(...) as bus``."""

    def __init__(self, endpoints: Endpoints, actor: str, topics: Iterable[str] = (),
                 *, instance: str | None = None) -> None:
        self.endpoints = endpoints
        self.actor = actor
        self.instance = instance or f"{actor}-{uuid.uuid4().hex[:8]}"
        self.drops: collections.Counter[str] = collections.Counter()
        self._keys = bus_keys.check([endpoints.pub, endpoints.sub], endpoints.keys)
        self._ctx = zmq.asyncio.Context()
        self._pub: dict[str, zmq.Socket] = {}
        self._sub: dict[str, zmq.asyncio.Socket] = {}
        self._sub_sync: dict[str, zmq.Socket] = {}
        self._poller = zmq.asyncio.Poller()
        self._seq: collections.Counter[str] = collections.Counter()
        self._last_seq: dict[tuple[str, str], int] = {}
        self._log = structlog.get_logger().bind(instance=self.instance)
        self._probe_topic = PROBE + self.instance.encode()
        self._probe_seen: set[str] = set()
        for topic in topics:
            self.subscribe(topic)

    # -- lifecycle

    async def __aenter__(self) -> BusClient:
        await self.wait_connected()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for sock in (*self._pub.values(), *self._sub.values()):
            sock.close(linger=100)
        self._ctx.term()

    # -- sockets

    def _lane_sockets(self, lane: Lane) -> None:
        if lane.name in self._pub:
            return
        ctx = zmq.Context.shadow(self._ctx.underlying)
        pub = ctx.socket(zmq.PUB)
        pub.sndhwm = lane.hwm
        pub.linger = 200
        bus_keys.secure_client(pub, self._keys)
        pub.connect(self.endpoints.pub)
        sub = self._ctx.socket(zmq.SUB)
        sub.rcvhwm = lane.hwm
        sub.linger = 0
        bus_keys.secure_client(sub, self._keys)
        sub.connect(self.endpoints.sub)
        sub.setsockopt(zmq.SUBSCRIBE, self._probe_topic)
        self._pub[lane.name] = pub
        self._sub[lane.name] = sub
        self._sub_sync[lane.name] = zmq.Socket.shadow(sub.underlying)
        self._poller.register(sub, zmq.POLLIN)

    def subscribe(self, topic: str) -> None:
        """Receive ``topic`` (call :meth:`wait_connected` after adding subscriptions at run time)."""
        if topic not in schema.MESSAGE_TYPES:
            raise ValueError(f"unknown topic {topic!r}; known: {', '.join(schema.TOPICS)}")
        lane = LANES[topic]
        self._lane_sockets(lane)
        self._sub[lane.name].setsockopt(zmq.SUBSCRIBE, schema.topic_frame(topic))

    async def wait_connected(self, timeout: float = 10.0) -> None:
        """Return once a probe has gone out and come back on every lane through the broker.

        This closes the slow-joiner gap: when it returns, our subscriptions are in force at the
        broker and our publishers have the subscriptions the broker knew when they connected.
        """
        for lane in {*LANES.values()}:
            self._lane_sockets(lane)
        pending = set(self._pub)
        self._probe_seen.clear()
        deadline = time.monotonic() + timeout
        while not pending <= self._probe_seen:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"no answer from the bus broker at {self.endpoints.pub} / {self.endpoints.sub} "
                    f"within {timeout:.0f} s: is it running (python -m bus.broker)?")
            for name in pending - self._probe_seen:
                self._pub[name].send_multipart([self._probe_topic, name.encode()], zmq.NOBLOCK)
            end = time.monotonic() + 0.05
            while time.monotonic() < end and not pending <= self._probe_seen:
                events = dict(await self._poller.poll(timeout=20))
                for name, sock in self._sub_sync.items():
                    if self._sub[name] in events:
                        self._drain_probes(sock)

    def _drain_probes(self, sock: zmq.Socket) -> None:
        while True:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if frames[0] == self._probe_topic and len(frames) == 2:
                self._probe_seen.add(frames[1].decode())

    # -- publish

    def publish(self, msg: Message) -> None:
        """Stamp ``seq``/``source`` and send; never blocks (PUB drops at the high-water mark)."""
        topic = msg.TOPIC
        self._seq[topic] += 1
        msg.seq = self._seq[topic]
        msg.source = self.instance
        lane = LANES[topic]
        self._lane_sockets(lane)
        self._pub[lane.name].send_multipart(schema.encode(msg), zmq.NOBLOCK)

    # -- receive

    async def recv(self) -> Message:
        """The next valid message, highest-priority lane first."""
        order = sorted(self._sub_sync, key=lambda name: _lane_by_name(name).priority)
        while True:
            for name in order:
                try:
                    frames = self._sub_sync[name].recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    continue
                msg = self._accept(frames)
                if msg is not None:
                    return msg
                break  # rescan from the top lane
            else:
                await self._poller.poll()

    async def __aiter__(self) -> AsyncIterator[Message]:
        while True:
            yield await self.recv()

    def _accept(self, frames: list[bytes]) -> Message | None:
        if frames and frames[0].startswith(PROBE):
            if frames[0] == self._probe_topic and len(frames) == 2:
                self._probe_seen.add(frames[1].decode())
            return None
        try:
            msg = schema.decode(frames)
        except schema.DecodeError as exc:
            self._drop(exc.kind, exc.detail)
            return None
        key = (msg.source, msg.TOPIC)
        last = self._last_seq.get(key)
        if last is not None and msg.seq > last + 1:
            self._drop("gap", f"{msg.TOPIC} from {msg.source}: {msg.seq - last - 1} missing",
                       count=msg.seq - last - 1)
        if last is None or msg.seq > last:
            self._last_seq[key] = msg.seq
        return msg

    def _drop(self, kind: str, detail: str, count: int = 1) -> None:
        first = kind not in self.drops
        self.drops[kind] += count
        if first:
            self._log.warning("bus_drop", kind=kind, detail=detail)


def _lane_by_name(name: str) -> Lane:
    return next(lane for lane in LANES.values() if lane.name == name)


async def connect(endpoints: Endpoints, actor: str, topics: Iterable[str] = (),
                  timeout: float = 10.0) -> BusClient:
    """Open a client and wait until the broker path works (or raise ``TimeoutError``)."""
    client = BusClient(endpoints, actor, topics)
    try:
        await client.wait_connected(timeout)
    except BaseException:
        client.close()
        raise
    return client

