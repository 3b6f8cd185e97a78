"""The chat page and the dashboard, driven by Playwright in Debian's headless Chromium against a real
2-rank server. Screenshots go to ``$MDI_MPI_SCREENSHOTS`` (the README's are made so) or the test's
temporary directory."""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest
from support.servers import Server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # pragma: no cover - the reason is reported by the skip below
    sync_playwright = None
pytestmark = [
    pytest.mark.browser,
    pytest.mark.server,
    pytest.mark.mpi,
    pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (scripts/setup-system.sh browser installs "
                       "Debian's chromium as root)"),
    pytest.mark.skipif(sync_playwright is None, reason="the playwright package is not installed (test extra)"),
]
# The CI machine has no outside network: nothing may try to reach it.
FLAGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-quic"]


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(str(tmp_path_factory.mktemp("profile")), headless=True,
                                                       executable_path=CHROMIUM, args=FLAGS,
                                                       viewport={"width": 1100, "height": 760})
        context.set_default_timeout(30_000)
        yield context
        context.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(2, "--slots", "4", "--threads", "1", tag=tmp_path_factory.mktemp("pages").name)
    yield s
    s.kill()


def shots(tmp_path) -> Path:
    out = Path(os.environ.get("MDI_MPI_SCREENSHOTS") or tmp_path)
    out.mkdir(parents=True, exist_ok=True)
    return out


def send(page, text: str, max_tokens: int, temperature: float | None = None) -> None:
    """Type ``text`` into the chat page with these settings and send it."""
    if temperature is not None:
        page.fill("#temperature", str(temperature))
    page.fill("#max-tokens", str(max_tokens))
    page.fill("#input", text)
    page.click("#send")


@pytest.mark.timeout(120)
def test_chat_page_streams_the_reply_the_api_gives(browser, server, tmp_path):
    page = browser.new_page()
    page.goto(server.url + "/")
    expect(page.locator("#model")).to_have_text("mdi-mpi-demo")
    send(page, "def read_config(path):", 24, temperature=0)
    reply = page.locator(".msg.assistant").last
    expect(reply).not_to_have_class("msg assistant streaming", timeout=60_000)
    expect(page.locator("#send")).to_be_enabled()
    api = server.client().chat.completions.create(
        model="mdi-mpi-demo", messages=[{"role": "user", "content": "def read_config(path):"}], max_tokens=24, temperature=0)
    assert reply.text_content() == api.choices[0].message.content and api.choices[0].message.content
    assert page.locator(".msg.user").last.text_content() == "def read_config(path):"
    page.screenshot(path=str(shots(tmp_path) / "chat.png"))
    page.close()


@pytest.mark.timeout(120)
def test_model_text_is_inserted_as_text_not_html(browser, server):
    page = browser.new_page()
    page.goto(server.url + "/")
    send(page, "<b id=injected>bold</b>", 1)
    expect(page.locator("#send")).to_be_enabled(timeout=60_000)
    assert page.locator("#injected").count() == 0
    assert page.locator(".msg.user").last.text_content() == "<b id=injected>bold</b>"
    page.close()


@pytest.mark.timeout(120)
def test_stop_ends_the_stream_and_frees_the_slot(browser, server):
    page = browser.new_page()
    page.goto(server.url + "/")
    send(page, "while True:", 480, temperature=0)
    reply = page.locator(".msg.assistant").last
    expect(reply).not_to_have_text("", timeout=30_000)
    assert server.metric("mdi_mpi_requests_running") == 1
    page.click("#stop")
    expect(page.locator("#stop")).to_be_disabled()
    deadline = time.time() + 3
    while server.metric("mdi_mpi_requests_running") and time.time() < deadline:
        time.sleep(0.05)
    assert server.metric("mdi_mpi_requests_running") == 0
    shown = reply.text_content()
    time.sleep(0.5)
    assert reply.text_content() == shown  # nothing more arrives
    page.click("#new")
    assert page.locator(".msg").count() == 0
    page.close()


@pytest.mark.timeout(120)
def test_dashboard_shows_every_rank_and_tokens_per_second_under_load(browser, server, tmp_path):
    stop = threading.Event()

    def load() -> None:
        c = server.client()
        while not stop.is_set():
            c.completions.create(model="mdi-mpi-demo", prompt="import os", max_tokens=32, extra_body={"ignore_eos": True})

    page = browser.new_page()
    page.goto(server.url + "/dashboard")
    expect(page.locator("#ranks tbody tr")).to_have_count(2)
    first, last = httpx.get(server.url + "/v1/status").json()["ranks"][0]["layers"]
    assert page.locator("#ranks tbody tr").first.locator("td").nth(2).text_content() == f"{first}–{last - 1}"
    workers = [threading.Thread(target=load, daemon=True) for _ in range(2)]
    for w in workers:
        w.start()
    try:
        page.wait_for_function("Number(document.getElementById('tps').textContent) > 0", timeout=20_000)
        page.wait_for_function("document.querySelector('#ranks .bars .busy').style.width !== '0.0%'", timeout=10_000)
        assert page.locator("#ring circle").count() == 3  # the ring and its two ranks
        page.wait_for_function("rates.length >= 8", timeout=20_000)  # some history in the chart
        page.screenshot(path=str(shots(tmp_path) / "dashboard.png"), full_page=True)
    finally:
        stop.set()
        for w in workers:
            w.join(30)
    long = "for i in range(10):\n    x = i * i\n" * 20  # more than one 128-token prompt chunk
    for _ in range(2):  # the second finds the first's chunk in the cache
        server.client().completions.create(model="mdi-mpi-demo", prompt=long, max_tokens=2)
    status = httpx.get(server.url + "/v1/status").json()
    assert status["prompt_tokens_cached"] >= 128
    rate = f"{100 * status['prompt_tokens_cached'] / status['prompt_tokens']:.0f}%"
    expect(page.locator("#cached")).to_have_text(rate, timeout=10_000)
    page.close()


@pytest.mark.timeout(180)
def test_a_key_is_asked_once_and_a_wrong_one_shows_an_error(browser, tmp_path):
    s = Server(1, "--api-key", "sekret", tag=tmp_path.name)
    try:
        page = browser.new_page()
        page.goto(s.url + "/")
        expect(page.locator("#keyform")).to_be_visible()
        page.fill("#key", "wrong")
        page.click("#keyform button")
        expect(page.locator("#error")).to_contain_text("Wrong API key")
        page.fill("#key", "sekret")
        page.click("#keyform button")
        expect(page.locator("#model")).to_have_text("mdi-mpi-demo")
        expect(page.locator("#keyform")).to_be_hidden()
        page.goto(s.url + "/dashboard")  # the key is kept for the session
        expect(page.locator("#ranks tbody tr")).to_have_count(1)
        expect(page.locator("#keyform")).to_be_hidden()
        page.close()
    finally:
        s.kill()
