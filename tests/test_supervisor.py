"""The supervisor with real actor processes: readiness, restart after kill -9, crash loops,
and a Ctrl-C that leaves no process behind."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from bus.schema import CONTROL, TRANSCRIPT, Control, ControlKind, Transcript, Utterance
from core import config
from tests import harness, speech
from tests.system import READY_LINE, SupervisorRun, alive


def processes_mentioning(marker: str) -> list[int]:
    """PIDs whose command line or environment names ``marker`` (our unique bus port)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            blob = (entry / "cmdline").read_bytes() + (entry / "environ").read_bytes()
            if marker.encode() in blob and alive(int(entry.name)):
                found.append(int(entry.name))
    return found


def test_help_documents_every_flag_with_its_environment_variable():
    out = subprocess.run([sys.executable, "supervisor.py", "--help"], cwd=harness.ROOT,
                         capture_output=True, text=True, check=True).stdout
    for group in config.GROUPS.values():
        for opt in group:
            assert opt.flag in out and opt.env_name in out, opt.flag


def test_unknown_actor_name_is_refused():
    result = subprocess.run([sys.executable, "supervisor.py", "--only", "asr,nope"],
                            cwd=harness.ROOT, capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert "unknown actor(s) nope" in result.stderr


async def test_killed_actor_is_restarted_and_serves_again(tmp_path):
    run = SupervisorRun(tmp_path, "--only", "asr")
    await run.start()
    try:
        await run.wait_for_stdout(READY_LINE, 120)
        [first] = run.pids("asr")
        async with harness.client(run.endpoints, [CONTROL, TRANSCRIPT]) as bus:
            os.kill(first, signal.SIGKILL)
            ready = await harness.recv_until(
                bus, lambda m: isinstance(m, Control) and m.kind == ControlKind.READY
                and m.actor == "asr", 90)
            assert ready.instance.endswith("-2")  # the second start of this actor
            pcm = speech.say("What is the capital of France?")
            pcm = (speech.silence(0.3).tobytes() + pcm.tobytes() + speech.silence(0.3).tobytes())
            bus.publish(Utterance(session="after-restart", turn=1, pcm=pcm))
            got = await harness.recv_until(bus, lambda m: isinstance(m, Transcript), 60)
            assert "france" in got.text.lower()
        assert "process_exited" in run.output() and "code=-9" in run.output()
        assert len(run.pids("asr")) == 2 and not alive(first)
    finally:
        await run.stop()


async def test_crash_loop_is_reported_and_not_retried_forever(tmp_path):
    run = SupervisorRun(tmp_path, "--only", "asr", "--asr-model", str(tmp_path / "no-such-model"))
    await run.start()
    assert run.proc is not None
    code = await asyncio.wait_for(run.proc.wait(), 150)
    out = run.output()
    assert code != 0
    assert "crash_loop" in out and "process=asr" in out
    assert "no-such-model" in out  # the actor's own explanation is shown with the report
    assert READY_LINE not in (await run.proc.stdout.read()).decode()  # type: ignore[union-attr]
    await run.stop()


@pytest.mark.slow
async def test_whole_system_starts_and_ctrl_c_leaves_no_process_behind(tmp_path):
    run = SupervisorRun(tmp_path)
    await run.start()
    try:
        out = await run.wait_for_stdout(READY_LINE, 240)
        assert "open http://127.0.0.1:" in out
        started = {name: run.pids(name) for name in ("broker", *_available())}
        assert all(len(p) == 1 for p in started.values()), started
    finally:
        code = await run.stop()
    assert code == 0, run.output()[-3000:]
    port = run.endpoints.pub.rsplit(":", 1)[1]
    await asyncio.sleep(0.5)
    leftovers = [pid for pids in started.values() for pid in pids if alive(pid)]
    assert leftovers == [] and processes_mentioning(f"127.0.0.1:{port}") == []
    assert "shutting_down" in run.output() and "stopped" in run.output()


def _available() -> list[str]:
    sys.path.insert(0, str(harness.ROOT))
    import supervisor

    return supervisor.available_actors()
