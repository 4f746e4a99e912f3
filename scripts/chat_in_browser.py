"""Chat with `jaxchat serve`'s page in a real browser: headless Chromium (Debian's `chromium` and
`chromium-driver` packages) driven by Selenium types each message, waits for its streamed reply to finish, reads
it from the page and, optionally, saves a screenshot.

    python scripts/chat_in_browser.py --run runs/tiny-sft --say "What does \\`json.dumps\\` do?" \
        --screenshot docs/chat-serve.png

starts `jaxchat serve --run RUN` on a free port (or talks to --url), and prints each reply. Needs
`pip install -e .[browser]` (selenium) and `apt-get install chromium chromium-driver`. tests/test_chat_browser.py
uses `browser_chat` on a server with a scripted model.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
# a quiet headless browser that reaches nothing but the page it is given
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=900,700")


def missing() -> str | None:
    """Why the browser cannot run here (None when it can)."""
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not Path(path).is_file():
            return f"{path} not found: apt-get install -y {package}"
    return None


def browser_chat(url: str, messages: list[str], screenshot: str | Path | None = None, temperature: float | None = None,
                 timeout: float = 120.0) -> list[str]:
    """Type each message into the page at `url` (Enter sends it), wait until its reply has streamed in whole,
    and return the replies as the page shows them; then save a screenshot of the page if asked. `temperature`
    is typed into the page's temperature field first (the page sends it with every message)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    with tempfile.TemporaryDirectory(prefix="jaxchat-chromium-") as profile:
        for flag in FLAGS + (f"--user-data-dir={profile}",):
            options.add_argument(flag)
        driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
        try:
            driver.get(url)
            if temperature is not None:
                temp = driver.find_element(By.ID, "temp")
                temp.clear()
                temp.send_keys(str(temperature))
            replies = []
            for i, text in enumerate(messages):
                box = driver.find_element(By.ID, "input")
                box.send_keys(text)
                box.send_keys(Keys.ENTER)
                # the page appends the reply to its conversation (`messages`) once the stream has ended, or
                # shows an error bubble
                WebDriverWait(driver, timeout).until(lambda d: d.execute_script(
                    "return messages.length") >= 2 * (i + 1) or d.find_elements(By.CLASS_NAME, "error"))
                errors = driver.find_elements(By.CLASS_NAME, "error")
                if errors:
                    raise RuntimeError(f"the page showed an error: {errors[0].text}")
                replies.append(driver.find_elements(By.CLASS_NAME, "assistant")[-1].text)
            if screenshot:
                driver.save_screenshot(str(screenshot))
            return replies
        finally:
            driver.quit()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", help="run directory to serve (starts `jaxchat serve`)")
    p.add_argument("--url", help="a page already served (instead of --run)")
    p.add_argument("--say", action="append", required=True, help="a message (repeat for more turns)")
    p.add_argument("--temperature", type=float, default=0.0, help="typed into the page (0 = greedy)")
    p.add_argument("--screenshot", help="PNG file to write")
    args = p.parse_args(argv)
    if bool(args.run) == bool(args.url):
        p.error("pass exactly one of --run and --url")
    if why := missing():
        print(why, file=sys.stderr)
        return 2
    server = None
    url = args.url
    if args.run:
        port = _free_port()
        url = f"http://127.0.0.1:{port}/"
        server = subprocess.Popen([sys.executable, "-m", "jaxchat.cli", "serve", "--run", args.run, "--port",
                                   str(port)])
    try:
        if server is not None:  # wait for the model to load
            t0 = time.time()
            while True:
                try:
                    urllib.request.urlopen(url + "health", timeout=2).read()
                    break
                except OSError:
                    if server.poll() is not None or time.time() - t0 > 300:
                        print("jaxchat serve did not come up", file=sys.stderr)
                        return 1
                    time.sleep(0.5)
        for said, reply in zip(args.say, browser_chat(url, args.say, args.screenshot, args.temperature)):
            print(f"user> {said}\nassistant> {reply}")
        if args.screenshot:
            print(f"screenshot: {args.screenshot}")
        return 0
    finally:
        if server is not None:
            server.terminate()
            server.wait(30)


if __name__ == "__main__":
    sys.exit(main())
