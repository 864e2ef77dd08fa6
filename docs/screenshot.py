"""Screenshot of the Snakemake report in headless Chromium (Debian's `chromium`), through the
DevTools protocol (websocket-client): by default its landing page (the run's summary tables),
or one result category. Also the browser the report test drives (tests/test_report.py).

    python docs/screenshot.py results/report.html docs/report.png [--category Quality] [--item quality.tsv]

Current Chromium refuses DevTools websocket connections from other origins (HTTP 403) unless
started with --remote-allow-origins."""

from __future__ import annotations

import argparse
import base64
import json
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import websocket


def chromium() -> str | None:
    """The Chromium executable, or None."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Browser:
    """Headless Chromium with one page, driven over the DevTools protocol."""

    def __init__(self, width: int = 1280, height: int = 860):
        exe = chromium()
        if exe is None:
            raise FileNotFoundError("chromium is not installed (Debian: apt-get install chromium)")
        self.port = _free_port()
        self.profile = tempfile.mkdtemp(prefix="chromium-")
        self.process = subprocess.Popen(
            [exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--remote-allow-origins=*",
             f"--remote-debugging-port={self.port}", f"--user-data-dir={self.profile}",
             f"--window-size={width},{height}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._ids = iter(range(1, 10**9))
        self.ws = websocket.create_connection(self._page_socket(), timeout=60)
        self.call("Page.enable")
        self.call("Runtime.enable")

    def _page_socket(self) -> str:
        deadline = time.time() + 30
        while True:
            try:
                pages = json.load(urllib.request.urlopen(f"http://127.0.0.1:{self.port}/json"))
                return next(p for p in pages if p["type"] == "page")["webSocketDebuggerUrl"]
            except (OSError, StopIteration, ValueError):
                if time.time() > deadline or self.process.poll() is not None:
                    raise RuntimeError("chromium's DevTools endpoint did not come up") from None
                time.sleep(0.2)

    def call(self, method: str, **params) -> dict:
        i = next(self._ids)
        self.ws.send(json.dumps({"id": i, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == i:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return result.get("result", {}).get("value")

    def open(self, path: str | Path, settle_s: float = 3.0) -> None:
        self.call("Page.navigate", url=Path(path).resolve().as_uri())
        deadline = time.time() + 60
        while self.evaluate("document.readyState") != "complete" and time.time() < deadline:
            time.sleep(0.2)
        time.sleep(settle_s)  # the report is a React page: let it render

    def click_text(self, text: str) -> bool:
        """Click the innermost element showing exactly `text`."""
        js = f"""(() => {{ const els = [...document.querySelectorAll('a,li,div,span,button,td')]
            .filter(e => e.textContent.trim() === {json.dumps(text)});
            if (!els.length) return false; els[els.length - 1].click(); return true; }})()"""
        return bool(self.evaluate(js))

    def screenshot(self, png: str | Path, full_page: bool = False) -> Path:
        params = {"format": "png"}
        if full_page:
            metrics = self.call("Page.getLayoutMetrics")["cssContentSize"]
            params.update(captureBeyondViewport=True,
                          clip={"x": 0, "y": 0, "width": metrics["width"], "height": metrics["height"], "scale": 1})
        Path(png).write_bytes(base64.b64decode(self.call("Page.captureScreenshot", **params)["data"]))
        return Path(png)

    def close(self) -> None:
        try:
            self.ws.close()
        finally:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
            shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> "Browser":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("report")
    ap.add_argument("png")
    ap.add_argument("--category", default="", help="a result category to open (default: the landing page)")
    ap.add_argument("--item", default="", help="a result of that category to show")
    ap.add_argument("--full-page", action="store_true", help="the whole page, not the window")
    ap.add_argument("--height", type=int, default=860)
    args = ap.parse_args()
    with Browser(height=args.height) as browser:
        browser.open(args.report)
        if args.category:
            print("category:", browser.click_text(args.category))
            time.sleep(2)
        if args.item:  # its "show" (eye) icon, the first icon in the item's row
            js = f"""(() => {{ const el = [...document.querySelectorAll('*')]
                .filter(e => e.children.length === 0 && e.textContent.trim() === {json.dumps(args.item)}).pop();
                if (!el) return 'no item'; let row = el;
                while (row && !row.querySelector('svg')) row = row.parentElement;
                if (!row) return 'no icon'; const icon = row.querySelector('svg');
                const target = icon.closest('a,button') || icon.parentElement;
                target.dispatchEvent(new MouseEvent('click', {{bubbles: true}})); return 'clicked ' + target.tagName; }})()"""
            print("item:", browser.evaluate(js))
            time.sleep(3)
        browser.screenshot(args.png, full_page=args.full_page)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
