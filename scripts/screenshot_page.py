"""Screenshot a leaderboard page in Debian's Chromium (headless, through Playwright): the README's image.

    python scripts/screenshot_page.py runs/demo/site/index.html docs/leaderboard.png

Fails (exit 1) if the page logs a console error or a script error while loading.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("page", type=Path)
    parser.add_argument("png", type=Path)
    parser.add_argument("--width", type=int, default=1280)
    args = parser.parse_args()
    if not Path(CHROMIUM).is_file():
        print(f"error: {CHROMIUM} is missing: run scripts/env.sh (installs Debian's chromium)", file=sys.stderr)
        return 1
    from playwright.sync_api import sync_playwright

    errors: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": args.width, "height": 800})
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(args.page.resolve().as_uri())
        page.wait_for_selector("#scatter circle.point")
        args.png.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(args.png), full_page=True)
        browser.close()
    if errors:
        print("error: the page logged: " + "; ".join(errors), file=sys.stderr)
        return 1
    print(args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
