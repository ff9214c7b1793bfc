"""Headless Chromium over the DevTools protocol (aiohttp's websocket client): open a page, collect console
errors and network requests, evaluate JavaScript, take element screenshots. A plain helper module."""
from __future__ import annotations

import asyncio
import base64
import itertools
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
MISSING = ("no headless Chromium on this machine: install Debian's `chromium` package (the README's test "
           "command does `apt-get install chromium` when apt-get is available and it is missing)")


def find_chromium() -> str | None:
    return next((p for p in map(shutil.which, CHROMIUM_NAMES) if p), None)


class Page:
    """One Chromium tab; every console error, uncaught exception and non-file request is recorded."""

    def __init__(self, ws, loop):
        self.ws, self.loop = ws, loop
        self.ids = itertools.count(1)
        self.pending: dict[int, asyncio.Future] = {}
        self.events: list[dict] = []
        self.console_errors: list[str] = []
        self.requests: list[str] = []

    async def _reader(self):
        async for msg in self.ws:
            data = json.loads(msg.data)
            if "id" in data and data["id"] in self.pending:
                self.pending.pop(data["id"]).set_result(data)
                continue
            method, params = data.get("method"), data.get("params", {})
            self.events.append(data)
            if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                self.console_errors.append(" ".join(str(a.get("value", a.get("description"))) for a in params["args"]))
            elif method == "Runtime.exceptionThrown":
                self.console_errors.append(json.dumps(params["exceptionDetails"])[:500])
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                self.console_errors.append(params["entry"].get("text", ""))
            elif method == "Network.requestWillBeSent":
                self.requests.append(params["request"]["url"])

    async def send(self, method: str, **params) -> dict:
        i = next(self.ids)
        fut = self.loop.create_future()
        self.pending[i] = fut
        await self.ws.send_str(json.dumps({"id": i, "method": method, "params": params}))
        reply = await asyncio.wait_for(fut, 30)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply["result"]

    async def evaluate(self, expression: str):
        res = await self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in res:
            raise RuntimeError(f"{expression!r}: {res['exceptionDetails']}")
        return res["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = 20.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if await self.evaluate(expression):
                return
            await asyncio.sleep(0.1)
        raise TimeoutError(expression)

    async def screenshot(self, rect: dict) -> bytes:
        """PNG of a page region (CSS pixels, device scale 1)."""
        res = await self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True,
                              clip={"x": rect["x"], "y": rect["y"], "width": rect["width"],
                                    "height": rect["height"], "scale": 1})
        return base64.b64decode(res["data"])


async def _session(url: str, script, chromium: str, width: int, height: int):
    import aiohttp

    profile = tempfile.mkdtemp(prefix="framescribe-chromium-")
    proc = subprocess.Popen([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                             "--disable-extensions", "--disable-background-networking", "--hide-scrollbars",
                             f"--user-data-dir={profile}", "--remote-debugging-port=0",
                             f"--window-size={width},{height}", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port_file = Path(profile) / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text().strip()):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"chromium did not start (exit {proc.poll()})")
            await asyncio.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/json/list") as r:
                target = next(t for t in await r.json() if t["type"] == "page")
            async with http.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                page = Page(ws, asyncio.get_running_loop())
                reader = asyncio.create_task(page._reader())
                for domain in ("Runtime", "Log", "Page", "Network"):
                    await page.send(f"{domain}.enable")
                await page.send("Emulation.setDeviceMetricsOverride", width=width, height=height,
                                deviceScaleFactor=1, mobile=False)
                await page.send("Page.navigate", url=url)
                await page.wait_for("document.readyState === 'complete'")
                try:
                    return await script(page)
                finally:
                    reader.cancel()
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(profile, ignore_errors=True)


def open_page(url: str, script, *, chromium: str, width: int = 1600, height: int = 1200):
    """Run `async script(page)` on `url` in a fresh headless Chromium; returns what it returns."""
    return asyncio.run(_session(url, script, chromium, width, height))
