"""Real processes for tests: a broker on free ports, actor processes, and bus helpers."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path

from bus.client import BusClient, Endpoints
from bus.schema import CONTROL, Control, ControlKind, Message

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bus_env(endpoints: Endpoints, **extra: str) -> dict[str, str]:
    """Environment for a child process on this test's bus (and offline, like CI)."""
    env = dict(os.environ)
    env.update(
        PARLEY_BUS_PUB=endpoints.pub,
        PARLEY_BUS_SUB=endpoints.sub,
        PYTHONUNBUFFERED="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
    )
    env.update(extra)
    return env


class Proc:
    """A child process in its own process group, stopped (then killed) on exit."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.args = args
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 (closed in stop)
        self.popen = subprocess.Popen(args, cwd=ROOT, env=env, stdout=self._log,
                                      stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 8.0) -> int | None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(5)
        self._log.close()
        return self.popen.returncode


def start_broker(tmp: Path) -> tuple[Proc, Endpoints]:
    endpoints = Endpoints(pub=f"tcp://127.0.0.1:{free_port()}", sub=f"tcp://127.0.0.1:{free_port()}")
    proc = Proc([PYTHON, "-m", "bus.broker"], bus_env(endpoints), tmp / "broker.log")
    return proc, endpoints


@contextlib.asynccontextmanager
async def client(endpoints: Endpoints, topics: Iterable[str] = (), actor: str = "test",
                 timeout: float = 15.0) -> AsyncIterator[BusClient]:
    """A connected bus client (waits for the broker path to work)."""
    bus = BusClient(endpoints, actor, topics)
    try:
        await bus.wait_connected(timeout)
        yield bus
    finally:
        bus.close()


async def recv_until(bus: BusClient, predicate: Callable[[Message], bool],
                     timeout: float) -> Message:
    """The first message matching ``predicate``; ``TimeoutError`` after ``timeout`` seconds."""
    async with asyncio.timeout(timeout):
        while True:
            msg = await bus.recv()
            if predicate(msg):
                return msg


async def collect(bus: BusClient, predicate: Callable[[Message], bool],
                  duration: float) -> list[Message]:
    """Every matching message received during ``duration`` seconds."""
    out: list[Message] = []
    deadline = time.monotonic() + duration
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(duration):
            while time.monotonic() < deadline:
                msg = await bus.recv()
                if predicate(msg):
                    out.append(msg)
    return out


def is_ready(actor: str, instance: str | None = None) -> Callable[[Message], bool]:
    """Matches the readiness (or a heartbeat) of ``actor``, of one ``instance`` if given."""
    return lambda m: (isinstance(m, Control) and m.actor == actor
                      and (instance is None or m.instance == instance)
                      and m.kind in (ControlKind.READY, ControlKind.HEARTBEAT))


async def start_actor(tmp: Path, endpoints: Endpoints, name: str, *args: str,
                      env: dict[str, str] | None = None, timeout: float = 120.0,
                      log_name: str | None = None) -> Proc:
    """Start ``python -m actors.NAME`` and wait until this very process reports ready."""
    env = dict(env or {})
    instance = env.setdefault("PARLEY_INSTANCE", f"{name}-test-{free_port()}")
    if "--instance" in args:
        instance = args[args.index("--instance") + 1]
    async with client(endpoints, [CONTROL], actor="test-ready") as bus:
        proc = Proc([PYTHON, "-m", f"actors.{name}", *args], bus_env(endpoints, **env),
                    tmp / f"{log_name or name}.log")
        try:
            async with asyncio.timeout(timeout):
                while True:
                    recv = asyncio.ensure_future(recv_until(bus, is_ready(name, instance), timeout))
                    done, _ = await asyncio.wait({recv}, timeout=0.5)
                    if done:
                        recv.result()
                        return proc
                    recv.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await recv
                    if proc.popen.poll() is not None:
                        raise RuntimeError(f"actor {name} exited {proc.popen.returncode}:\n"
                                           f"{proc.output()[-3000:]}")
        except BaseException:
            proc.stop()
            raise
