"""Headless Chromium driven over the DevTools protocol, with aiohttp's websocket client.

`Browser.open()` starts Debian's `chromium` on its own temporary profile with
`--remote-debugging-port=0`, reads the port it chose from DevToolsActivePort,
and attaches to its one page. Every console error, uncaught exception and
error-level log entry the page produces is collected in `problems`. Every wait
is bounded; `close()` kills the whole process group whatever happened.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import attrs

from tests.support.waiting import until

CHROMIUM = "/usr/bin/chromium"
START_TIMEOUT_S = 30.0
CALL_TIMEOUT_S = 30.0


def missing() -> str | None:
    """Why the browser tests cannot run here (None: they can)."""
    if not (os.path.exists(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        return f"no headless Chromium at {CHROMIUM} (Debian package `chromium`; make sysdeps)"
    return None


@attrs.define(eq=False)
class Browser:
    process: asyncio.subprocess.Process
    profile: Path
    session: aiohttp.ClientSession
    ws: aiohttp.ClientWebSocketResponse
    problems: list[str] = attrs.Factory(list)
    events: list[dict[str, Any]] = attrs.Factory(list)
    _next_id: int = 0
    _pending: dict[int, asyncio.Future[dict[str, Any]]] = attrs.Factory(dict)
    _reader: asyncio.Task[None] | None = None

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, *, width: int = 1400, height: int = 1100) -> AsyncIterator[Browser]:
        profile = Path(tempfile.mkdtemp(prefix="cortex-chromium-"))
        argv = [
            CHROMIUM,
            "--headless=new",
            "--remote-debugging-port=0",
            "--remote-debugging-address=127.0.0.1",
            f"--user-data-dir={profile}",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-gpu",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--password-store=basic",
            "--use-mock-keychain",
            f"--window-size={width},{height}",
            "about:blank",
        ]
        if os.geteuid() == 0:
            argv.insert(1, "--no-sandbox")  # Chromium refuses to run as root with it
        with (profile / "stderr.log").open("wb") as stderr:
            process = await asyncio.create_subprocess_exec(
                *argv,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                start_new_session=True,  # its own group: the end kills renderers and zygotes too
            )
        session = aiohttp.ClientSession()
        browser: Browser | None = None
        try:
            port = await _active_port(profile, process)
            ws_url = await _page_target(session, port)
            ws = await session.ws_connect(ws_url, max_msg_size=0)
            browser = cls(process=process, profile=profile, session=session, ws=ws)
            browser._reader = asyncio.create_task(browser._read(), name="cdp reader")
            await browser.call("Runtime.enable")
            await browser.call("Log.enable")
            await browser.call("Page.enable")
            await browser.call(
                "Emulation.setDeviceMetricsOverride",
                {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
            )
            yield browser
        finally:
            if browser is not None:
                await browser._stop_reading()
            await session.close()
            await _kill(process)
            shutil.rmtree(profile, ignore_errors=True)

    # -- protocol -------------------------------------------------------------------

    async def call(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        self._next_id += 1
        mid = self._next_id
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[mid] = fut
        await self.ws.send_str(json.dumps({"id": mid, "method": method, "params": params or {}}))
        try:
            answer = await asyncio.wait_for(fut, CALL_TIMEOUT_S)
        finally:
            self._pending.pop(mid, None)
        if "error" in answer:
            raise AssertionError(f"{method}: {answer['error']}")
        result: dict[str, Any] = answer.get("result", {})
        return result

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                break
            data = json.loads(msg.data)
            if "id" in data:
                fut = self._pending.get(data["id"])
                if fut is not None and not fut.done():
                    fut.set_result(data)
                continue
            self.events.append(data)
            problem = _problem(data)
            if problem is not None:
                self.problems.append(problem)
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(ConnectionError("DevTools connection closed"))

    async def _stop_reading(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ws.close(), 5)
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(BaseException):
                await self._reader

    # -- page -----------------------------------------------------------------------

    async def goto(self, url: str) -> None:
        loaded = len(self.events)
        await self.call("Page.navigate", {"url": url})
        await until(
            lambda: any(e.get("method") == "Page.loadEventFired" for e in self.events[loaded:]),
            timeout=30.0,
            interval=0.05,
            what=f"{url} to load",
        )

    async def js(self, expression: str) -> Any:
        """The value of `expression` in the page (awaited if it is a promise)."""
        answer = await self.call(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
        )
        if "exceptionDetails" in answer:
            raise AssertionError(f"{expression!r} threw: {answer['exceptionDetails']}")
        return answer["result"].get("value")

    async def wait_js(self, expression: str, *, within_s: float = 30.0, what: str = "") -> Any:
        """Poll `expression` until it is truthy; its value."""
        return await until(
            lambda: self.js(expression),
            timeout=within_s,
            interval=0.1,
            what=what or expression,
        )

    async def type_into(self, selector: str, text: str) -> None:
        """Focus the element and type as a keyboard would (Input.insertText)."""
        await self.js(f"document.querySelector({json.dumps(selector)}).focus()")
        await self.call("Input.insertText", {"text": text})

    async def click(self, selector: str) -> None:
        """A real mouse click at the element's centre (scrolled into view first)."""
        box = await self.js(
            f"""(() => {{
              const e = document.querySelector({json.dumps(selector)});
              if (!e) return null;
              e.scrollIntoView({{block: "center"}});
              const r = e.getBoundingClientRect();
              return [r.left + r.width / 2, r.top + r.height / 2];
            }})()"""
        )
        if box is None:
            raise AssertionError(f"nothing matches {selector!r} to click")
        x, y = box
        for kind in ("mousePressed", "mouseReleased"):
            await self.call(
                "Input.dispatchMouseEvent",
                {"type": kind, "x": x, "y": y, "button": "left", "clickCount": 1},
            )

    async def screenshot(self, path: Path) -> bytes:
        shot = await self.call("Page.captureScreenshot", {"format": "png"})
        data = base64.b64decode(shot["data"])
        path.write_bytes(data)  # noqa: ASYNC240 (a small file, once)
        return data


