"""Acceptance in a real browser (issue 4): Debian's headless Chromium, driven by Playwright, against a real uvicorn.

Flows, each in a fresh browser context (its own cookie jar):

* JavaScript on: the banner shows -> screenshot for the README -> "Reject all" closes it in place -> after a reload
  no banner, and the HttpOnly ``__Host-consent`` cookie holds a signed refusal -> "Privacy settings" opens the panel
  in place -> tick analytics, save -> after a reload the state endpoint says granted;
* keyboard only: Tab reaches both choices, Enter on "Reject all" answers;
* JavaScript off: the same through the plain form (303 back to the page) and the standalone settings page.

Playwright's own browser download cannot work here (no internet), so the system Chromium is launched through
``executable_path``. Chromium keeps ``Secure`` and ``__Host-`` cookies on ``http://127.0.0.1`` (a potentially
trustworthy origin), so the cookie is tested with its production attributes.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway import load_settings
from gateway.consent import ConsentChoice, ConsentManager
from tests.servers import REPO, Server, free_port, run_server

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",  # CI runs as root, where Chromium's sandbox refuses to start
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
SCREENSHOT = REPO / "docs" / "banner.png"
VIEWPORT = {"width": 1000, "height": 700}
KEY = "browser-test-key-0123456789abcdefghijklm"  # 40 characters; config wants at least 32
COOKIE = "__Host-consent"
STATE = "/_privacy/consent"
BANNER = "[data-pg-banner][role=dialog]"
TIMEOUT_MS = 10_000

CONFIG = """
[consent]
secret_keys = ["{key}"]
receipts = "{receipts}"

[spool]
enabled = false

[site]
origins = ["{origin}"]
"""


def _require_chromium() -> None:
    if CHROMIUM.exists():
        return
    if os.environ.get("CI", "").strip().lower() not in ("", "0", "false"):
        # .ci/run installs Debian's chromium: in CI its absence is a broken setup, not a reason to skip.
        pytest.fail(f"{CHROMIUM} is missing; .ci/run should have installed Debian's chromium package")
    pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium); the real-browser test needs it")


@pytest.fixture(scope="module")
def config_path(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    _require_chromium()
    directory = tmp_path_factory.mktemp("browser")
    port = free_port()
    path = directory / "gateway.toml"
    path.write_text(
        CONFIG.format(key=KEY, receipts=directory / "receipts.sqlite3", origin=f"http://127.0.0.1:{port}"),
        encoding="utf-8",
    )
    return path, port


@pytest.fixture(scope="module")
def site(config_path: tuple[Path, int]) -> Iterator[Server]:
    path, port = config_path
    args = [
        "uvicorn",
        "--factory",
        "tests.apps.site:app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--no-proxy-headers",
        "--no-access-log",
        "--log-level",
        "warning",
    ]
    with run_server(args, port, path.parent / "server.log", env={"SITE_GATEWAY_CONFIG": str(path)}) as server:
        yield server
    # A traceback in the server means a 500 somewhere, even if the browser happened not to show it.
    assert "Traceback" not in server.output(), server.output()


@pytest.fixture(scope="module")
def manager(config_path: tuple[Path, int]) -> ConsentManager:
    """Reads the cookie the way the server does (same keys, same revision), to check what it really holds."""
    return ConsentManager(load_settings(config_path[0], environ={}))


@pytest.fixture(scope="module")
def browser(site: Server) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


class Tab:
    """One browser context + page, collecting console errors and uncaught exceptions."""

    def __init__(self, browser: Any, site: Server, *, javascript: bool = True) -> None:
        self.site = site
        # Reduced motion switches the slide-in animation off, so the screenshot never catches it half-way.
        self.context = browser.new_context(
            viewport=VIEWPORT,
            java_script_enabled=javascript,
            reduced_motion="reduce",
            color_scheme="light",
            locale="en-US",
        )
        self.context.set_default_timeout(TIMEOUT_MS)
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on("console", self._console)
        self.page.on("pageerror", lambda error: self.errors.append(f"page error: {error}"))
        self.page.on("response", self._response)

    def _console(self, message: Any) -> None:
        if message.type == "error":
            self.errors.append(f"console: {message.text}")

    def _response(self, response: Any) -> None:
        # The console says only "Failed to load resource"; name the URL so a failure is easy to read.
        if response.status >= 400:
            self.errors.append(f"{response.status} for {response.url}")

    def url(self, path: str) -> str:
        return self.site.url + path

    def goto(self, path: str) -> None:
        response = self.page.goto(self.url(path), wait_until="load")
        assert response is not None and response.status == 200, response

    def banner(self) -> Any:
        return self.page.locator(BANNER)

    def state(self) -> dict[str, Any]:
        """``GET /_privacy/consent`` with this context's cookies (a request, so it works with JavaScript off)."""
        response = self.context.request.get(self.url(STATE))
        assert response.status == 200, response.text()
        data: dict[str, Any] = response.json()
        return data

    def state_in_page(self) -> dict[str, Any]:
        """The same endpoint fetched by the page itself, as the banner script would."""
        data: dict[str, Any] = self.page.evaluate(
            "path => fetch(path, {credentials: 'same-origin'}).then(r => r.json())", STATE
        )
        return data

    def consent_cookie(self) -> dict[str, Any]:
        cookies = [c for c in self.context.cookies(self.site.url) if c["name"] == COOKIE]
        assert len(cookies) == 1, cookies
        cookie: dict[str, Any] = cookies[0]
        return cookie

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def tab(browser: Any, site: Server) -> Iterator[Tab]:
    opened = Tab(browser, site)
    yield opened
    opened.close()
    assert opened.errors == []


