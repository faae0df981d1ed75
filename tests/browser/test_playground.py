"""The playground page in headless Chromium against the real server on the default model.

Every test loads the page with the server's API key required (the page must ask for it), blocks
any request that leaves the server (the page must need nothing remote) and fails on script errors.
Screenshots land in test-artifacts/playground/.
"""

from __future__ import annotations

import os
import re
import time

import httpx
import pytest

from tests.browser.conftest import API_KEY

pytestmark = pytest.mark.slow
if os.environ.get("CI"):  # in CI a missing playwright is a failure, not a skip
    from playwright.sync_api import expect
else:
    expect = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (the test extra)").expect

PROMPT = "What is the capital of France?"
STREAM_TIMEOUT_MS = 180_000  # a shared 2-core machine can be slow to decode
# Chromium logs every 4xx answer to fetch as a console error; the page shows those errors itself.
_EXPECTED_CONSOLE = re.compile(r"Failed to load resource: the server responded with a status of (401|400)")


@pytest.fixture
def page(browser, keyed_server):
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    page.on("console", lambda msg: msg.type == "error" and not _EXPECTED_CONSOLE.search(msg.text)
            and problems.append(f"console error: {msg.text}"))

    def only_local(route):
        if route.request.url.startswith(keyed_server.base_url):
            route.continue_()
        else:
            problems.append(f"request outside the server: {route.request.url}")
            route.abort()

    page.route("**/*", only_local)
    page.goto(f"{keyed_server.base_url}/")
    # Without the key /v1/models is a 401: the page shows the error and asks for the key.
    expect(page.locator("#alert")).to_contain_text("401")
    expect(page.locator("#key-form")).to_be_visible()
    page.fill("#api-key", API_KEY)
    page.press("#api-key", "Enter")
    page.wait_for_function("document.getElementById('model').textContent.includes(%r)" % keyed_server.model)
    expect(page.locator("#alert")).to_be_hidden()
    yield page
    context.close()
    assert not problems, problems


def api_answer(server, max_tokens: int, steering: dict) -> str:
    body = {"model": server.model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": max_tokens,
            "temperature": 0, "steering": steering}
    response = httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=300,
                          headers={"Authorization": f"Bearer {API_KEY}"})
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def configure(page, **fields) -> None:
    for element_id, value in fields.items():
        selector = "#" + element_id.replace("_", "-")
        if page.locator(selector).evaluate("el => el.tagName") == "SELECT":
            page.select_option(selector, value)
        else:
            page.fill(selector, str(value))


def send(page, prompt: str = PROMPT) -> None:
    page.fill("#prompt", prompt)
    page.press("#prompt", "Enter")


def wait_done(answer) -> None:
    expect(answer).not_to_have_attribute("data-state", "streaming", timeout=STREAM_TIMEOUT_MS)


def shown_text(answer) -> str:
    return answer.locator(".answer").evaluate("el => el.textContent")


def test_chat_streams_the_greedy_answer_the_api_gives(page, keyed_server, screenshots):
    configure(page, mode="off", max_tokens=16, temperature=0)
    send(page)
    answer = page.locator(".msg.assistant").last
    answer.locator(".tok").first.wait_for(timeout=STREAM_TIMEOUT_MS)  # text appears while streaming
    wait_done(answer)
    assert answer.get_attribute("data-state") == "done"
    assert answer.locator(".tok").count() > 1  # one span per streamed delta
    assert shown_text(answer) == api_answer(keyed_server, 16, {"mode": "off"})
    page.screenshot(path=screenshots / "chat.png")


