"""Real headless Chromium for tests and benchmarks, driven over the DevTools protocol.

Chromium gets fake devices: the fake camera (640x480) and a WAV file as microphone, played once
(``%noloop``) from the moment the page opens the microphone. Pages are driven with raw CDP over
a WebSocket (aiohttp's client): navigate, evaluate JavaScript, wait for a condition, read
console errors, take screenshots. Everything lives in one temporary folder (profile, HOME, XDG
dirs) and every process started from it is stopped on exit, leftovers by PID.

Use inside one task: ``async with Chromium(tmp, mic=wav) as browser: page = await
browser.open(url)``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

CHROMIUM = Path(os.environ.get("PARLEY_CHROMIUM", "/usr/lib/chromium/chromium"))

FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--no-default-browser-check", "--disable-default-apps", "--disable-extensions",
    "--password-store=basic", "--mute-audio", "--autoplay-policy=no-user-gesture-required",
    "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
    "--allow-loopback-in-peer-connection", "--disable-features=WebRtcHideLocalIpsWithMdns",
    "--ignore-certificate-errors", "--remote-debugging-port=0",
    "--auto-select-desktop-capture-source=Entire screen",
)

PHONE = {"width": 390, "height": 844, "deviceScaleFactor": 2, "mobile": True}
DESKTOP = {"width": 1280, "height": 800, "deviceScaleFactor": 1, "mobile": False}


class BrowserError(RuntimeError):
    """Chromium did not start, a CDP call failed, or page JavaScript threw."""


def available() -> bool:
    return CHROMIUM.exists()


class Page:
    """One tab: CDP commands, JavaScript evaluation, console errors."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, target_id: str) -> None:
        self.ws = ws
        self.target_id = target_id
        self.console_errors: list[str] = []
        self.console: list[str] = []
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}

    async def read_loop(self) -> None:
        """Dispatch CDP replies and events until the socket closes."""
        try:
            async for frame in self.ws:
                if frame.type != aiohttp.WSMsgType.TEXT:
                    continue
                data = json.loads(frame.data)
                if "id" in data:
                    fut = self._pending.pop(data["id"], None)
                    if fut is not None and not fut.done():
                        fut.set_result(data)
                else:
                    self._event(data.get("method", ""), data.get("params", {}))
        finally:
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(BrowserError("the page's DevTools connection closed"))
            self._pending.clear()

    def _event(self, method: str, params: dict[str, Any]) -> None:
        if method == "Runtime.consoleAPICalled":
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in params["args"])
            self.console.append(f"{params['type']}: {text}")
            if params["type"] == "error":
                self.console_errors.append(text)
        elif method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            exc = details.get("exception", {})
            self.console_errors.append(exc.get("description") or details.get("text", "exception"))
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
            entry = params["entry"]
            self.console_errors.append(f"{entry.get('source')}: {entry.get('text')} "
                                       f"{entry.get('url', '')}".strip())

    async def send(self, method: str, timeout: float = 15.0, **params: Any) -> dict[str, Any]:
        """One CDP command; its result, or :class:`BrowserError`."""
        msg_id = next(self._ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = fut
        await self.ws.send_str(json.dumps({"id": msg_id, "method": method, "params": params}))
        try:
            async with asyncio.timeout(timeout):
                reply = await fut
        finally:
            self._pending.pop(msg_id, None)
        if "error" in reply:
            raise BrowserError(f"{method}: {reply['error'].get('message')}")
        return reply.get("result", {})

    async def evaluate(self, expression: str, *, await_promise: bool = True,
                       user_gesture: bool = False, timeout: float = 15.0) -> Any:
        """The JSON value of ``expression`` in the page (promises awaited)."""
        result = await self.send("Runtime.evaluate", timeout=timeout, expression=expression,
                                 returnByValue=True, awaitPromise=await_promise,
                                 userGesture=user_gesture)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise BrowserError(f"JavaScript error in {expression[:80]!r}: {text}")
        return result.get("result", {}).get("value")

    async def wait_for(self, expression: str, timeout: float, interval: float = 0.05,
                       what: str = "") -> Any:
        """Poll ``expression`` until it is truthy; its value, or ``TimeoutError`` naming it."""
        deadline = time.monotonic() + timeout
        while True:
            value = await self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                state = await self.evaluate("window.parley ? parley.stateText : document.title")
                raise TimeoutError(f"waited {timeout:.0f} s for {what or expression!r} "
                                   f"(page: {state!r}; errors: {self.console_errors[-3:]})")
            await asyncio.sleep(interval)

    async def key(self, key: str, code: str, key_code: int, *, down: bool) -> None:
        """A real key press or release, as the keyboard would send it (e.g. " ", "Space", 32)."""
        await self.send("Input.dispatchKeyEvent", type="keyDown" if down else "keyUp", key=key,
                        code=code, windowsVirtualKeyCode=key_code, nativeVirtualKeyCode=key_code)

    async def navigate(self, url: str, timeout: float = 15.0) -> None:
        await self.send("Page.navigate", url=url)
        await self.wait_for("document.readyState === 'complete'", timeout, what="page load")

    async def screenshot(self, path: Path, viewport: dict[str, Any] | None = None) -> Path:
        """Save a PNG of the page, optionally at a given viewport (see PHONE, DESKTOP)."""
        if viewport is not None:
            await self.send("Emulation.setDeviceMetricsOverride", **viewport)
            await asyncio.sleep(0.3)  # let layout and transitions settle
        shot = await self.send("Page.captureScreenshot", format="png")
        path.write_bytes(base64.b64decode(shot["data"]))
        return path


class Chromium:
    """A headless Chromium process with fake camera and a WAV microphone."""

    def __init__(self, tmp: Path | None = None, *, mic: Path | None = None,
                 extra_flags: tuple[str, ...] = (), nice: int = 0) -> None:
        self.mic = mic
        self.nice = nice  # CPU niceness of Chromium and every process it starts
        self.extra_flags = extra_flags
        self._own_tmp = tmp is None
        self.tmp = Path(tempfile.mkdtemp(prefix="parley-chromium-", dir=tmp))
        self.proc: subprocess.Popen[bytes] | None = None
        self.http: aiohttp.ClientSession | None = None
        self.port = 0
        self.pages: list[Page] = []
        self._stack = contextlib.AsyncExitStack()
        self._tg: asyncio.TaskGroup | None = None

    async def __aenter__(self) -> Chromium:
        if not available():
            raise BrowserError(f"Chromium not found at {CHROMIUM} (apt-get install chromium)")
        try:
            await self._start()
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        return self

    async def _start(self) -> None:
        profile = self.tmp / "profile"
        profile.mkdir(parents=True, exist_ok=True)
        home = self.tmp / "home"
        env = dict(os.environ, HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"),
                   XDG_CACHE_HOME=str(home / ".cache"))
        args = [str(CHROMIUM), *FLAGS, f"--user-data-dir={profile}", *self.extra_flags]
        if self.mic is not None:
            args.append(f"--use-file-for-fake-audio-capture={self.mic.resolve()}%noloop")
        args.append("about:blank")
        self._log = open(self.tmp / "chromium.log", "wb")  # noqa: SIM115 (closed on exit)
        if self.nice:
            args = ["nice", "-n", str(self.nice), *args]
        self.proc = subprocess.Popen(args, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text().count("\n") >= 1):
            if self.proc.poll() is not None:
                raise BrowserError(f"Chromium exited {self.proc.returncode}: {self.log()[-2000:]}")
            if time.monotonic() > deadline:
                raise BrowserError("Chromium did not open its DevTools port within 30 s")
            await asyncio.sleep(0.05)
        self.port = int(port_file.read_text().split("\n")[0])
        self.http = await self._stack.enter_async_context(aiohttp.ClientSession())
        self._tg = await self._stack.enter_async_context(asyncio.TaskGroup())

    def log(self) -> str:
        path = self.tmp / "chromium.log"
        return path.read_text(errors="replace") if path.exists() else ""

    async def open(self, url: str, timeout: float = 20.0) -> Page:
        """A new tab at ``url``, loaded, with console and errors being collected."""
        assert self.http is not None and self._tg is not None
        base = f"http://127.0.0.1:{self.port}"
        async with self.http.put(f"{base}/json/new?about:blank") as resp:
            target = await resp.json()
        ws = await self.http.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0)
        page = Page(ws, target["id"])
        self.pages.append(page)
        self._tg.create_task(page.read_loop())
        for domain in ("Page", "Runtime", "Log"):
            await page.send(f"{domain}.enable")
        await page.navigate(url, timeout)
        return page

    async def close_page(self, page: Page) -> None:
        """Close a tab as a user would (its WebSocket and peer connection go with it)."""
        assert self.http is not None
        async with self.http.get(f"http://127.0.0.1:{self.port}/json/close/{page.target_id}"):
            pass
        with contextlib.suppress(Exception):
            await page.ws.close()
        self.pages.remove(page)

    async def __aexit__(self, *exc: object) -> None:
        for page in self.pages:
            with contextlib.suppress(Exception):
                await page.ws.close()
        self.pages.clear()
        try:
            await self._stack.aclose()
        finally:
            await asyncio.to_thread(self._stop)

    def _stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        _kill_leftovers(str(self.tmp))
        if hasattr(self, "_log"):
            self._log.close()
        if self._own_tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)


def _kill_leftovers(marker: str) -> None:
    """Kill processes whose command line names our temp folder (crashpad leaves the group)."""
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(int(entry.name), signal.SIGKILL)
