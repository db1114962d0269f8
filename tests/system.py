"""The whole system for tests and benchmarks: ``python supervisor.py`` on its own ports."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
from pathlib import Path

from bus.client import Endpoints
from tests import harness

READY_LINE = "Parley is ready"


class SupervisorRun:
    """``python supervisor.py`` on its own broker and page ports, output collected as it comes."""

    def __init__(self, tmp: Path, *args: str) -> None:
        self.endpoints = Endpoints(pub=f"tcp://127.0.0.1:{harness.free_port()}",
                                   sub=f"tcp://127.0.0.1:{harness.free_port()}")
        self.port = harness.free_port()
        self.args = ["--bus-pub", self.endpoints.pub, "--bus-sub", self.endpoints.sub,
                     "--port", str(self.port), *args]
        self.log_path = tmp / "supervisor.log"
        self.proc: asyncio.subprocess.Process | None = None
        self.stdout = ""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    async def start(self) -> None:
        self.log = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop)
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "supervisor.py", *self.args, cwd=harness.ROOT,
            env=harness.bus_env(self.endpoints), stdout=asyncio.subprocess.PIPE,
            stderr=self.log)

    async def wait_for_stdout(self, text: str, timeout: float) -> str:
        assert self.proc is not None and self.proc.stdout is not None
        async with asyncio.timeout(timeout):
            while text not in self.stdout:
                line = await self.proc.stdout.readline()
                if not line:
                    raise AssertionError(f"supervisor exited before {text!r}:\n{self.output()[-5000:]}")
                self.stdout += line.decode()
        return self.stdout

    async def __aenter__(self) -> SupervisorRun:
        await self.start()
        try:
            await self.wait_for_stdout(READY_LINE, 300)
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def output(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return self.log_path.read_text(errors="replace")

    def pids(self, process: str) -> list[int]:
        return [int(m.group(1)) for m in re.finditer(
            rf"process_started .*pid=(\d+) process={process}\b", self.output())]

    async def stop(self) -> int:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                await asyncio.wait_for(self.proc.wait(), 20)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        self.log.close()
        return self.proc.returncode


def alive(pid: int) -> bool:
    """True for a running (not zombie) process."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(FileNotFoundError):
        return "Z" not in Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    return False
