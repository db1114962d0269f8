"""Start the broker and every actor as separate processes, keep them alive, stop them in order.

``python supervisor.py`` is the whole system on one machine. It waits until each actor reports
ready on the bus before printing the call page's URL, restarts a crashed (or silent) actor with
exponential backoff, gives up loudly on a crash loop, and on Ctrl-C / SIGTERM stops the actors
in dependency order and the broker last, leaving no child behind. With ``--only``/``--without``
and ``--no-broker`` a machine runs part of the system and joins a bus elsewhere.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import ctypes
import importlib.util
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

from bus.client import BusClient, Endpoints
from bus.keys import BusSecurityError
from bus.schema import CONTROL, NO_SESSION, Control, ControlKind
from core import config, logs

ACTORS = ("asr", "llm", "tts", "media", "signaling")  # start order: slow model loads first
STOP_ORDER = (("signaling",), ("media",), ("llm", "tts", "asr"))  # front door first
STOP_GRACE_S = 3.0
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 30.0
STABLE_AFTER_S = 30.0  # an actor up this long has its backoff reset
CRASH_LOOP = (5, 120.0)  # this many failed starts within this many seconds: give up
SILENT_AFTER_S = 10.0  # a ready actor without heartbeat this long is hung: restart it
OUTPUT_TAIL = 30  # lines of a child's output kept for crash reports
PR_SET_PDEATHSIG = 1


def _child_setup(nice: int) -> Callable[[], None]:
    """What a child runs before exec: die with the supervisor (even on kill -9), set priority."""
    def setup() -> None:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if nice:
            with contextlib.suppress(OSError):
                os.nice(nice)
    return setup


@dataclass
class Child:
    """One supervised process and its restart history."""

    name: str
    argv: list[str]
    proc: asyncio.subprocess.Process | None = None
    instance: str = ""
    started: float = 0.0
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    last_beat: float = 0.0
    failures: collections.deque[float] = field(default_factory=collections.deque)
    tail: collections.deque[str] = field(default_factory=lambda: collections.deque(maxlen=OUTPUT_TAIL))
    gave_up: bool = False
    starts: int = 0


class Supervisor:
    """Owns the child processes; all its work runs in one task group."""

    def __init__(self, settings: argparse.Namespace, actors: list[str]) -> None:
        self.settings = settings
        self.actors = actors
        self.endpoints = Endpoints.from_settings(settings)
        self.log = structlog.get_logger()
        self.stopping = asyncio.Event()
        self.children: dict[str, Child] = {
            name: Child(name, [sys.executable, "-m", f"actors.{name}"]) for name in actors
        }
        self.broker: Child | None = None
        if not settings.no_broker:
            self.broker = Child("broker", [sys.executable, "-m", "bus.broker"])
        self.env = {**os.environ, **config.to_environ(settings, config.GROUPS),
                    "PYTHONUNBUFFERED": "1"}
        self.env.pop("PARLEY_INSTANCE", None)
        self.host = socket.gethostname().split(".")[0]
        self.niceness = parse_niceness(settings.nice)

    # -- processes

    async def _spawn(self, child: Child) -> None:
        child.starts += 1
        child.instance = f"{child.name}-{self.host}-{os.getpid()}-{child.starts}"
        child.ready.clear()
        env = {**self.env, "PARLEY_INSTANCE": child.instance}
        child.proc = await asyncio.create_subprocess_exec(
            *child.argv, env=env, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_child_setup(self.niceness.get(child.name, 0)))
        child.started = time.monotonic()
        child.last_beat = child.started
        self.log.info("process_started", process=child.name, pid=child.proc.pid,
                      instance=child.instance)

    async def _pump_output(self, child: Child, proc: asyncio.subprocess.Process) -> None:
        """Forward a child's log lines to our stderr, keeping the last few for crash reports."""
        assert proc.stdout is not None
        while line := await proc.stdout.readline():
            text = line.decode(errors="replace").rstrip("\n")
            child.tail.append(text)
            print(text, file=sys.stderr, flush=True)

    async def _stop_child(self, child: Child) -> None:
        proc = child.proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), STOP_GRACE_S)
        except TimeoutError:
            self.log.warning("process_killed", process=child.name, pid=proc.pid,
                             reason=f"still running {STOP_GRACE_S:.0f} s after SIGTERM")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
        # Grandchildren (a model worker process, say) share the group: make sure none stays.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)

    async def keep(self, child: Child) -> None:
        """Run ``child``, restarting it with backoff until shutdown or a crash loop."""
        backoff = BACKOFF_FIRST_S
        while not self.stopping.is_set():
            await self._spawn(child)
            proc = child.proc
            assert proc is not None
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._pump_output(child, proc))
                code = await proc.wait()
            if self.stopping.is_set():
                return
            uptime = time.monotonic() - child.started
            now = time.monotonic()
            if uptime >= STABLE_AFTER_S:
                backoff = BACKOFF_FIRST_S
                child.failures.clear()
            child.failures.append(now)
            while child.failures and now - child.failures[0] > CRASH_LOOP[1]:
                child.failures.popleft()
            if len(child.failures) >= CRASH_LOOP[0]:
                child.gave_up = True
                self.log.error("crash_loop", process=child.name, exits=len(child.failures),
                               seconds=CRASH_LOOP[1], last_code=code,
                               hint="not restarted again; its last output follows")
                for line in child.tail:
                    print(f"  {child.name} | {line}", file=sys.stderr)
                return
            self.log.warning("process_exited", process=child.name, code=code,
                             uptime_s=round(uptime, 1), restart_in_s=backoff)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), backoff)
            backoff = min(backoff * 2, BACKOFF_MAX_S)

    # -- bus

    async def watch_bus(self, bus: BusClient) -> None:
        """Mark actors ready from their announcements; restart ones whose heartbeat stopped."""
        by_instance = lambda inst: next(  # noqa: E731
            (c for c in self.children.values() if c.instance == inst), None)
        while True:
            try:
                async with asyncio.timeout(1.0):
                    msg = await bus.recv()
            except TimeoutError:
                msg = None
            if isinstance(msg, Control) and msg.session == NO_SESSION:
                child = by_instance(msg.instance)
                if child is not None and msg.kind in (ControlKind.READY, ControlKind.HEARTBEAT):
                    child.last_beat = time.monotonic()
                    if not child.ready.is_set():
                        child.ready.set()
                        self.log.info("actor_ready", process=child.name,
                                      ms=round((time.monotonic() - child.started) * 1000))
            now = time.monotonic()
            for child in self.children.values():
                proc = child.proc
                if (child.ready.is_set() and proc is not None and proc.returncode is None
                        and now - child.last_beat > SILENT_AFTER_S):
                    self.log.error("actor_silent", process=child.name,
                                   seconds=round(now - child.last_beat, 1), action="restart")
                    child.ready.clear()
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)

    async def wait_ready(self) -> bool:
        """True once every actor is ready; False on timeout or when one gave up."""
        deadline = time.monotonic() + self.settings.ready_timeout
        pending = set(self.children)
        while pending:
            for name in list(pending):
                if self.children[name].ready.is_set():
                    pending.discard(name)
                elif self.children[name].gave_up:
                    self.log.error("startup_failed", process=name)
                    return False
            if time.monotonic() > deadline:
                self.log.error("startup_timeout", waiting_for=sorted(pending),
                               seconds=self.settings.ready_timeout)
                return False
            await asyncio.sleep(0.1)
        return True

    def page_url(self) -> str | None:
        if "signaling" not in self.children:
            return None
        host = self.settings.host
        loopback = host in ("127.0.0.1", "localhost", "::1")
        scheme = "https" if self.settings.https or not loopback else "http"
        shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
        return f"{scheme}://{shown}:{self.settings.port}/"

    # -- lifecycle

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, self.stopping.set)
        code = 0
        bus = BusClient(self.endpoints, "supervisor", [CONTROL])
        try:
            async with asyncio.TaskGroup() as tg:
                if self.broker is not None:
                    tg.create_task(self.keep(self.broker))
                try:
                    await bus.wait_connected(timeout=20.0)
                except TimeoutError as exc:
                    self.log.error("bus_unreachable", error=str(exc))
                    code = 1
                    self.stopping.set()
                    await self._shutdown()
                    return code
                watcher = tg.create_task(self.watch_bus(bus))
                keepers = [tg.create_task(self.keep(c)) for c in self.children.values()]
                ready = tg.create_task(self.wait_ready())
                stop = tg.create_task(self.stopping.wait())
                await asyncio.wait({ready, stop}, return_when=asyncio.FIRST_COMPLETED)
                if ready.done() and ready.result():
                    url = self.page_url()
                    print(f"\nParley is ready ({', '.join(self.actors)})"
                          + (f": open {url}\n" if url else "\n"), flush=True)
                elif not self.stopping.is_set():
                    code = 1
                    self.stopping.set()
                ready.cancel()
                await self.stopping.wait()
                self.log.info("shutting_down")
                await self._shutdown()
                watcher.cancel()
                for task in keepers:
                    task.cancel()
        finally:
            await self._shutdown()
            bus.close()
        self.log.info("stopped", code=code)
        return code

    async def _shutdown(self) -> None:
        self.stopping.set()
        for tier in STOP_ORDER:
            await asyncio.gather(*(self._stop_child(self.children[n])
                                   for n in tier if n in self.children))
        if self.broker is not None:
            await self._stop_child(self.broker)


