"""The chat page at `/`, driven in headless Chromium by Playwright against a real `nanomind serve`.

Uses Debian's `chromium` (Playwright cannot download its own browser here); `.ci/run` installs it.
The server runs the scripted model of test_server.py, so the replies are known in advance.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest

from test_server import (COUNT_QUESTION, COUNT_REPLY, SKY_ANSWER, SKY_QUESTION, SKY_REASONING, WEATHER_QUESTION,
                         WEATHER_TOOL, Server, scripted_checkpoint)

sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = Server(scripted_checkpoint(tmp_path_factory.getbasetemp()), "--model-name", "nano")
    try:
        yield server.wait_ready()
    finally:
        log = server.stop()
    assert "Traceback" not in log, log


@pytest.fixture(scope="module")
def page(server):
    if not (os.path.exists(CHROMIUM) or shutil.which("chromium")):
        reason = f"{CHROMIUM} not found: install Debian's chromium package (apt-get install chromium) to run the web test"
        print(reason)
        pytest.skip(reason)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM if os.path.exists(CHROMIUM) else shutil.which("chromium"),
                                    args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1100, "height": 800})
        page.goto(server.url + "/")
        page.wait_for_selector("#model-name:has-text('nano')")
        page.evaluate("""() => { const t = document.getElementById('temperature');
                                 t.value = '0'; t.dispatchEvent(new Event('input'));
                                 t.dispatchEvent(new Event('change')); }""")
        yield page
        browser.close()


def send(page, text, new_chat=True):
    """Type and send a message (in a new conversation: the scripted replies expect a single turn);
    return the locator of the assistant reply it starts."""
    if new_chat:
        page.click("#new-chat")
    before = page.locator(".message.assistant").count()
    page.fill("#input", text)
    page.press("#input", "Enter")
    page.wait_for_function(f"document.querySelectorAll('.message.assistant').length > {before}")
    return page.locator(".message.assistant").nth(before)


def finished(reply, timeout=30_000):
    reply.page.wait_for_function("el => el.dataset.finish", arg=reply.element_handle(), timeout=timeout)
    return reply.get_attribute("data-finish")


def test_send_a_message_and_get_the_reply(page, tmp_path):
    reply = send(page, COUNT_QUESTION[0]["content"])
    assert finished(reply) == "stop"
    assert reply.locator(".content").inner_text().strip() == COUNT_REPLY
    assert page.locator(".message.user").last.inner_text() == COUNT_QUESTION[0]["content"]
    assert page.locator("#conversations li.active").inner_text() == COUNT_QUESTION[0]["content"]
    page.screenshot(path=str(tmp_path / "chat.png"), full_page=True)
    print(f"screenshot: {tmp_path / 'chat.png'}")


def test_thinking_toggle_shows_a_collapsible_reasoning_block(page):
    page.check("#thinking")
    try:
        reply = send(page, SKY_QUESTION[0]["content"])
        assert finished(reply) == "stop"
        block = reply.locator("details.thinking")
        assert block.locator(".reasoning").text_content() == SKY_REASONING
        assert block.get_attribute("open") is None  # collapsed once the reply is done
        assert reply.locator(".content").inner_text().strip() == SKY_ANSWER
    finally:
        page.uncheck("#thinking")


def test_tool_calls_show_as_cards(page):
    def add_tools(route):
        body = json.loads(route.request.post_data)
        route.continue_(post_data=json.dumps({**body, "tools": [WEATHER_TOOL]}))

    page.route("**/v1/chat/completions", add_tools)
    try:
        reply = send(page, WEATHER_QUESTION[0]["content"])
        assert finished(reply) == "tool_calls"
        card = reply.locator(".tool-call")
        assert "get_weather" in card.inner_text() and '"Paris"' in card.inner_text()
        assert "<tool_call>" not in reply.inner_text()
    finally:
        page.unroute("**/v1/chat/completions")


def test_reply_streams_in_and_the_stop_button_ends_it(page, server):
    def long_reply(route):  # the page itself never asks for this; force a reply that would run long
        body = json.loads(route.request.post_data)
        route.continue_(post_data=json.dumps({**body, "max_tokens": 1900, "ignore_eos": True}))

    page.route("**/v1/chat/completions", long_reply)
    try:
        reply = send(page, "Tell me a long story.")
        text_length = "el => el.querySelector('.content').textContent.length"
        page.wait_for_function(f"el => ({text_length})(el) > 0", arg=reply.element_handle())
        seen = page.evaluate(text_length, reply.element_handle())
        # The text grows while the reply is still being written: it streams in, piece by piece.
        page.wait_for_function(f"el => el.classList.contains('streaming') && ({text_length})(el) > {seen}",
                               arg=reply.element_handle())
        page.click("#stop")
        assert finished(reply) == "stopped"
        assert "(stopped)" in reply.inner_text() and page.is_visible("#send")
    finally:
        page.unroute("**/v1/chat/completions")
    deadline = time.time() + 5
    while time.time() < deadline and server.health()["running"]:
        time.sleep(0.05)
    assert server.health()["running"] == 0


def test_markdown_is_rendered_and_never_injected_as_html(page):
    html = page.evaluate("""() => { const div = document.createElement('div');
        div.appendChild(renderMarkdown('**bold** <img src=x onerror="window.pwned=1"> `a<b>`\\n\\n- one\\n- two\\n\\n```py\\n<script>x</script>\\n```'));
        return div.innerHTML; }""")
    assert "<strong>bold</strong>" in html and "<li>one</li>" in html and "<code>a&lt;b&gt;</code>" in html
    assert "<img" not in html and "<script>" not in html and "&lt;script&gt;" in html
    assert page.evaluate("window.pwned") is None
