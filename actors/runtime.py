"""What every actor process shares: flags, logs, bus connection, readiness, heartbeats, shutdown.

An actor subclasses :class:`Actor`, names its topics and config groups, loads its models in
:meth:`Actor.prepare` (off the event loop) and reacts to messages in :meth:`Actor.handle`, which
must return quickly: lasting work goes into :attr:`Actor.jobs`, one cancellable job per session.
The runtime drops messages of stale turns and of sessions another worker of the same kind owns,
so ``handle`` only sees what is this process's to do.

``python -m actors.NAME`` calls :func:`main` with the actor class; so does the supervisor.
"""

from __future__ import annotations

import abc
import argparse
import asyncio
import contextlib
import signal
import sys
from collections.abc import Coroutine
from typing import Any, ClassVar

import structlog

from bus.client import BusClient, Endpoints
from bus.membership import HEARTBEAT_S, Membership
from bus.schema import CONTROL, NO_SESSION, Control, ControlKind, Message
from bus.turns import TurnTracker
from core import config, logs

CONNECT_TIMEOUT_S = 30.0


class SessionJobs:
    """At most one running job per session, inside the actor's task group.

    Starting a job cancels the session's previous one; ``cancel`` stops it at once (interrupt,
    session end). A job that fails is logged and reported to the page, never crashes the actor.
    """

    def __init__(self, tg: asyncio.TaskGroup, on_error: Any) -> None:
        self._tg = tg
        self._on_error = on_error
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def start(self, session: str, turn: int, coro: Coroutine[Any, Any, None]) -> None:
        self.cancel(session)
        self._tasks[session] = self._tg.create_task(self._guard(session, turn, coro))

    def running(self, session: str) -> bool:
        task = self._tasks.get(session)
        return task is not None and not task.done()

    def cancel(self, session: str) -> bool:
        task = self._tasks.pop(session, None)
        if task is not None and not task.done():
            task.cancel()
            return True
        return False

    async def _guard(self, session: str, turn: int, coro: Coroutine[Any, Any, None]) -> None:
        try:
            await coro
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await self._on_error(session, turn, exc)
        finally:
            if self._tasks.get(session) is asyncio.current_task():
                del self._tasks[session]


