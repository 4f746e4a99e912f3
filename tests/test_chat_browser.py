"""`jaxchat serve`'s page in a real browser: headless Chromium (Debian's chromium and chromium-driver) driven by
Selenium through scripts/chat_in_browser.py types a message into the page and reads the streamed reply,
which a scripted model makes known in advance (test_chat_engine.py), and the page's screenshot is a PNG.
Skips, with the reason, where Selenium (`pip install -e .[browser]`) or Chromium is absent."""

import importlib.util
import threading
from pathlib import Path

import pytest

pytest.importorskip("selenium", reason="the browser test drives Chromium with Selenium: pip install -e .[browser]")

from test_chat_engine import chat_prompt, scripted_engine, tok  # noqa: E402,F401 (tok: a fixture)
from jaxchat.chat.conversation import Specials  # noqa: E402
from jaxchat.chat.engine import Sampling  # noqa: E402
from jaxchat.chat.server import ChatService, make_server  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "chat_in_browser.py"
spec = importlib.util.spec_from_file_location("chat_in_browser", SCRIPT)
driver = importlib.util.module_from_spec(spec)
spec.loader.exec_module(driver)
if driver.missing():
    pytest.skip(driver.missing(), allow_module_level=True)


@pytest.mark.slow  # (~12 s on 2 busy cores: Chromium's start and the engine's compile)
def test_the_page_streams_replies_in_a_real_browser(tok, tmp_path):
    sp = Specials.of(tok)
    prompt = chat_prompt(tok, "hi")
    engine = scripted_engine(tok, prompt, [*tok.encode("hello "), sp.python_start, *tok.encode("1+1"),
                                           sp.python_end, 0, 0, 0, *tok.encode(" ok"), sp.assistant_end])
    srv = make_server(ChatService(engine, "scripted", Sampling(0.0), 32), port=0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    shot = tmp_path / "page.png"
    try:
        replies = driver.browser_chat(f"http://127.0.0.1:{srv.server_address[1]}/", ["hi"], shot, temperature=0)
    finally:
        srv.shutdown()
        srv.server_close()
    assert replies == ["hello <<1+1>>=2 ok"]  # streamed in pieces (test_chat_engine), shown whole
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 2000
