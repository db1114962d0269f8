"""Run a blocking producer in a worker thread and receive its items on the event loop.

The synthesiser (ONNX inference, resampling, Opus encoding) blocks for tens of milliseconds at a
time, so it runs in a thread; each item it produces is handed to the loop at once, so a packet
can leave while the next is being made. A bounded window gives back-pressure: the thread waits
when the loop has not taken its items yet. Cancelling the awaiting task sets the stop flag,
which the producer sees at its next item or check.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")
Put = Callable[[Any], None]

_ITEM, _DONE, _ERROR = range(3)
_POLL_S = 0.05


class Stopped(Exception):
    """Raised inside the producer thread by ``put`` once the consumer is gone."""


async def run_in_thread(produce: Callable[[Put, threading.Event], None],
                        emit: Callable[[T], Awaitable[None]], *, window: int = 25) -> None:
    """Call ``produce(put, stop)`` in a thread and ``await emit(item)`` for each item it puts.

    ``put`` blocks while ``window`` items wait on the loop and raises :class:`Stopped` after the
    consumer has been cancelled; ``stop`` may also be polled between slow steps. An exception
    in the producer is raised here.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
    stop = threading.Event()
    slots = threading.Semaphore(window)

    def send(kind: int, item: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening
            loop.call_soon_threadsafe(queue.put_nowait, (kind, item))

    def put(item: Any) -> None:
        while not slots.acquire(timeout=_POLL_S):
            if stop.is_set():
                raise Stopped
        if stop.is_set():
            raise Stopped
        send(_ITEM, item)

    def work() -> None:
        try:
            produce(put, stop)
        except Stopped:
            return
        except Exception as exc:
            send(_ERROR, exc)
            return
        send(_DONE, None)

    error: BaseException | None = None
    async with asyncio.TaskGroup() as tg:
        tg.create_task(asyncio.to_thread(work))
        try:
            while True:
                kind, item = await queue.get()
                if kind == _DONE:
                    break
                if kind == _ERROR:
                    error = item
                    break
                slots.release()
                await emit(item)
        finally:
            stop.set()
    if error is not None:
        raise error
