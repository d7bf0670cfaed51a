"""The dashboard at GET /ui in a real headless Chromium, against real nodes.

Needs Debian's ``chromium`` and the ``playwright`` package (the test
extra); without them the tests skip, but fail in CI (``require_tool``).
Playwright drives the system Chromium: it cannot download its own here.
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path
from typing import Iterator

import pytest

from .cluster import LocalCluster
from .conftest import IN_CI, require_tool

pytestmark = pytest.mark.process

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]
WAIT_MS = 15_000  # how long the page may take to show what the nodes say
# Where the README's screenshot is written (etc/dashboard.png is a copy of one).
SCREENSHOT = Path(os.environ.get("DQID_UI_SCREENSHOT", "/tmp/dqid-dashboard.png"))


@pytest.fixture(scope="module")
def browser() -> Iterator:
    chromium = require_tool("chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if IN_CI:
            pytest.fail("playwright is not installed; the test extra has it")
        pytest.skip("playwright is not installed")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def page(browser) -> Iterator:
    context = browser.new_context(viewport={"width": 1100, "height": 900})
    opened = context.new_page()
    errors: list[str] = []
    opened.on("pageerror", lambda error: errors.append(str(error)))
    # Console errors too (a Content-Security-Policy refusal is one), but not
    # the browser's line for each 401 the page is meant to meet.
    opened.on("console", lambda message: message.type == "error"
              and not message.text.startswith("Failed to load resource")
              and errors.append(message.text))
    try:
        yield opened
    finally:
        context.close()
    assert not errors, errors  # no script error, whatever the test checked


def expect(locator):
    from playwright.sync_api import expect as playwright_expect

    return playwright_expect(locator)


def hold_poison(node, bodies: list[bytes]) -> list[str]:
    """Push ``bodies`` to ``node`` alone, take each and nack it with its
    receipt: with --max-deliveries=1 each is held.  Their ids."""
    for body in bodies:
        assert node.http("POST", "/push", body, {"Content-Type": "text/plain"}).status == 201
    taken = node.http("GET", f"/get?count={len(bodies)}&visibility=60").json()["messages"]
    assert sorted(m["body"].encode() for m in taken) == sorted(bodies)
    for message in taken:
        reply = node.http("POST", f"/nack/{message['id']}?receipt={message['receipt']}")
        assert reply.status == 204, reply
    return [m["id"] for m in taken]


def node_row(page, node_id: str):
    return page.locator(f'#nodes tr[data-node="{node_id}"]')


def cell(page, holder: str, owner: str):
    return page.locator(f'#matrix td[data-holder="{holder}"][data-owner="{owner}"]')


def cluster_polls(page) -> list[float]:
    """When (ms since the page opened) the page asked for /cluster, as the
    browser's resource timing saw it."""
    return page.evaluate("""() => performance.getEntriesByType("resource")
        .filter(entry => entry.name.endsWith("/cluster")).map(entry => entry.startTime)""")


def set_hidden(page, hidden: bool) -> None:
    """What the browser does when the tab is hidden or shown again."""
    page.evaluate("""hidden => {
        Object.defineProperty(document, "hidden", {configurable: true, get: () => hidden});
        document.dispatchEvent(new Event("visibilitychange"));
    }""", hidden)


