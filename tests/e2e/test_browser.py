"""The real dashboard server in Debian's headless Chromium (Playwright): every page shows its key text; screenshots
go to test-artifacts/dashboard/ for a person to look at."""

import os
import shutil

import pytest

from common.config import PROJECT_ROOT
from common.rounds import RoundRecord
from common.run_store import RunWriter
from dashboard.bench import make_store
from tests.conftest import running_dashboard

pytestmark = pytest.mark.slow
CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = PROJECT_ROOT / "test-artifacts" / "dashboard"
# Page path -> text that must be visible on it.
PAGES = {
    "": ["Overview", "Worst site", "site-002", "Global model per round"],
    "sites": ["Per-site curves", "Per-site numbers come from each site's noised summary"],
    "findings": ["site-002 failed in train in round 5: data file missing"],
    "errors": ["Confusion matrices", "Per-class F1", "Label issues", "Calibration", "Noised values"],
    "cross_site": ["Cross-site", "server test set column is exact"],
    "privacy": ["ε over rounds", "Most spent", "Signal / noise per DP step", "Lifetime ε against each site's own cap"],
    "whatif": ["kept no per-round updates"],
    "runs": ["Compare runs", "Pick two runs to overlay their global curves"],
}
# Without these, Chromium tries Google's hosts at start and this closed network refuses them many times over.
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


def _need_chromium() -> None:
    if not os.path.exists(CHROMIUM):
        if os.environ.get("FEDLENS_REQUIRE_BROWSER"):
            pytest.fail(f"Debian's chromium is not installed ({CHROMIUM}); .ci/run installs it with apt")
        pytest.skip(f"Debian's chromium is not installed ({CHROMIUM}): apt-get install chromium")


@pytest.fixture(scope="module")
def dashboard_url(tmp_path_factory):
    _need_chromium()
    store = make_store(tmp_path_factory.mktemp("browser") / "s.db", sites=8, rounds=5, failing=("site-002",))
    live = RunWriter(store, "live")  # a second run, still going: the liveness test writes its next round
    live.start(scenario="live", rounds_planned=3, model="m", config={"dp.enabled": False})
    live.write_round(RoundRecord(1, 1.0, {"test_accuracy": 0.61, "test_macro_f1": 0.3}))
    live.close()
    with running_dashboard(store) as (_, url):
        yield url, store


def test_a_hundred_sites_over_a_hundred_rounds_read_at_1280_px(tmp_path):
    """The synthetic 100-site × 100-round run: every page renders without a traceback, the Sites tables show every
    column, and the screenshots go to test-artifacts/dashboard-100x100/."""
    from playwright.sync_api import expect, sync_playwright

    _need_chromium()
    store = make_store(tmp_path / "big.db", sites=100, rounds=100, failing=("site-002",))
    out = ARTIFACTS.parent / "dashboard-100x100"
    out.mkdir(parents=True, exist_ok=True)
    with running_dashboard(store) as (_, url), sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        for path, title in (("", "Overview"), ("sites", "Sites"), ("findings", "Findings"), ("errors", "Errors"),
                            ("cross_site", "Cross-site"), ("privacy", "Privacy"), ("runs", "Compare runs")):
            page.goto(f"{url}/{path}?run=synthetic", wait_until="networkidle")
            expect(page.get_by_text(title, exact=False).first).to_be_in_viewport(timeout=60_000)
            page.wait_for_timeout(2000)
            assert not page.get_by_text("Traceback").count(), f"/{path} shows a traceback"
            page.screenshot(path=str(out / f"{path or 'overview'}.png"))
            if path == "sites":
                _every_column_in_view(page, expect, out)
        browser.close()
    assert errors == []


def test_every_page_renders_its_key_text_in_chromium(dashboard_url):
    """At 1280 × 800 (a laptop), every page's key text is scrolled to and seen in the viewport, not only present in
    the page; every table of the Sites page shows all its columns without a horizontal scroll. Screenshots (the first
    screen and the whole page) go to test-artifacts/dashboard/."""
    from playwright.sync_api import expect, sync_playwright

    dashboard_url, _ = dashboard_url
    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    ARTIFACTS.mkdir(parents=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        for path, texts in PAGES.items():
            page.goto(f"{dashboard_url}/{path}?run=synthetic", wait_until="networkidle")
            for text in texts:
                seen = page.get_by_text(text, exact=False).first
                expect(seen).to_be_visible(timeout=30_000)
                seen.scroll_into_view_if_needed()
                expect(seen).to_be_in_viewport()
            # Charts draw after the text: give them a moment before the pictures.
            page.wait_for_timeout(1500)
            assert not page.get_by_text("Traceback").count(), f"/{path} shows a traceback"
            name = path or "overview"
            page.evaluate("window.scrollTo(0, 0)")
            page.screenshot(path=str(ARTIFACTS / f"{name}.png"))
            page.screenshot(path=str(ARTIFACTS / f"{name}-full.png"), full_page=True)
            if path == "sites":
                _every_column_in_view(page, expect)
        browser.close()
    assert errors == []
    assert {p.stem for p in ARTIFACTS.glob("*.png")} >= {p or "overview" for p in PAGES}


# The data grids Streamlit draws (glide-data-grid): a grid wider than its frame scrolls sideways and hides columns.
OVERFLOW = """() => [...document.querySelectorAll('[data-testid="stDataFrame"]')]
    .filter(f => f.offsetParent !== null)
    .map(f => { const s = f.querySelector('.dvn-scroller');
                return s ? [s.scrollWidth, s.clientWidth, f.getBoundingClientRect().right] : null; })"""


def _every_column_in_view(page, expect, out=ARTIFACTS) -> None:  # noqa: ANN001
    from dashboard.data import SITE_GROUPS

    for tab in [None, *SITE_GROUPS]:
        if tab is not None:
            page.get_by_role("tab", name=tab).click()
            page.wait_for_timeout(500)
        grids = [g for g in page.evaluate(OVERFLOW) if g is not None]
        assert grids, f"no table drawn ({tab or 'overview'})"
        for scroll, client, right in grids:
            assert scroll <= client + 1, f"the {tab or 'overview'} table scrolls sideways ({scroll} > {client} px)"
            assert right <= 1280, f"the {tab or 'overview'} table ends at {right} px, past the 1280 px window"
        page.screenshot(path=str(out / f"sites-{(tab or 'overview').split()[0].lower()}.png"))


def test_a_live_run_shows_its_new_round_without_a_reload(dashboard_url):
    from playwright.sync_api import expect, sync_playwright

    url, store = dashboard_url
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        page.goto(f"{url}/?run=live", wait_until="networkidle")
        expect(page.get_by_text("1 / 3").first).to_be_visible(timeout=30_000)
        writer = RunWriter(store, "live")
        writer.write_round(RoundRecord(2, 1.0, {"test_accuracy": 0.64, "test_macro_f1": 0.33}))
        writer.close()
        # No reload: the page's fragment re-runs every 2 s while the run is live ("within a few seconds").
        expect(page.get_by_text("2 / 3").first).to_be_visible(timeout=15_000)
        page.screenshot(path=str(ARTIFACTS / "live.png"))
        browser.close()
