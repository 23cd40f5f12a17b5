"""A headless Chromium driven over the DevTools protocol, for tests of static pages.

``Browser.open(url)`` loads a page and collects what its console reports (exceptions, console
errors, log entries such as a refused resource); ``evaluate`` runs JavaScript in it;
``screenshot`` returns PNG bytes. The browser runs with a fresh profile and every background
feature that would reach the network turned off. Needs Debian's ``chromium`` and the
``websocket-client`` package; :func:`chromium` says why not when they are missing.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import tempfile
import time

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-extensions", "--disable-default-apps", "--window-size=1280,900")


def chromium() -> tuple[str | None, str]:
    """(path of the chromium executable or None, why not)."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        return None, "chromium is not installed (apt-get install chromium)"
    try:
        import websocket  # noqa: F401
    except ImportError:
        return None, "the websocket-client package is not installed"
    return exe, ""


class Browser:
    def __init__(self, exe: str, timeout_s: float = 30.0):
        import websocket

        self.timeout_s = timeout_s
        self.profile = tempfile.mkdtemp(prefix="wsiproto-chromium-")
        self.proc = subprocess.Popen(
            [exe, *FLAGS, f"--user-data-dir={self.profile}", "--remote-debugging-port=0",
             "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self._ids = 0
        self.events: list[dict] = []
        self.ws = websocket.create_connection(self._page_socket(), timeout=timeout_s)
        for domain in ("Page", "Runtime", "Log"):
            self.call(f"{domain}.enable")

    def _page_socket(self) -> str:
        """The DevTools websocket of the blank page, from the port chromium reports."""
        import urllib.request

        deadline = time.monotonic() + self.timeout_s
        port = None
        while port is None and time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            m = re.search(r"DevTools listening on ws://[^:]+:(\d+)/", line)
            if m:
                port = int(m.group(1))
            elif not line and self.proc.poll() is not None:
                raise RuntimeError(f"chromium exited with code {self.proc.returncode}")
        if port is None:
            raise RuntimeError("chromium did not report its DevTools port")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            targets = json.load(r)
        return next(t["webSocketDebuggerUrl"] for t in targets if t.get("type") == "page")

    def call(self, method: str, **params) -> dict:
        self._ids += 1
        me = self._ids
        self.ws.send(json.dumps({"id": me, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == me:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            if "method" in msg:
                self.events.append(msg)

    def _wait_for(self, method: str) -> dict:
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            for i, event in enumerate(self.events):
                if event["method"] == method:
                    return self.events.pop(i)
            msg = json.loads(self.ws.recv())
            if "method" in msg:
                self.events.append(msg)
        raise TimeoutError(method)

    def open(self, url: str) -> None:
        self.events.clear()
        self.call("Page.navigate", url=url)
        self._wait_for("Page.loadEventFired")
        self.evaluate("1")  # let the page's own scripts' messages arrive first

    def problems(self) -> list[str]:
        """Exceptions, console errors and warnings, error log entries seen since ``open``."""
        out = []
        for event in self.events:
            method, p = event["method"], event.get("params", {})
            if method == "Runtime.exceptionThrown":
                details = p["exceptionDetails"]
                out.append(details.get("exception", {}).get("description")
                           or details.get("text", "exception"))
            elif method == "Runtime.consoleAPICalled" and p.get("type") in ("error", "warning",
                                                                            "assert"):
                out.append(" ".join(str(a.get("value", a.get("description"))) for a in p["args"]))
            elif method == "Log.entryAdded" and p["entry"]["level"] in ("error", "warning"):
                out.append(p["entry"]["text"])
        return out

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(result["exceptionDetails"].get("text"))
        return result["result"].get("value")

    def screenshot(self) -> bytes:
        return base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])

    def close(self) -> None:
        try:
            self.ws.close()
        finally:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def file_url(path: str | os.PathLike) -> str:
    from pathlib import Path

    return Path(path).absolute().as_uri()
