"""The live status page (stream/status_page.py) in a real headless Chromium driven by Selenium: served by a
small Starlette app under uvicorn with ``/v0/status`` = ``stream.status.collect`` on a real chdb warehouse
(the JSON of ``bucketer status --json``), it draws one bar per bucket, shows the numbers of ``/v0/status``,
flags the skewed bucket, picks up new rows on its own refresh, passes its ``?token=`` on, shows an error banner
when the fetch is refused, and renders a status with missing fields.

The browser is the system's (``make setup`` installs Debian's chromium + chromium-driver); ``BUCKETER_CHROMIUM``
and ``BUCKETER_CHROMEDRIVER`` point elsewhere. Selenium is given both paths, so it never downloads a driver.
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from connectors.warehouse import Warehouse, open_warehouse
from stream.buckets import cleaned_table, raw_table
from stream.enrich import Enricher
from stream.schema import ensure_schema
from stream.status import collect
from stream.status_page import status_page_html, status_page_route

N = 4
TOKEN = "page-test-token"
RAW = {0: 3000, 1: 400, 2: 500, 3: 600}  # mean 1125: bucket 0 (3000 >= 1687.5) is the skewed one
CLEANED = {0: 250, 1: 120, 2: 80}  # bucket 3 is rebuilt for real (its cleaned rows are the enricher's)


def _browser_paths() -> tuple[str, str]:
    chromium = os.environ.get("BUCKETER_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    driver = os.environ.get("BUCKETER_CHROMEDRIVER") or shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.fail("no chromium/chromedriver: run `make setup` (or set BUCKETER_CHROMIUM / BUCKETER_CHROMEDRIVER)")
    return chromium, driver


def put_raw(wh: Warehouse, bucket: int, rows: int, start: int = 0) -> None:
    """``rows`` distinct live activities in raw bucket ``bucket`` (distinct sort keys, so FINAL keeps each)."""
    wh.command(
        f"INSERT INTO {raw_table(bucket)} (activityId, segmentId, sourceId, memberId, platform, type, channel, "
        "timestamp, createdAt, updatedAt, _deleted, _version) "
        f"SELECT concat('a{bucket}-', toString(number)), 'seg-{bucket}', toString(number), "
        "concat('m', toString(number % 17)), 'github', 'issues-opened', 'repo', "
        "toDateTime64('2026-01-01 00:00:00', 3, 'UTC') + number, toDateTime64('2026-01-01 00:00:00', 3, 'UTC'), "
        "toDateTime64('2026-01-01 00:00:00', 3, 'UTC'), 0, 2 "
        f"FROM numbers({start}, {rows})"
    )


def put_cleaned(wh: Warehouse, bucket: int, rows: int) -> None:
    wh.command(
        f"INSERT INTO {cleaned_table(bucket)} (activityId, segmentId, sourceId, timestamp, snapshotId) "
        f"SELECT concat('c{bucket}-', toString(number)), 'seg-{bucket}', toString(number), "
        "toDateTime64('2026-01-01 00:00:00', 3, 'UTC') + number, toStartOfHour(now('UTC')) "
        f"FROM numbers({rows})"
    )


def _status_app(data: Path, down: threading.Event) -> tuple[Starlette, Callable[[], None]]:
    """The page at "/" and /v0/status (token required) from collect() on the warehouse, on a handle of its own;
    under /nulls/ the same page against a status with nulls, missing and extra fields; under /flaky/ against
    the real status, or a 503 that is not JSON while ``down`` is set."""
    wh = open_warehouse(data).__enter__()
    lock = threading.Lock()  # one query at a time on the server's handle

    def status(request: Request) -> JSONResponse:
        given = request.query_params.get("token") or request.headers.get("authorization", "").removeprefix("Bearer ")
        if given != TOKEN:
            return JSONResponse({"error": "invalid token"}, status_code=401)
        with lock:
            return JSONResponse(collect(wh).as_json())

    def sparse(request: Request) -> JSONResponse:
        bucket = {"bucket": 0, "raw_rows": 7, "cleaned_rows": None, "share": None, "snapshot_id": None}
        return JSONResponse(
            {
                "buckets": [bucket, {"bucket": 1}],
                "raw_total": 7,
                "cleaned_total": None,
                "generated_at": "2026-03-01T10:00:00+00:00",
                "dlq_messages": 5,
                "router_lag": None,
                "loader_lag": 12,
                "dlq_by_class": {"parse": 3, "schema": 2},
                "kafka_error": None,
            }
        )

    def flaky(request: Request) -> Response:
        if down.is_set():
            return PlainTextResponse("upstream gone", status_code=503)
        return status(request)

    app = Starlette(
        routes=[
            status_page_route(),
            Route("/v0/status", status),
            status_page_route("/nulls/"),
            Route("/nulls/v0/status", sparse),
            status_page_route("/flaky/"),
            Route("/flaky/v0/status", flaky),
        ]
    )
    return app, lambda: wh.__exit__(None, None, None)


@dataclass
class Served:
    base: str
    data: Path
    tmp: Path
    down: threading.Event

    def status(self) -> dict[str, Any]:
        resp = httpx.get(f"{self.base}/v0/status", params={"token": TOKEN}, timeout=60)
        resp.raise_for_status()
        out: dict[str, Any] = resp.json()
        return out


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("status_page")
    data = tmp / "wh"
    with open_warehouse(data) as wh:
        ensure_schema(wh, N)
        for b, n in RAW.items():
            put_raw(wh, b, n)
        for b, n in CLEANED.items():
            put_cleaned(wh, b, n)
    results = Enricher(lambda: open_warehouse(data), lock_dir=tmp).rebuild_many([3])
    assert [r.status for r in results] == ["ok"]
    down = threading.Event()
    app, close = _status_app(data, down)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield Served(f"http://127.0.0.1:{sock.getsockname()[1]}", data, tmp, down)
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
        close()


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    chromium, driver = _browser_paths()
    opts = Options()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        opts.add_argument(arg)
    opts.add_argument("--window-size=1280,1100")
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    drv = webdriver.Chrome(service=Service(executable_path=driver), options=opts)
    try:
        yield drv
    finally:
        drv.quit()


def digits(text: str) -> int:
    return int(text.replace(",", ""))


def wait_for(drv: WebDriver, what: Callable[[WebDriver], Any], timeout: float = 20) -> Any:
    return WebDriverWait(drv, timeout, poll_frequency=0.1).until(what)


# What the page draws, read in one script: the page redraws between tasks, so one script sees one rendering
# (element handles kept across calls go stale at the next refresh). innerText is the text as shown.
_SNAPSHOT = """
const q = (sel, root) => Array.from((root || document).querySelectorAll(sel));
const text = (root, sel) => { const e = root.querySelector(sel); return e ? e.innerText : null; };
return {
  bars: q("#bars .bar").map((b) => ({
    bucket: b.dataset.bucket, data_rows: b.dataset.rows, rows: text(b, ".rows"), share: text(b, ".share"),
    skewed: b.dataset.skewed, flag: q(".flag", b).map((f) => f.innerText),
    width: b.querySelector(".fill").getBoundingClientRect().width })),
  table: q("#bucket-rows tr").map((tr) => ({ bucket: tr.dataset.bucket, cells: q("td", tr).map((td) => td.innerText),
    raw: text(tr, "td.raw"), cleaned: text(tr, "td.cleaned"), rebuilt: text(tr, "td.rebuilt") })),
  rebuilds: q("#rebuild-rows tr").map((tr) => ({ bucket: tr.dataset.bucket, seconds: text(tr, ".seconds") })),
  cards: Object.fromEntries(q(".card").map((c) => [c.dataset.key, c.innerText])),
  raw_total: document.getElementById("raw-total").innerText,
  cleaned_total: document.getElementById("cleaned-total").innerText,
  error: document.getElementById("error").hidden ? null : document.getElementById("error").innerText,
  generated: document.getElementById("generated").innerText,
  rebuilds_empty: !document.getElementById("rebuilds-empty").hidden,
};
"""


def shown(drv: WebDriver) -> dict[str, Any]:
    page: dict[str, Any] = drv.execute_script(_SNAPSHOT)
    return page


def assert_matches(page: dict[str, Any], st: dict[str, Any]) -> None:
    buckets = st["buckets"]
    mean = st["raw_total"] / len(buckets)
    assert [int(b["bucket"]) for b in page["bars"]] == [b["bucket"] for b in buckets]  # one bar per bucket, in order
    for bar, b in zip(page["bars"], buckets, strict=True):
        assert digits(bar["rows"]) == int(bar["data_rows"]) == b["raw_rows"]
        assert bar["share"] == f"{b['share'] * 100:.1f}%"
        skewed = b["raw_rows"] >= 1.5 * mean
        assert (bar["skewed"] == "true") is skewed and bar["flag"] == (["skewed"] if skewed else []), (bar, mean)
    widths = {int(bar["bucket"]): bar["width"] for bar in page["bars"]}
    by_rows = sorted(buckets, key=lambda b: b["raw_rows"])
    assert all(widths[a["bucket"]] <= widths[b["bucket"]] for a, b in zip(by_rows, by_rows[1:], strict=False))
    assert widths[by_rows[-1]["bucket"]] > 2 * widths[by_rows[0]["bucket"]] > 0  # drawn to scale, not equal
    table = {int(r["bucket"]): (digits(r["raw"]), digits(r["cleaned"])) for r in page["table"]}
    assert table == {b["bucket"]: (b["raw_rows"], b["cleaned_rows"]) for b in buckets}
    assert digits(page["raw_total"]) == st["raw_total"] and digits(page["cleaned_total"]) == st["cleaned_total"]
    assert page["error"] is None


def skewed_bars(page: dict[str, Any]) -> list[int]:
    return [int(b["bucket"]) for b in page["bars"] if b["skewed"] == "true"]


def body_data(drv: WebDriver, key: str) -> str:
    value: str = drv.execute_script(f"return document.body.dataset.{key} || ''")
    return value


def open_page(drv: WebDriver, url: str) -> None:
    drv.get(url)
    wait_for(drv, lambda d: int(body_data(d, "fetches") or 0) >= 1)


def test_page_draws_the_buckets_of_v0_status_and_follows_new_rows(served: Served, browser: webdriver.Chrome) -> None:
    open_page(browser, f"{served.base}/?token={TOKEN}&refresh=1")
    assert body_data(browser, "generatedAt")  # rendered a status
    st = served.status()
    assert [b["raw_rows"] for b in st["buckets"]] == [RAW[b] for b in range(N)]  # the warehouse as put
    page = shown(browser)
    assert_matches(page, st)
    assert skewed_bars(page) == [0]

    # The real rebuild of bucket 3 is listed with its duration; the other buckets were never rebuilt.
    rebuilt = st["buckets"][3]
    assert rebuilt["rebuild_seconds"] is not None
    took = rebuilt["rebuild_seconds"]

    def took_ok(text: str) -> bool:  # the duration as shown: 2 decimals under a second, else 1
        return text.endswith("s") and abs(float(text[:-1]) - took) <= (0.0051 if took < 1 else 0.051)

    assert [r["bucket"] for r in page["rebuilds"]] == ["3"] and took_ok(page["rebuilds"][0]["seconds"])
    cells = {int(r["bucket"]): r["rebuilt"] for r in page["table"]}
    ago, _, paren = cells[3].partition(" ago (")
    assert ago and paren.endswith(")") and took_ok(paren[:-1]), cells[3]
    assert cells[0] == cells[1] == cells[2] == "\u2014"
    assert page["generated"].startswith("generated 20")
    cards = page["cards"]
    assert "not measured" in cards["router lag"] and "not reported" in cards["loader lag"]  # no Kafka asked

    shot = served.tmp / "status_page.png"
    assert browser.save_screenshot(str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000

    # New rows land in bucket 1 while the page is open: its own refresh shows them, and the skew flags follow.
    with open_warehouse(served.data) as wh:
        put_raw(wh, 1, 2600, start=RAW[1])
    total = sum(RAW.values()) + 2600
    wait_for(browser, lambda d: digits(shown(d)["raw_total"]) == total)
    st = served.status()
    page = shown(browser)
    assert_matches(page, st)
    assert skewed_bars(page) == [0, 1]  # 3000 each >= 1.5 x 1775
    assert browser.save_screenshot(str(served.tmp / "status_page_after.png"))
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors  # no CSP violation, no script error


def test_a_refused_fetch_shows_an_error_banner(served: Served, browser: WebDriver) -> None:
    open_page(browser, f"{served.base}/?token={TOKEN}&refresh=0.5")
    assert shown(browser)["error"] is None
    for url in (f"{served.base}/?token=wrong&refresh=0.5", f"{served.base}/?refresh=0.5"):  # wrong, then none
        open_page(browser, url)
        page = shown(browser)
        assert page["error"] and "HTTP 401" in page["error"] and "invalid token" in page["error"], page["error"]
        assert page["bars"] == [] and not body_data(browser, "generatedAt")  # nothing made up


def test_a_failing_status_keeps_the_last_figures_under_a_banner_until_it_answers(
    served: Served, browser: WebDriver
) -> None:
    open_page(browser, f"{served.base}/flaky/?token={TOKEN}&refresh=0.5")
    before = shown(browser)
    assert before["error"] is None and len(before["bars"]) == N
    served.down.set()
    try:
        page = wait_for(browser, lambda d: (p := shown(d))["error"] and p)
        assert "HTTP 503" in page["error"] and "upstream gone" in page["error"] and "last figures" in page["error"]
        assert page["bars"] == before["bars"] and page["raw_total"] == before["raw_total"]  # kept, not blanked
        assert "stale" in (browser.find_element(By.TAG_NAME, "body").get_attribute("class") or "")
    finally:
        served.down.clear()
    page = wait_for(browser, lambda d: (p := shown(d))["error"] is None and p)
    assert_matches(page, served.status())


def test_nulls_and_missing_fields_render_as_dashes(served: Served, browser: WebDriver) -> None:
    open_page(browser, f"{served.base}/nulls/?refresh=30")
    page = shown(browser)
    assert page["error"] is None
    dash = "\u2014"
    assert [(b["bucket"], b["rows"], b["share"]) for b in page["bars"]] == [("0", "7", dash), ("1", dash, dash)]
    cells = {r["bucket"]: r["cells"] for r in page["table"]}
    assert cells["1"][0] == "1" and set(cells["1"][1:]) == {dash}
    assert page["cleaned_total"] == dash
    cards = page["cards"]
    assert "12" in cards["loader lag"] and dash in cards["router lag"]
    assert "parse: 3" in cards["DLQ messages"] and "schema: 2" in cards["DLQ messages"]
    assert page["rebuilds"] == [] and page["rebuilds_empty"]


def test_the_page_is_self_contained() -> None:
    html = status_page_html()
    assert "<script>" in html and "<style>" in html
    assert "src=" not in html and "http://" not in html and "https://" not in html and "url(" not in html
    assert html.count("href=") == 1 and '<link rel="icon" href="data:,">' in html  # not even a favicon fetch
    assert "fetch(url" in html and '"v0/status"' in html  # its only request: its own status, relative