def _problem(event: dict[str, Any]) -> str | None:
    """A console error, an uncaught exception or an error-level log entry, as a line."""
    method, params = event.get("method"), event.get("params", {})
    if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
        args = [str(a.get("value", a.get("description", ""))) for a in params.get("args", ())]
        return "console.error: " + " ".join(args)
    if method == "Runtime.exceptionThrown":
        d = params.get("exceptionDetails", {})
        return "exception: " + str(d.get("exception", {}).get("description") or d.get("text"))
    if method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
        e = params["entry"]
        return f"log ({e.get('source')}): {e.get('text')} {e.get('url', '')}".strip()
    return None


async def _active_port(profile: Path, process: asyncio.subprocess.Process) -> int:
    """The port Chromium chose: the first line of DevToolsActivePort, once written."""
    path = profile / "DevToolsActivePort"
    deadline = asyncio.get_running_loop().time() + START_TIMEOUT_S
    while True:
        if process.returncode is not None:
            err = (profile / "stderr.log").read_text(errors="replace")[-2000:]
            raise AssertionError(f"chromium exited with {process.returncode}:\n{err}")
        with contextlib.suppress(OSError, ValueError, IndexError):
            return int(path.read_text().splitlines()[0])
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"chromium wrote no DevToolsActivePort in {START_TIMEOUT_S} s")
        await asyncio.sleep(0.05)


async def _page_target(session: aiohttp.ClientSession, port: int) -> str:
    async def targets() -> list[dict[str, Any]]:
        url = f"http://127.0.0.1:{port}/json/list"
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=5)) as r:
            found: list[dict[str, Any]] = await r.json(content_type=None)
            return found

    found = await _eventually(targets, lambda ts: any(t.get("type") == "page" for t in ts))
    return str(next(t for t in found if t.get("type") == "page")["webSocketDebuggerUrl"])


async def _eventually(
    get: Callable[[], Awaitable[list[dict[str, Any]]]],
    ok: Callable[[list[dict[str, Any]]], bool],
) -> list[dict[str, Any]]:
    deadline = asyncio.get_running_loop().time() + START_TIMEOUT_S
    while True:
        with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
            value = await get()
            if ok(value):
                return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("chromium listed no page target")
        await asyncio.sleep(0.1)


async def _kill(process: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(process.wait(), 10)