def parse_niceness(text: str) -> dict[str, int]:
    """``asr=2,llm=6`` -> {"asr": 2, "llm": 6}; a clear error for anything else."""
    out: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        if not sep or name not in ACTORS or not value.lstrip("-").isdigit():
            raise SystemExit(f"--nice: expected ACTOR=NUMBER pairs ({', '.join(ACTORS)}), got {item!r}")
        out[name] = int(value)
    return out


def available_actors() -> list[str]:
    """Actors whose module exists in this checkout."""
    return [name for name in ACTORS if importlib.util.find_spec(f"actors.{name}") is not None]


def select(available: list[str], only: str, without: str,
           warn: Callable[[str], None]) -> list[str]:
    """Apply ``--only``/``--without`` to the available actors, rejecting unknown names."""
    def names(text: str) -> list[str]:
        out = [n.strip() for n in text.split(",") if n.strip()]
        unknown = [n for n in out if n not in ACTORS]
        if unknown:
            raise SystemExit(f"unknown actor(s) {', '.join(unknown)}; known: {', '.join(ACTORS)}")
        return out

    chosen = names(only) or list(ACTORS)
    chosen = [n for n in chosen if n not in names(without)]
    for name in chosen:
        if name not in available:
            warn(name)
    return [n for n in chosen if n in available]


def main(argv: list[str] | None = None) -> int:
    settings = config.parse(list(config.GROUPS), argv, prog="python supervisor.py",
                            description=__doc__.splitlines()[0])
    log = logs.configure("supervisor", json=settings.log_json, level=settings.log_level)
    actors = select(available_actors(), settings.only, settings.without,
                    lambda n: log.warning("actor_missing", process=n,
                                          hint=f"actors/{n}.py is not in this checkout"))
    try:
        supervisor = Supervisor(settings, actors)
        return asyncio.run(supervisor.run())
    except BusSecurityError as exc:
        print(f"supervisor: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
