"""The leaderboard site: built from a store and a bundle it makes itself (export → add → build without loss), then
opened from the file system in headless Chromium (Debian's chromium and chromium-driver, driven by Selenium):
pages load without console errors, sorting and filtering work, every plot image loads. The committed site under
leaderboards/site is opened the same way. Only the browser tests need the browser."""

from __future__ import annotations

import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest

from leaderboard_helpers import fill
from mergebench.cli import main
from mergebench.reports.intervals import Interval
from mergebench.errors import MergebenchError
from mergebench.reports.site import Entry, build_site, ranked
from mergebench.reports.tables import MethodRow, ResultTable, load_table
from mergebench.store.database import ResultStore

ROOT = Path(__file__).resolve().parents[1]
COMMITTED_SITE = ROOT / "leaderboards" / "site"
TASKS_4 = ["fashion", "mnist", "letters", "shapes"]
TASKS_8 = TASKS_4 + ["digits", "textures", "counting", "arrows"]
VIT_8 = ["Cars", "DTD", "EuroSAT", "GTSRB", "MNIST", "RESISC45", "SVHN", "SUN397"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A site from a results folder (mini-vision at two models, and at two task counts on one) and a bundle (vit-8
    on two checkpoint families), with the store it was built from."""
    root = tmp_path_factory.mktemp("leaderboard")
    store = ResultStore(root / "results")
    fill(store, "mini-vision-4", TASKS_4, "efficientnet-lite0")
    fill(store, "mini-vision-8", TASKS_8, "efficientnet-lite0")
    fill(store, "mini-vision-4", TASKS_4, "efficientnet-lite1", parameters=5_400_000)
    submitted = ResultStore(root / "submitted")
    fill(submitted, "vit-8", VIT_8, "ViT-B-32", family="tall_masks", run_id="run-2")
    fill(submitted, "vit-8", VIT_8, "ViT-B-32", family="retrained", salt="other experts", run_id="run-3", seed=1)
    assert main(["export", "--from", str(root / "submitted"), "--out", str(root / "vit.jsonl")]) == 0
    assert main(["leaderboard", "build", "--from", str(root / "results"), str(root / "vit.jsonl"), "--out", str(root / "site")]) == 0
    return root / "site", store, submitted


class Page(HTMLParser):
    """The tables (rows of cell texts, by table id), links and images of a page."""

    def __init__(self, path: Path):
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.links, self.images = [], []
        self._table = self._row = self._text = None
        self.feed(path.read_text(encoding="utf-8"))

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self._table = self.tables.setdefault(attrs["id"], [])
        elif tag == "tr" and self._table is not None:
            self._row = []
            self._table.append(self._row)
        elif tag in ("td", "th"):
            self._text = []
        elif tag == "a":
            self.links.append(attrs["href"])
        elif tag == "img":
            self.images.append(attrs["src"])

    def handle_data(self, data):
        if self._text is not None:
            self._text.append(data)

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._row is not None:
            self._row.append("".join(self._text).strip())
            self._text = None
        elif tag == "table":
            self._table = None


def rows_of(page: Page, table: str) -> list[dict[str, str]]:
    header, *rows = page.tables[table]
    return [dict(zip(header, row)) for row in rows]


def test_every_suite_and_model_has_a_page_linked_from_the_index(built):
    site, _, _ = built
    index = Page(site / "index.html")
    pages = {"mini-vision-4-efficientnet-lite0.html", "mini-vision-4-efficientnet-lite1.html", "mini-vision-8-efficientnet-lite0.html",
             "vit-8-ViT-B-32.html"}
    assert set(index.links) == pages and all((site / page).is_file() for page in pages)
    assert {row[0] for row in index.tables["index"][1:]} == {"mini-vision-4", "mini-vision-8", "vit-8"}
    for image in index.images:
        assert (site / image).is_file()
    assert {Path(image).name for image in index.images} >= {"mini-vision-scale.png", "mini-vision-efficientnet-lite0-task-count.png"}


def test_a_page_shows_every_stored_number_of_its_rows(built):
    """Export → build loses nothing: each merged row's scores, interval and costs are those of the stored table."""
    site, store, _ = built
    page = Page(site / "mini-vision-8-efficientnet-lite0.html")
    rows = {row["Method"]: row for row in rows_of(page, "leaderboard")}
    table = load_table(store, "mini-vision-8", "efficientnet-lite0")
    assert set(rows) == {row.label for row in table.merged}
    for row in table.merged:
        shown = rows[row.label]
        assert shown["Norm. %"] == f"{100 * row.normalized_accuracy:.1f}" and shown["Avg. %"] == f"{100 * row.mean_accuracy:.1f}"
        assert shown["95% CI"] == str(row.interval) and shown["Data access"] == row.data_access
        assert [shown[task] for task in TASKS_8] == [f"{100 * row.accuracies[task]:.1f}" for task in TASKS_8]
        assert shown["Merge s"] == f"{row.costs['seconds']:.2f}" and shown["Params"] == "4.70M"
        assert shown["Checkpoints"] == "mergebench" and shown["Versions"] == "mergebench 0.1.0 torch 2.13.0 @0123abcd"
    references = {row["Row"]: row for row in rows_of(page, "references")}
    assert references["individual"]["Norm. %"] == "100.0"
    assert {Path(image).name for image in page.images} == {
        "mini-vision-8-efficientnet-lite0-per-task.png", "mini-vision-efficientnet-lite0-task-count.png", "mini-vision-scale.png"}


def test_the_bundle_s_rows_reach_the_page_unchanged(built):
    site, _, submitted = built
    rows = rows_of(Page(site / "vit-8-ViT-B-32.html"), "leaderboard")
    context = submitted.query("SELECT context_key FROM results WHERE config LIKE '%tall_masks%' LIMIT 1")[0]["context_key"]
    table = load_table(submitted, "vit-8", "ViT-B-32", context_key=context)
    for row in table.merged:
        shown = next(shown for shown in rows if shown["Method"] == row.label and shown["Checkpoints"] == "tall_masks")
        assert [shown[task] for task in VIT_8] == [f"{100 * row.accuracies[task]:.1f}" for task in VIT_8]
        assert shown["95% CI"] == str(row.interval) and shown["Setting"] == " ".join(f"{k}={v}" for k, v in row.setting.items())


def test_published_numbers_are_beside_ours_and_never_ranked(built):
    site, _, _ = built
    page = Page(site / "vit-8-ViT-B-32.html")
    ranked = rows_of(page, "leaderboard")
    assert sorted((row["Method"], row["Checkpoints"], row["Seed"]) for row in ranked) == [
        ("task_arithmetic", "retrained", "1"), ("task_arithmetic", "tall_masks", "0"), ("ties", "retrained", "1"), ("ties", "tall_masks", "0")]
    ties = next(row for row in ranked if row["Method"] == "ties")
    assert "iso/table1, tall_masks" in ties["Published (not ranked)"]  # Iso-C's TIES on ViT-B/32, 8 tasks
    published = rows_of(page, "published")
    iso_ties = [row for row in published if row["Source"] == "iso/table1" and row["Method"] == "ties"]
    assert iso_ties and iso_ties[0]["Task"] == "suite mean" and iso_ties[0]["Absolute %"] in ties["Published (not ranked)"]
    assert {row["Method"] for row in ranked} <= {"ties", "task_arithmetic"}  # no published row entered the ranking


def test_ranks_are_shared_within_noise(built):
    site, _, _ = built
    ranked = rows_of(Page(site / "vit-8-ViT-B-32.html"), "leaderboard")
    ranks = [int(row["Rank"]) for row in ranked]
    assert ranks == sorted(ranks) and ranks[0] == 1
    # the two families' ties rows hold the same numbers (the same fabricated outcomes): neither is better beyond noise
    assert len({row["Rank"] for row in ranked if row["Method"] == "ties"}) == 1


def test_rows_of_other_checkpoints_rank_apart_only_where_their_intervals_do_not_overlap():
    def entry(context: str, method: str, score: float, low: float, high: float) -> Entry:
        row = MethodRow(method, {"a": score}, score, score, {}, "none", interval=Interval(low, high))
        return Entry(ResultTable("s", "m", context, ("a",), (row,)), row, context, 0, "", "")

    best, middle, last = entry("one", "x", 0.90, 0.85, 0.95), entry("two", "y", 0.82, 0.79, 0.86), entry("three", "z", 0.80, 0.75, 0.84)
    # x − z is at least 0.85 − 0.84 > 0: beyond noise; x − y and y − z intervals contain 0
    assert [(rank, item.row.method) for rank, item in ranked([last, best, middle])] == [(1, "x"), (1, "y"), (2, "z")]


def test_a_rebuild_replaces_the_site_and_another_folder_is_refused(tmp_path):
    store = ResultStore(tmp_path / "results")
    fill(store, "mini-vision-4", TASKS_4, "efficientnet-lite0")
    site = tmp_path / "site"
    (site / "plots").mkdir(parents=True)
    (site / "notes.txt").write_text("mine")
    with pytest.raises(MergebenchError, match="is not a leaderboard site"):
        build_site(store, [], site)
    (site / "notes.txt").unlink()
    for stale in (site / "site.js", site / "gone-suite.html", site / "plots" / "gone-suite-per-task.png"):
        stale.write_text("an earlier build")
    pages = build_site(store, [], site)
    assert sorted(path.name for path in site.rglob("*") if path.is_file()) == [
        "index.html", "mini-vision-4-efficientnet-lite0-per-task.png", "mini-vision-4-efficientnet-lite0.html", "site.css", "site.js"]
    assert pages == [site / "index.html", site / "mini-vision-4-efficientnet-lite0.html"]


def test_build_refuses_a_source_that_is_neither_a_store_nor_a_bundle(tmp_path, capsys):
    assert main(["leaderboard", "build", "--from", str(tmp_path / "missing"), "--out", str(tmp_path / "site")]) == 2
    assert "neither a results bundle nor a results folder" in capsys.readouterr().err
    assert not (tmp_path / "site").exists()


# --- in the browser ---------------------------------------------------------------------------

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
needs_browser = pytest.mark.skipif(
    CHROMIUM is None or DRIVER is None,
    reason="Debian's chromium and chromium-driver are not installed (apt-get install -y chromium chromium-driver)",
)


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[test]')")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


def open_page(browser, path: Path) -> None:
    """Load ``path`` from the file system; fails on any console error or on an image that did not load."""
    browser.get(path.resolve().as_uri())
    errors = [entry["message"] for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert not errors, f"console errors on {path.name}: {errors}"
    broken = browser.execute_script(
        "return Array.from(document.images).filter(image => !image.complete || image.naturalWidth === 0).map(image => image.src)")
    assert not broken, f"images that did not load on {path.name}: {broken}"


def column_values(browser, table: str, column: str) -> list[str]:
    return browser.execute_script(
        "const table = document.getElementById(arguments[0]);"
        "const index = Array.from(table.tHead.rows[0].cells).findIndex(cell => cell.textContent === arguments[1]);"
        "return Array.from(table.tBodies[0].rows).filter(row => !row.hidden).map(row => row.cells[index].textContent);",
        table, column)


def header(browser, table: str, column: str):
    from selenium.webdriver.common.by import By

    return next(cell for cell in browser.find_elements(By.CSS_SELECTOR, f"#{table} thead th") if cell.text.rstrip(" ▲▼") == column)


@needs_browser
def test_every_page_loads_without_console_errors_and_with_its_images(built, browser):
    site, _, _ = built
    pages = sorted(site.glob("*.html"))
    assert len(pages) == 5
    for page in pages:
        open_page(browser, page)
        assert browser.execute_script("return document.images.length") == len(Page(page).images) > 0


@needs_browser
def test_sorting_orders_numbers_and_text_both_ways(built, browser):
    site, _, _ = built
    open_page(browser, site / "vit-8-ViT-B-32.html")
    norm = header(browser, "leaderboard", "Norm. %")
    norm.click()
    ascending = [float(value) for value in column_values(browser, "leaderboard", "Norm. %")]
    assert ascending == sorted(ascending) and norm.get_attribute("aria-sort") == "ascending"
    norm.click()
    assert [float(value) for value in column_values(browser, "leaderboard", "Norm. %")] == sorted(ascending, reverse=True)
    header(browser, "leaderboard", "Method").click()
    methods = column_values(browser, "leaderboard", "Method")
    assert methods == sorted(methods) and methods[0] == "task_arithmetic"
    header(browser, "leaderboard", "Merge s").click()  # numbers, not text: 0.50 before 2.00
    assert [float(value) for value in column_values(browser, "leaderboard", "Merge s")] == [0.5, 0.5, 2.0, 2.0]


@needs_browser
def test_filtering_by_text_and_by_checkpoint_family(built, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    site, _, _ = built
    open_page(browser, site / "vit-8-ViT-B-32.html")
    count = browser.find_element(By.CSS_SELECTOR, '[data-count="leaderboard"]')
    assert count.text == "4 of 4 rows"
    search = browser.find_element(By.CSS_SELECTOR, 'input[data-filter="leaderboard"]')
    search.send_keys("ties")
    assert column_values(browser, "leaderboard", "Method") == ["ties", "ties"] and count.text == "2 of 4 rows"
    Select(browser.find_element(By.XPATH, "//label[starts-with(normalize-space(.), 'Checkpoints')]/select")).select_by_value("retrained")
    assert column_values(browser, "leaderboard", "Checkpoints") == ["retrained"] and count.text == "1 of 4 rows"
    search.clear()
    search.send_keys(" ")  # an input event with an empty query: only the family filter is left
    assert sorted(column_values(browser, "leaderboard", "Method")) == ["task_arithmetic", "ties"]


@needs_browser
def test_the_index_links_open_the_pages(built, browser):
    from selenium.webdriver.common.by import By

    site, _, _ = built
    open_page(browser, site / "index.html")
    browser.find_element(By.PARTIAL_LINK_TEXT, "2 methods").click()
    assert re.search(r"/[^/]+-efficientnet-lite0\.html$", browser.current_url)
    assert browser.find_element(By.TAG_NAME, "h1").text.endswith("on efficientnet-lite0")


def test_the_committed_site_links_only_to_files_it_holds():
    pages = sorted(COMMITTED_SITE.glob("*.html"))
    assert (COMMITTED_SITE / "index.html") in pages and len(pages) > 1
    for page in pages:
        parsed = Page(page)
        for target in [*parsed.links, *parsed.images]:
            assert (COMMITTED_SITE / target).is_file(), f"{page.name} links to {target}, which is not in {COMMITTED_SITE}"


@needs_browser
def test_the_committed_site_opens_from_the_file_system(browser):
    pages = sorted(COMMITTED_SITE.glob("*.html"))
    for page in pages:
        open_page(browser, page)
    index = Page(COMMITTED_SITE / "index.html")
    assert index.links and all((COMMITTED_SITE / link).is_file() for link in index.links)