def test_forced_backtrack_is_struck_through_then_replaced(page, keyed_server, screenshots):
    configure(page, mode="fasb", threshold=0.99, max_tokens=16, temperature=0)
    page.check("#return-scores")
    send(page)
    answer = page.locator(".msg.assistant").last
    answer.locator(".tok.retracted").first.wait_for(timeout=STREAM_TIMEOUT_MS)
    page.screenshot(path=screenshots / "retraction.png")
    wait_done(answer)
    assert answer.get_attribute("data-state") == "done"
    answer.locator(".tok.retracted").first.wait_for(state="detached")  # struck text goes after a moment
    assert answer.locator(".tok.regen").count() > 0
    assert shown_text(answer) == api_answer(keyed_server, 16, {"mode": "fasb", "threshold": 0.99})
    # return_scores: every kept token coloured by its own score, the chart with threshold and backtracks.
    assert answer.get_attribute("data-scoring") == "per-token"
    assert answer.locator(".tok[data-score]").count() == answer.locator(".tok").count()
    assert answer.locator(".tok.below").count() > 0  # threshold 0.99: most tokens are below it
    chart = answer.locator("svg.score-chart")
    assert chart.locator("polyline.scores").count() == 1
    assert chart.locator("line.threshold").count() == 1
    assert chart.locator("circle.backtrack").count() >= 1
    listed = answer.locator(".backtracks").inner_text()
    assert re.search(r"Backtrack at token \d+: \d+ tokens retracted, probe score", listed), listed
    assert re.search(r"strength [\d.]+ \([\w-]+\)", listed), listed  # names the behaviour that fired
    answer.scroll_into_view_if_needed()
    page.screenshot(path=screenshots / "scores.png")


def test_compare_shows_two_answers_side_by_side(page, screenshots):
    page.check("#compare")
    configure(page, mode="off", mode_b="fasb", threshold_b=0.99, max_tokens=16, temperature=0)
    send(page)
    sides = page.locator(".compare .msg.assistant")
    assert sides.count() == 2
    for i in range(2):
        wait_done(sides.nth(i))
        assert sides.nth(i).get_attribute("data-state") == "done"
        assert shown_text(sides.nth(i)).strip()
    a, b = sides.nth(0), sides.nth(1)
    assert "off" in a.locator(".who").inner_text() and "fasb" in b.locator(".who").inner_text()
    assert a.locator("circle.backtrack").count() == 0
    assert int(b.get_attribute("data-retractions") or 0) >= 1
    assert b.locator("svg.score-chart").count() == 1
    page.screenshot(path=screenshots / "compare.png")
    # Phone width: one column, nothing wider than the screen.
    page.set_viewport_size({"width": 390, "height": 844})
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    page.screenshot(path=screenshots / "compare-phone.png", full_page=True)


def test_stop_cancels_the_request_on_the_server(page, keyed_server):
    configure(page, mode="off", max_tokens=400, temperature=0)
    # A long answer: the short default question can end (EOS) before Stop is clicked.
    send(page, "Write a long story about a dragon who learns to paint, with many details.")
    answer = page.locator(".msg.assistant").last
    answer.locator(".tok").nth(2).wait_for(timeout=STREAM_TIMEOUT_MS)
    page.click("#stop")
    expect(answer).to_have_attribute("data-state", "stopped")
    deadline = time.monotonic() + 15
    while running_requests(keyed_server) != 0:
        assert time.monotonic() < deadline, "the server kept decoding after Stop"
        time.sleep(0.2)
    assert page.locator("#send").is_enabled()


def test_api_errors_are_shown(page):
    configure(page, temperature=5)  # out of range: the server's 400 names the field
    send(page)
    answer = page.locator(".msg.assistant").last
    expect(answer).to_have_attribute("data-state", "error")
    alert = page.locator("#alert")
    assert alert.is_visible()
    assert "400" in alert.inner_text() and "temperature" in alert.inner_text()
    assert "temperature" in answer.locator(".error").inner_text()


def running_requests(server) -> float:
    metrics = httpx.get(f"{server.base_url}/metrics", timeout=10).text
    return float(re.search(r"^fasb_queue_running (\S+)$", metrics, re.MULTILINE).group(1))
