"""Screenshot a page in headless Chromium after it has had time to render: pages that draw
after fetching data (the MLflow UI's charts) are still blank when `chromium --screenshot`
returns. Drives Chromium through its DevTools protocol (the `websockets` package, which
Prefect and MLflow already install).

    python scripts/screenshot.py URL OUT.png [--size 1400,1000] [--wait 8]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request

from websockets.sync.client import connect


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("out")
    parser.add_argument("--size", default="1400,1000", help="window WIDTH,HEIGHT")
    parser.add_argument("--wait", type=float, default=8.0, help="seconds to let it render")
    args = parser.parse_args()
    chrome = (os.environ.get("CHROME") or shutil.which("chromium")
              or shutil.which("chromium-browser") or shutil.which("google-chrome"))
    if chrome is None:
        raise SystemExit("error: no Chromium found; install it (Debian: apt-get install "
                         "chromium) or set CHROME to its path")
    port = free_port()
    width, height = (int(v) for v in args.size.split(","))
    with tempfile.TemporaryDirectory() as profile:
        browser = subprocess.Popen(
            [chrome, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             f"--remote-debugging-port={port}", "--remote-debugging-address=127.0.0.1",
             f"--user-data-dir={profile}", f"--window-size={width},{height}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            for _ in range(100):
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list") as r:
                        pages = [t for t in json.load(r) if t["type"] == "page"]
                    if pages:
                        break
                except OSError:
                    pass
                time.sleep(0.1)
            with connect(pages[0]["webSocketDebuggerUrl"], max_size=None) as ws:
                ids = iter(range(1, 1000))

                def call(method: str, **params) -> dict:
                    ident = next(ids)
                    ws.send(json.dumps({"id": ident, "method": method, "params": params}))
                    while True:
                        reply = json.loads(ws.recv())
                        if reply.get("id") == ident:
                            return reply.get("result", {})

                call("Emulation.setDeviceMetricsOverride", width=width, height=height,
                     deviceScaleFactor=1, mobile=False)
                call("Page.navigate", url=args.url)
                time.sleep(args.wait)
                shot = call("Page.captureScreenshot", format="png")
            with open(args.out, "wb") as f:
                f.write(base64.b64decode(shot["data"]))
        finally:
            browser.terminate()
            browser.wait(timeout=10)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