def test_the_dashboard_follows_a_cluster_through_a_kill(pool, page) -> None:
    cluster = LocalCluster(pool, ("a", "b", "c"), "--max-deliveries=1", "--size=500").start()
    # Two poison messages, held on c: one to kick from the page, one left.
    poison, other_poison = hold_poison(cluster["c"], [b"poison: kick me", b"poison: leave me"])
    pushed = {"a": 3, "b": 5, "c": 2}
    for node_id, count in pushed.items():
        for i in range(count):
            assert cluster.push(node_id, b"job %d" % i).status == 201
    depths = {"a": 3, "b": 5, "c": 4}  # c's two held messages count in its depth
    cluster.wait_until(lambda: cluster.held_everywhere("b") == {"a": 5, "c": 5},
                       what="b's messages on a and c")

    page.goto(f"http://127.0.0.1:{cluster['a'].http_port}/ui")
    page.evaluate("performance.setResourceTimingBufferSize(100000)")

    for node_id, depth in depths.items():
        row = node_row(page, node_id)
        expect(row.locator("td.state")).to_have_text("ready", timeout=WAIT_MS)
        expect(row.locator("td.depth")).to_have_text(f"{depth} / 500")
    expect(node_row(page, "c").locator("td.held")).to_have_text("2")
    expect(node_row(page, "a").locator("td.oldest")).to_have_text(re.compile(r"^\d+\.\d s$"))
    expect(cell(page, "a", "b")).to_have_text("5")
    expect(cell(page, "c", "b")).to_have_text("5")
    expect(cell(page, "b", "b")).to_have_text("5")  # the owner's own depth
    expect(cell(page, "a", "a")).to_have_text("3")

    # Work flows: pushes, deliveries and acks show as rates.
    for round_ in range(4):
        for node_id in cluster.ids:
            assert cluster.push(node_id, b"flow %d" % round_).status == 201
        time.sleep(0.5)
    expect(page.locator('.rate[data-counter="pushed"] .value')).not_to_have_text(
        "0.0 /s", timeout=WAIT_MS)
    assert page.locator('.rate[data-counter="pushed"] polyline').get_attribute("points")
    cluster.drain()  # takes and acks everything but the held two
    expect(page.locator('.rate[data-counter="acked"] .value')).not_to_have_text(
        "0.0 /s", timeout=WAIT_MS)

    # A held message: peeked and kicked from the page.
    held_row = page.locator(f'#held tr[data-id="{poison}"]')
    held_row.locator("button.peek").click()
    expect(page.locator("#peek-body")).to_have_text("poison: kick me")
    expect(page.locator("#peek-title")).to_contain_text("state held")
    held_row.locator("button.kick").click()
    expect(held_row).to_have_count(0, timeout=WAIT_MS)
    peeked = cluster["a"].http("GET", f"/messages/{poison}")
    assert peeked.status == 200 and peeked.headers["dqid-state"] == "ready"
    assert cluster.stats("c")["held"] == 1
    expect(page.locator(f'#held tr[data-id="{other_poison}"]')).to_have_count(1)

    # At most one poll a second; none while the tab is hidden.
    polls = cluster_polls(page)
    assert len(polls) >= 3
    assert min(later - earlier for earlier, later in zip(polls, polls[1:])) >= 990
    set_hidden(page, True)
    page.wait_for_timeout(500)  # a poll under way may still ask
    count_hidden = len(cluster_polls(page))
    page.wait_for_timeout(2500)
    assert len(cluster_polls(page)) == count_hidden
    set_hidden(page, False)
    page.wait_for_timeout(1500)
    assert len(cluster_polls(page)) > count_hidden

    # kill -9 b: marked down, its queue waits on a and c.
    for i in range(4):
        assert cluster.push("b", b"late %d" % i).status == 201
    cluster.wait_until(lambda: cluster.held_everywhere("b") == {"a": 4, "c": 4},
                       what="b's new messages on a and c")
    cluster["b"].kill()
    b_row = node_row(page, "b")
    expect(b_row.locator("td.state")).to_contain_text("down", timeout=WAIT_MS)
    expect(b_row).to_have_class("down")
    for holder in ("a", "c"):
        expect(cell(page, holder, "b")).to_have_text("4")
        expect(cell(page, holder, "b")).to_have_class("waiting")
    expect(page.locator("#waiting")).to_have_text("b is down: its queue waits on a (4), c (4).")
    for node_id in ("a", "c"):
        expect(node_row(page, node_id).locator("td.state")).not_to_contain_text("down")
    page.screenshot(path=str(SCREENSHOT), full_page=True)


def test_with_a_token_file_the_page_asks_for_the_token(pool, page, tmp_path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("right-token\n")
    node = pool.node("solo", f"--http-token-file={tokens}", "--max-deliveries=1").start()
    node.wait_for("/ready")
    auth = {"Authorization": "Bearer right-token"}
    pushed = node.http("POST", "/push", b"\x00\x01binary", auth).json()["id"]
    taken = node.http("GET", "/get", headers=auth)
    receipt = taken.headers["dqid-receipt"]
    assert node.http("POST", f"/nack/{pushed}?receipt={receipt}", headers=auth).status == 204

    page.goto(f"http://127.0.0.1:{node.http_port}/ui")  # the page itself needs no token
    expect(page.locator("#auth")).to_be_visible(timeout=WAIT_MS)
    expect(page.locator("#auth-message")).to_contain_text("401")
    expect(page.locator("#nodes tbody tr")).to_have_count(0)

    page.fill("#token", "wrong-token")
    page.click("#auth button")
    expect(page.locator("#auth-message")).to_contain_text("refused", timeout=WAIT_MS)
    expect(page.locator("#auth")).to_be_visible()

    page.fill("#token", "right-token")
    page.click("#auth button")
    expect(page.locator("#auth")).to_be_hidden()
    expect(node_row(page, "solo").locator("td.held")).to_have_text("1", timeout=WAIT_MS)
    held_row = page.locator(f'#held tr[data-id="{pushed}"]')
    held_row.locator("button.peek").click()
    expect(page.locator("#peek-body")).to_have_text("binary, 8 bytes")

    page.reload()  # the token is kept for the tab's session: not asked again
    expect(node_row(page, "solo").locator("td.held")).to_have_text("1", timeout=WAIT_MS)
    expect(page.locator("#auth")).to_be_hidden()
    held_row.locator("button.kick").click()
    expect(held_row).to_have_count(0, timeout=WAIT_MS)
    stats = node.http("GET", "/stats", headers=auth).json()
    assert stats["held"] == 0 and stats["ready"] == 1

    # A token revoked while the page is open: the page asks again.
    tokens.write_text("new-token\n")
    node.signal(signal.SIGHUP)
    expect(page.locator("#auth-message")).to_contain_text("refused", timeout=WAIT_MS)