@pytest.fixture
def no_js_tab(browser: Any, site: Server) -> Iterator[Tab]:
    opened = Tab(browser, site, javascript=False)
    yield opened
    opened.close()
    assert opened.errors == []


def stored_choice(tab: Tab, manager: ConsentManager) -> ConsentChoice:
    cookie = tab.consent_cookie()
    # Production attributes, kept by Chromium on http://127.0.0.1 (RFC 6265bis __Host- prefix rules).
    assert cookie["secure"] is True
    assert cookie["httpOnly"] is True
    assert cookie["sameSite"] == "Lax"
    assert cookie["path"] == "/"
    assert cookie["domain"] == "127.0.0.1"  # host-only: a __Host- cookie has no Domain attribute
    choice = manager.loads(cookie["value"])
    assert choice is not None, "the cookie does not verify with the server's key"
    return choice


def assert_choice_buttons(tab: Tab) -> None:
    banner = tab.banner()
    reject = banner.get_by_role("button", name="Reject all")
    accept = banner.get_by_role("button", name="Accept all")
    assert reject.is_visible() and accept.is_visible()
    # Refusing is as easy as accepting (CNIL délibération 2020-092): the two buttons are the same size.
    reject_box, accept_box = reject.bounding_box(), accept.bounding_box()
    assert reject_box is not None and accept_box is not None
    assert reject_box["width"] == pytest.approx(accept_box["width"], abs=1)
    assert reject_box["height"] == pytest.approx(accept_box["height"], abs=1)


def test_javascript_flow_reject_then_grant_in_settings(tab: Tab, manager: ConsentManager) -> None:
    page = tab.page
    tab.goto("/")
    banner = tab.banner()
    banner.wait_for(state="visible")
    assert_choice_buttons(tab)
    assert tab.state_in_page()["choice_made"] is False
    assert tab.context.cookies(tab.site.url) == []  # nothing stored before the visitor chose

    SCREENSHOT.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOT))
    assert SCREENSHOT.stat().st_size > 10_000  # a real picture, not an empty canvas

    # The choice is sent with fetch and the banner closes in place: the page is not reloaded.
    page.evaluate("() => { window.pgNotReloaded = true; }")
    banner.get_by_role("button", name="Reject all").click()
    banner.wait_for(state="detached")
    assert page.evaluate("() => window.pgNotReloaded") is True
    choice = stored_choice(tab, manager)
    assert dict(choice.choices) == {"analytics": False}

    page.reload(wait_until="load")
    assert tab.banner().count() == 0
    state = tab.state_in_page()
    assert state["choice_made"] is True
    assert state["categories"]["analytics"]["granted"] is False
    assert COOKIE not in page.evaluate("() => document.cookie")  # HttpOnly: no script reads it

    # "Privacy settings" fetches the settings panel and opens it in place, the current choice unticked.
    page.get_by_role("link", name="Privacy settings").click()
    panel = tab.banner()
    panel.wait_for(state="visible")
    assert page.url == tab.url("/")
    analytics = panel.get_by_role("checkbox", name="Analytics")
    assert analytics.is_checked() is False
    analytics.check()
    panel.get_by_role("button", name="Save choices").click()
    panel.wait_for(state="detached")
    assert page.evaluate("() => window.pgNotReloaded") is None  # the reload above started a fresh page

    page.reload(wait_until="load")
    assert tab.banner().count() == 0
    state = tab.state_in_page()
    assert state["choice_made"] is True
    assert state["categories"]["analytics"]["granted"] is True
    assert dict(stored_choice(tab, manager).choices) == {"analytics": True}
    assert stored_choice(tab, manager).consent_id == choice.consent_id  # the same visitor's receipts stay linked


