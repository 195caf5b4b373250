"""Make docs/serve.png, the README's picture of `clipsearch serve`: the page at a laptop's size over the offline
demo's store, searched for one of its scenes. Needs the demo (`clipsearch demo`), Playwright and Chromium.

    python docs/make_serve_png.py --demo clipsearch-demo --query "a large orange heart" --weak --hover 1
"""

from __future__ import annotations

import argparse
import io
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

from PIL import Image

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


def serve(db: Path) -> tuple[subprocess.Popen, str]:
    """`clipsearch serve` of `db` on a free loopback port, once it answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "clipsearch", "serve", "--db", str(db), "--model", "shapes-mini"]
    process = subprocess.Popen([*command, "--port", str(port)])
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with urllib.request.urlopen(f"{url}/api/status", timeout=60) as response:
                json.loads(response.read())
                return process, url
        except OSError:
            time.sleep(0.3)
    process.kill()
    raise SystemExit(f"clipsearch serve did not start on {db}; run `clipsearch demo` first")


def screenshot(url: str, width: int, height: int, dark: bool, hover: int) -> bytes:
    """The page at `url` once its first thumbnails are in, with the mouse over tile number `hover`."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        context = browser.new_context(
            viewport={"width": width, "height": height},
            color_scheme="dark" if dark else "light",
            reduced_motion="reduce",  # no hover animation caught half-way
        )
        page = context.new_page()
        page.goto(url)
        page.wait_for_selector("#results .tile img", timeout=120_000)
        page.wait_for_function(
            "() => [...document.querySelectorAll('#results .tile img')].slice(0, 12).every((i) => i.complete)"
        )
        page.locator("#results .tile").nth(hover).hover()
        png = page.screenshot()
        browser.close()
    return png


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", type=Path, default=Path("clipsearch-demo"), help="the demo's folder")
    parser.add_argument("--query", default="a large orange heart", help="the search shown")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("serve.png"))
    parser.add_argument("--size", default="1280x800", help="the window, WIDTHxHEIGHT")
    parser.add_argument("--dark", action="store_true", help="the dark colour scheme")
    parser.add_argument("--hover", type=int, default=2, help="the tile the mouse is over (its 'More like this')")
    parser.add_argument("--weak", action="store_true", help="show the weaker matches too, marked (weak=1)")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    process, url = serve(args.demo / "db")
    try:
        state = {"q": args.query, **({"weak": "1"} if args.weak else {})}
        png = screenshot(f"{url}/?{urllib.parse.urlencode(state)}", width, height, args.dark, args.hover)
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=60)
    # 256 colours keep the file small (octree keeps the shapes' hues, where median cut shifts red to magenta)
    image = Image.open(io.BytesIO(png)).convert("RGB").quantize(256, method=Image.Quantize.FASTOCTREE)
    image.save(args.out, optimize=True)
    print(f"{args.out}: {width}x{height}, {args.out.stat().st_size / 1024:.0f} KB")


if __name__ == "__main__":
    main()