class Actor(abc.ABC):
    """Base of every actor process."""

    name: ClassVar[str]
    topics: ClassVar[tuple[str, ...]] = ()  # control is always received
    groups: ClassVar[tuple[str, ...]] = ()  # config groups beyond bus and log
    sharded: ClassVar[bool] = True  # several workers of this kind share sessions
    description: ClassVar[str] = ""

    def __init__(self, settings: argparse.Namespace, bus: BusClient) -> None:
        self.settings = settings
        self.bus = bus
        self.log = structlog.get_logger()
        self.turns = TurnTracker()
        self.members = Membership(self.name, bus.instance)
        self.jobs: SessionJobs  # set when the actor starts running

    # -- for subclasses

    async def prepare(self) -> None:
        """Load models and warm them up; runs before the actor reports ready."""

    @abc.abstractmethod
    async def handle(self, msg: Message) -> None:
        """React to one current message of an owned session; return quickly."""

    async def interrupted(self, session: str, turn: int) -> None:
        """The session moved on to ``turn``: drop everything older (default: cancel its job)."""
        self.jobs.cancel(session)

    async def session_ended(self, session: str) -> None:
        """Free every state of ``session`` (default: cancel its job)."""
        self.jobs.cancel(session)

    async def background(self) -> None:
        """Extra long-running work of the actor (default: none); runs in the actor's task group."""

    # -- helpers

    def publish(self, msg: Message) -> None:
        self.bus.publish(msg)

    def report_error(self, session: str, turn: int, text: str) -> None:
        """Tell the session's page about a problem, in words a user can read."""
        self.publish(Control(session=session, turn=turn, kind=ControlKind.ERROR,
                             actor=self.name, instance=self.bus.instance, text=text))

    async def _job_failed(self, session: str, turn: int, exc: Exception) -> None:
        self.log.error("job_failed", session=session, turn=turn, error=repr(exc),
                       exc_info=exc)
        self.report_error(session, turn, f"{self.name} failed: {exc}")

    # -- runtime

    async def run(self) -> None:
        """Receive, filter and dispatch until cancelled."""
        async with asyncio.TaskGroup() as tg:
            self.jobs = SessionJobs(tg, self._job_failed)
            tg.create_task(self._heartbeat())
            tg.create_task(self.background())
            self._announce(ControlKind.READY)
            self.log.info("actor_ready", instance=self.bus.instance)
            while True:
                msg = await self.bus.recv()
                await self._dispatch(msg)

    async def _dispatch(self, msg: Message) -> None:
        if isinstance(msg, Control):
            self.members.observe(msg)
            if msg.session == NO_SESSION:
                if CONTROL in self.topics:
                    await self.handle(msg)
                return
            if msg.kind == ControlKind.SESSION_END:
                self.turns.forget(msg.session)
                self.members.forget(msg.session)
                await self.session_ended(msg.session)
                if CONTROL in self.topics:
                    await self.handle(msg)
                return
            if not self._mine(msg.session):
                return
            if msg.kind == ControlKind.INTERRUPT and self.turns.advance(msg.session, msg.turn):
                await self.interrupted(msg.session, msg.turn)
            if CONTROL in self.topics:
                await self.handle(msg)  # control from the page carries no turn: never stale
            return
        if not self._mine(msg.session):
            return
        if self.turns.is_stale(msg):
            return
        if self.turns.advance(msg.session, msg.turn):
            await self.interrupted(msg.session, msg.turn)
        await self.handle(msg)

    def _mine(self, session: str) -> bool:
        if not self.sharded:
            return True
        if not self.members.owns(session):
            return False
        if self.members.claim(session):
            self._announce(ControlKind.CLAIM, session)
        return True

    def _announce(self, kind: ControlKind, session: str = NO_SESSION) -> None:
        self.publish(Control(session=session, kind=kind, actor=self.name,
                             instance=self.bus.instance))

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            self._announce(ControlKind.HEARTBEAT)


def main(actor_cls: type[Actor], argv: list[str] | None = None) -> int:
    """Entry point of ``python -m actors.NAME``."""
    settings = config.parse(["bus", "log", *actor_cls.groups], argv,
                            prog=f"python -m actors.{actor_cls.name}",
                            description=actor_cls.description or actor_cls.__doc__)
    log = logs.configure(actor_cls.name, json=settings.log_json, level=settings.log_level)
    try:
        return asyncio.run(_serve(actor_cls, settings))
    except KeyboardInterrupt:
        return 0
    except StartupError as exc:
        log.error("startup_failed", error=str(exc))
        print(f"{actor_cls.name}: {exc}", file=sys.stderr)
        return 3


class StartupError(RuntimeError):
    """A problem the user can fix (a missing model, a bad flag); printed without a traceback."""


async def _serve(actor_cls: type[Actor], settings: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    assert main_task is not None
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, main_task.cancel)
    topics = {*actor_cls.topics, CONTROL}
    try:
        bus = BusClient(Endpoints.from_settings(settings), actor_cls.name, topics,
                        instance=settings.instance or None)
    except RuntimeError as exc:
        raise StartupError(str(exc)) from None
    try:
        try:
            await bus.wait_connected(CONNECT_TIMEOUT_S)
        except TimeoutError as exc:
            raise StartupError(str(exc)) from None
        actor = actor_cls(settings, bus)
        await actor.prepare()
        with contextlib.suppress(asyncio.CancelledError):
            await actor.run()
    except asyncio.CancelledError:
        pass
    finally:
        bus.close()
        structlog.get_logger().info("actor_stopped")
    return 0