def test_keyboard_reaches_both_choices_and_enter_rejects(tab: Tab, manager: ConsentManager) -> None:
    page = tab.page
    tab.goto("/downloads/")
    banner = tab.banner()
    banner.wait_for(state="visible")

    def focused() -> str:
        label: str = page.evaluate("() => document.activeElement ? document.activeElement.textContent.trim() : ''")
        return label

    def focus_in_banner() -> bool:
        inside: bool = page.evaluate("() => !!document.activeElement.closest('[data-pg-banner]')")
        return inside

    # The script moves the banner to the start of <body>: its controls come before any of the page's own links
    # (WCAG 2.4.3 focus order), so a keyboard user meets the question first.
    seen: list[str] = []
    for _ in range(8):
        page.keyboard.press("Tab")
        seen.append(focused())
        assert focus_in_banner(), seen
        if seen[-1] == "Reject all":
            break
    assert seen[-1] == "Reject all", seen
    page.keyboard.press("Tab")
    assert focused() == "Accept all"
    page.keyboard.press("Shift+Tab")
    assert focused() == "Reject all"

    page.keyboard.press("Enter")
    banner.wait_for(state="detached")
    # Focus goes back to a sensible place (the settings link), not lost on <body>.
    assert focused() == "Privacy settings"
    assert dict(stored_choice(tab, manager).choices) == {"analytics": False}


def test_without_javascript_the_form_and_settings_page_work(no_js_tab: Tab, manager: ConsentManager) -> None:
    tab = no_js_tab
    page = tab.page
    tab.goto("/downloads/")
    banner = tab.banner()
    assert banner.is_visible()
    assert_choice_buttons(tab)

    # A plain form post; the gateway answers 303 back to the same page, now without the banner.
    with page.expect_navigation(wait_until="load"):
        banner.get_by_role("button", name="Reject all").click()
    assert page.url == tab.url("/downloads/")
    assert tab.banner().count() == 0
    assert page.get_by_role("heading", name="Download the latest release").is_visible()
    state = tab.state()
    assert state["choice_made"] is True
    assert state["categories"]["analytics"]["granted"] is False
    refusal = stored_choice(tab, manager)
    assert dict(refusal.choices) == {"analytics": False}

    # Without JavaScript "Privacy settings" is an ordinary link to the standalone settings page.
    with page.expect_navigation(wait_until="load"):
        page.get_by_role("link", name="Privacy settings").click()
    assert page.url == tab.url("/_privacy/settings?next=/downloads/")
    analytics = page.get_by_role("checkbox", name="Analytics")
    assert analytics.is_checked() is False
    analytics.check()
    with page.expect_navigation(wait_until="load"):
        page.get_by_role("button", name="Save choices").click()
    assert page.url == tab.url("/downloads/")
    assert tab.banner().count() == 0
    state = tab.state()
    assert state["choice_made"] is True
    assert state["categories"]["analytics"]["granted"] is True
    grant = stored_choice(tab, manager)
    assert dict(grant.choices) == {"analytics": True}
    assert grant.consent_id == refusal.consent_id
