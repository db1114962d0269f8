"""Shared fixtures: a real broker per test, and a factory for real actor processes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from bus.client import Endpoints
from tests import harness


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Endpoints]:
    """A broker process on free loopback ports, for this test alone."""
    proc, endpoints = harness.start_broker(tmp_path)
    try:
        yield endpoints
    finally:
        proc.stop()


@pytest.fixture
async def actors(tmp_path: Path, broker: Endpoints) -> AsyncIterator[object]:
    """``await actors.start("asr", "--asr-model", "tiny.en")`` starts a ready actor process."""

    class _Actors:
        procs: list[harness.Proc] = []  # noqa: RUF012 (one instance per test)

        async def start(self, name: str, *args: str, env: dict[str, str] | None = None,
                        timeout: float = 120.0, log_name: str | None = None) -> harness.Proc:
            proc = await harness.start_actor(tmp_path, broker, name, *args, env=env,
                                             timeout=timeout, log_name=log_name)
            self.procs.append(proc)
            return proc

    started = _Actors()
    started.procs = []
    try:
        yield started
    finally:
        await asyncio.gather(*(asyncio.to_thread(p.stop) for p in started.procs))
