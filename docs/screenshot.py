"""Screenshot of the Snakemake report in headless Chromium (Debian's `chromium`), opened on one
result category, through the DevTools protocol (websocket-client). Not a test dependency.

    python docs/screenshot.py results/report.html docs/report.png [--category Quality] [--item quality.tsv]
"""

from __future__ import annotations

import argparse
import base64
import json
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import websocket


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("report")
    ap.add_argument("png")
    ap.add_argument("--category", default="Quality")
    ap.add_argument("--item", default="")
    ap.add_argument("--port", type=int, default=9333)
    args = ap.parse_args()
    profile = tempfile.mkdtemp(prefix="chromium-")
    browser = subprocess.Popen(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                                f"--remote-debugging-port={args.port}", f"--user-data-dir={profile}",
                                "--window-size=1280,860", "about:blank"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                pages = json.load(urllib.request.urlopen(f"http://127.0.0.1:{args.port}/json"))
                break
            except OSError:
                time.sleep(0.2)
        page = next(p for p in pages if p["type"] == "page")
        ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=60)
        counter = iter(range(1, 10**6))

        def call(method, **params):
            i = next(counter)
            ws.send(json.dumps({"id": i, "method": method, "params": params}))
            while True:
                msg = json.loads(ws.recv())
                if msg.get("id") == i:
                    return msg.get("result", {})

        def click(text):
            # the report is a React page: click the innermost element showing `text`
            js = f"""(() => {{ const els = [...document.querySelectorAll('a,li,div,span,button,td')]
                .filter(e => e.textContent.trim() === {json.dumps(text)});
                if (!els.length) return false; els[els.length - 1].click(); return true; }})()"""
            return call("Runtime.evaluate", expression=js, returnByValue=True)["result"].get("value")

        call("Page.enable")
        call("Page.navigate", url=Path(args.report).resolve().as_uri())
        time.sleep(4)
        print("category:", click(args.category))
        time.sleep(2)
        if args.item:  # its "show" (eye) icon, the first icon in the item's row
            js = f"""(() => {{ const el = [...document.querySelectorAll('*')]
                .filter(e => e.children.length === 0 && e.textContent.trim() === {json.dumps(args.item)}).pop();
                if (!el) return 'no item'; let row = el;
                while (row && !row.querySelector('svg')) row = row.parentElement;
                if (!row) return 'no icon'; const icon = row.querySelector('svg');
                const target = icon.closest('a,button') || icon.parentElement;
                target.dispatchEvent(new MouseEvent('click', {{bubbles: true}})); return 'clicked ' + target.tagName; }})()"""
            print("item:", call("Runtime.evaluate", expression=js, returnByValue=True)["result"].get("value"))
            time.sleep(3)
        shot = call("Page.captureScreenshot", format="png")
        Path(args.png).write_bytes(base64.b64decode(shot["data"]))
        ws.close()
    finally:
        browser.terminate()
        browser.wait(timeout=20)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
