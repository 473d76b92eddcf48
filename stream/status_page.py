"""The live status page served at ``/``: one self-contained HTML document (inline CSS and JS, nothing from a
CDN) that reads the API's own ``/v0/status`` (the JSON of ``bucketer status --json``, ``Status.as_json``) and
redraws itself every few seconds.

What it shows: per bucket its raw rows as a bar chart (one labelled bar per bucket; a bucket with at least
``SKEW_FACTOR`` x the mean raw rows is flagged "skewed"), share, cleaned rows, snapshotId and its age, when it
was last rebuilt (and how long that took), how far the maintained bucket is behind its newest applied change
(``freshness_lag_s``), its next rebuild; the totals; router lag, DLQ messages and the Kafka
error when the figures could not be had; recent rebuilds with their durations; when the status was generated.
Fields the JSON may carry in a later version are shown when present and "—" otherwise: ``loader_lag`` (int),
``dlq_by_class`` (object class -> count) and ``rebuilds`` (a list of ``{bucket, finished_at, seconds, rows}``;
without it the recent rebuilds are each bucket's last one, from ``rebuilt_at``/``rebuild_seconds``). A null
field is "—", never an error.

Query parameters of the page: ``token`` (passed on to ``/v0/status`` as ``?token=``, as the API accepts it),
``refresh`` (seconds between fetches, default 5, at least 0.5). A failed fetch (network, non-2xx, not JSON)
shows a red banner with the reason and keeps the last figures on screen, marked stale; the next success
clears it.

The page's ``data-*`` attributes (``data-bucket``, ``data-rows``, ``data-skewed`` on each bar,
``data-generated-at`` and ``data-fetches`` on ``<body>``) let tests and scripts read what it drew.

``status_page_route()`` is the Starlette ``Route`` for ``/`` (``app.router.routes.append(status_page_route())``
on a FastAPI app). The page needs no token itself: it holds no data, and ``/v0/status`` checks the token. Its
Content-Security-Policy allows only its own inline script and style (by hash) and requests to its own origin.
"""

from __future__ import annotations

import base64
import hashlib
from functools import cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

SKEW_FACTOR = 1.5
DEFAULT_REFRESH_S = 5.0

_CSS = """
:root { --fg:#1d2330; --muted:#5f6b7a; --line:#d9dee5; --bar:#3b82c4; --skew:#d9822b; --bad:#c0392b; }
* { box-sizing: border-box; }
body { font: 14px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif; color: var(--fg); margin: 0;
  background: #f6f7f9; }
header { display: flex; align-items: baseline; gap: 1.5em; padding: 12px 20px; background: #fff;
  border-bottom: 1px solid var(--line); flex-wrap: wrap; }
header h1 { font-size: 18px; margin: 0; }
header .meta { color: var(--muted); }
main { padding: 16px 20px; display: grid; gap: 16px; }
section { background: #fff; border: 1px solid var(--line); border-radius: 6px; padding: 12px 16px; }
section h2 { font-size: 15px; margin: 0 0 10px; }
.banner { padding: 10px 20px; font-weight: 600; }
.banner.error { background: #fbe3e0; color: var(--bad); border-bottom: 1px solid #f1b8b0; }
.banner.warn { background: #fff4e0; color: #8a5300; border-bottom: 1px solid #f2d19b; }
[hidden] { display: none !important; }
.cards { display: flex; gap: 12px; flex-wrap: wrap; }
.card { border: 1px solid var(--line); border-radius: 6px; padding: 8px 12px; min-width: 130px; }
.card .k { color: var(--muted); font-size: 12px; }
.card .v { font-size: 20px; font-variant-numeric: tabular-nums; }
.card .sub { color: var(--muted); font-size: 12px; }
#bars { display: grid; grid-template-columns: max-content 1fr max-content; gap: 4px 10px; align-items: center; }
.bar { display: contents; }
.bar-label { font-weight: 600; text-align: right; }
.track { position: relative; height: 18px; background: #eef1f5; border-radius: 3px; }
.fill { position: absolute; left: 0; top: 0; bottom: 0; background: var(--bar); border-radius: 3px;
  min-width: 1px; }
.bar.skewed .fill { background: var(--skew); }
.threshold { position: absolute; top: -3px; bottom: -3px; border-left: 2px dashed var(--bad); }
.bar-value { font-variant-numeric: tabular-nums; white-space: nowrap; }
.flag { display: inline-block; margin-left: 6px; padding: 0 6px; border-radius: 8px; background: var(--skew);
  color: #fff; font-size: 12px; font-weight: 600; }
.caption { color: var(--muted); font-size: 12px; margin-top: 8px; }
table { border-collapse: collapse; width: 100%; }
th, td { padding: 4px 8px; border-bottom: 1px solid var(--line); text-align: right; white-space: nowrap;
  font-variant-numeric: tabular-nums; }
th { color: var(--muted); font-weight: 600; font-size: 12px; }
td.l, th.l { text-align: left; }
tfoot td { font-weight: 600; border-bottom: none; }
tr.skewed td.bucket::after { content: " ⚠"; color: var(--skew); }
body.stale main { opacity: .6; }
.empty { color: var(--muted); }
"""

_JS = r"""
"use strict";
(function () {
  const SKEW = __SKEW__;
  const params = new URLSearchParams(window.location.search);
  const token = params.get("token");
  let refresh = parseFloat(params.get("refresh"));
  if (!isFinite(refresh) || refresh <= 0) refresh = __REFRESH__;
  refresh = Math.max(refresh, 0.5);
  const url = "v0/status" + (token ? "?token=" + encodeURIComponent(token) : "");
  const $ = (id) => document.getElementById(id);
  const DASH = "\u2014";

  function isNum(v) { return typeof v === "number" && isFinite(v); }
  function int(v) { return isNum(v) ? Math.round(v).toLocaleString("en-US") : DASH; }
  function pct(v) { return isNum(v) ? (v * 100).toFixed(1) + "%" : DASH; }
  function secs(v) { return isNum(v) ? v.toFixed(v < 1 ? 2 : 1) + "s" : DASH; }  // a fast rebuild: not "0.0s"
  function age(s) {
    if (!isNum(s)) return DASH;
    const neg = s < 0, a = Math.abs(s);
    let t;
    if (a < 60) t = a.toFixed(0) + "s";
    else if (a < 3600) t = (a / 60).toFixed(0) + "m";
    else if (a < 86400 * 2) t = (a / 3600).toFixed(1) + "h";
    else t = (a / 86400).toFixed(1) + "d";
    return neg ? "-" + t : t;
  }
  function when(iso) {
    if (typeof iso !== "string" || !iso) return null;
    const d = new Date(iso);
    return isNaN(d.getTime()) ? null : d;
  }
  function utc(iso) {
    const d = when(iso);
    return d ? d.toISOString().replace("T", " ").slice(0, 19) + " UTC" : DASH;
  }
  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined) continue;
      if (k === "class") e.className = v;
      else if (k === "style") Object.assign(e.style, v);  // CSSOM: allowed by the CSP
      else e.setAttribute(k, String(v));
    }
    for (const c of children) {
      if (c === null || c === undefined) continue;
      e.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return e;
  }
  function card(key, value, sub) {
    return el("div", { class: "card", "data-key": key },
      el("div", { class: "k" }, key), el("div", { class: "v" }, value), sub ? el("div", { class: "sub" }, sub) : null);
  }

  function render(st) {
    const buckets = Array.isArray(st.buckets) ? st.buckets.filter((b) => b && typeof b === "object") : [];
    const rows = buckets.map((b) => (isNum(b.raw_rows) ? b.raw_rows : 0));
    const sum = rows.reduce((a, b) => a + b, 0);
    const total = isNum(st.raw_total) ? st.raw_total : sum;
    const mean = buckets.length ? total / buckets.length : 0;
    const limit = SKEW * mean;
    const skewed = (b) => buckets.length > 1 && mean > 0 && isNum(b.raw_rows) && b.raw_rows >= limit;
    const genAt = when(st.generated_at);
    const base = genAt ? genAt.getTime() : Date.now();

    document.body.dataset.generatedAt = st.generated_at || "";
    $("generated").textContent = "generated " + utc(st.generated_at);

    // Summary cards.
    const dlqClass = st.dlq_by_class && typeof st.dlq_by_class === "object" ? st.dlq_by_class : null;
    const dlqSub = dlqClass
      ? Object.entries(dlqClass).map(([k, v]) => k + ": " + int(v)).join(", ") || "no classes"
      : null;
    $("cards").replaceChildren(
      card("buckets", int(buckets.length)),
      card("raw rows", int(st.raw_total)),
      card("cleaned rows", int(st.cleaned_total)),
      card("router lag", int(st.router_lag), st.router_lag === null || st.router_lag === undefined
        ? "not measured" : "messages"),
      card("loader lag", int(st.loader_lag), isNum(st.loader_lag) ? "messages" : "not reported"),
      card("DLQ messages", int(st.dlq_messages), dlqSub || (isNum(st.dlq_messages) ? null : "not measured")),
    );
    const kafka = $("kafka");
    kafka.hidden = !st.kafka_error;
    kafka.textContent = st.kafka_error ? "Kafka figures missing (DLQ count, router lag): " + st.kafka_error : "";
    const notes = Array.isArray(st.notes) ? st.notes.filter((n) => n) : [];
    $("notes").hidden = !notes.length;
    $("notes").replaceChildren(...notes.map((n) => el("div", null, String(n))));

    // The bar chart: one bar per bucket, widths against the largest bucket (or the skew line when higher).
    const widest = Math.max(...rows, limit, 1);
    const bars = buckets.map((b) => {
      const s = skewed(b);
      const w = (100 * (isNum(b.raw_rows) ? b.raw_rows : 0)) / widest;
      const track = el("div", { class: "track" }, el("div", { class: "fill", style: { width: w.toFixed(2) + "%" } }));
      if (buckets.length > 1 && mean > 0) {
        track.append(el("div", { class: "threshold", title: SKEW + "\u00d7 mean",
          style: { left: ((100 * limit) / widest).toFixed(2) + "%" } }));
      }
      return el("div", { class: "bar" + (s ? " skewed" : ""), "data-bucket": b.bucket, "data-rows": b.raw_rows,
        "data-skewed": s ? "true" : "false" },
        el("div", { class: "bar-label" }, "bucket " + b.bucket),
        track,
        el("div", { class: "bar-value" }, el("span", { class: "rows" }, int(b.raw_rows)), " rows \u00b7 ",
          el("span", { class: "share" }, pct(b.share)), s ? el("span", { class: "flag" }, "skewed") : null));
    });
    $("bars").replaceChildren(...bars);
    $("bars-empty").hidden = buckets.length > 0;
    $("caption").textContent = buckets.length > 1
      ? "mean " + int(mean) + " rows per bucket; dashed line and \u201cskewed\u201d: \u2265 " + SKEW +
        "\u00d7 the mean (" + int(limit) + " rows)"
      : "";

    // The per-bucket table.
    $("bucket-rows").replaceChildren(...buckets.map((b) => {
      const next = when(b.next_rebuild);
      const rebuilt = isNum(b.rebuilt_age_s)
        ? age(b.rebuilt_age_s) + " ago" + (isNum(b.rebuild_seconds) ? " (" + secs(b.rebuild_seconds) + ")" : "")
        : DASH;
      return el("tr", { class: skewed(b) ? "skewed" : null, "data-bucket": b.bucket },
        el("td", { class: "bucket" }, b.bucket),
        el("td", { class: "raw" }, int(b.raw_rows)),
        el("td", { class: "cleaned" }, int(b.cleaned_rows)),
        el("td", { class: "share" }, pct(b.share)),
        el("td", { class: "l snapshot" }, b.snapshot_id ? utc(b.snapshot_id).slice(0, 16) + " UTC" : DASH),
        el("td", { class: "snapshot-age" }, age(b.snapshot_age_s)),
        el("td", { class: "freshness", title: b.freshness ? "newest change applied: " + utc(b.freshness) : "" },
          isNum(b.freshness_lag_s) ? age(b.freshness_lag_s) + " behind" : DASH),
        el("td", { class: "rebuilt" }, rebuilt),
        el("td", { class: "l next" }, next
          ? next.toISOString().slice(11, 16) + " UTC (in " + age((next.getTime() - base) / 1000) + ")" : DASH));
    }));
    $("raw-total").textContent = int(st.raw_total);
    $("cleaned-total").textContent = int(st.cleaned_total);
    $("share-total").textContent = isNum(st.raw_total) && st.raw_total > 0 ? "100%" : DASH;

    // Recent rebuilds: the JSON's list when it has one, else each bucket's last rebuild.
    let recent = Array.isArray(st.rebuilds)
      ? st.rebuilds.filter((r) => r && typeof r === "object").map((r) => ({ bucket: r.bucket,
        at: r.finished_at, seconds: r.seconds, rows: r.rows }))
      : buckets.filter((b) => b.rebuilt_at).map((b) => ({ bucket: b.bucket, at: b.rebuilt_at,
        seconds: b.rebuild_seconds, rows: null }));
    recent = recent.sort((a, b) => ((when(b.at) || 0) - (when(a.at) || 0))).slice(0, 12);
    $("rebuild-rows").replaceChildren(...recent.map((r) => {
      const d = when(r.at);
      return el("tr", { "data-bucket": r.bucket },
        el("td", { class: "bucket" }, r.bucket),
        el("td", { class: "l" }, utc(r.at)),
        el("td", null, d ? age((base - d.getTime()) / 1000) + " ago" : DASH),
        el("td", { class: "seconds" }, secs(r.seconds)),
        el("td", null, int(r.rows)));
    }));
    $("rebuilds-empty").hidden = recent.length > 0;
  }

  let fetches = 0;
  async function tick() {
    const ctl = new AbortController();
    const timer = setTimeout(() => ctl.abort(), Math.max(10000, refresh * 2000));
    try {
      const resp = await fetch(url, { cache: "no-store", signal: ctl.signal, headers: { Accept: "application/json" } });
      const text = await resp.text();
      let body = null;
      try { body = JSON.parse(text); } catch (e) { body = null; }
      if (!resp.ok) {
        const why = body && typeof body === "object" && body.error ? body.error : text.slice(0, 200);
        throw new Error("HTTP " + resp.status + (why ? ": " + why : ""));
      }
      if (!body || typeof body !== "object") throw new Error("the answer is not a JSON object");
      render(body);
      $("error").hidden = true;
      document.body.classList.remove("stale");
    } catch (e) {
      const why = e && e.name === "AbortError" ? "no answer in time" : (e && e.message) || String(e);
      $("error").textContent = "Could not load /v0/status: " + why +
        (document.body.dataset.generatedAt ? " \u2014 showing the last figures" : "");
      $("error").hidden = false;
      document.body.classList.add("stale");
    } finally {
      clearTimeout(timer);
      fetches += 1;
      document.body.dataset.fetches = String(fetches);
      setTimeout(tick, refresh * 1000);
    }
  }
  $("refresh").textContent = "refreshes every " + refresh + "s";
  tick();
})();
"""

_BODY = """<body data-fetches="0">
<header><h1>bucketer status</h1><span class="meta" id="generated">loading…</span>
<span class="meta" id="refresh"></span></header>
<div class="banner error" id="error" role="alert" hidden></div>
<div class="banner warn" id="kafka" hidden></div>
<div class="banner warn" id="notes" hidden></div>
<main>
<section><div class="cards" id="cards"></div></section>
<section><h2>Raw rows per bucket</h2><div id="bars"></div><div class="empty" id="bars-empty" hidden>no buckets</div>
<div class="caption" id="caption"></div></section>
<section><h2>Buckets</h2><table>
<thead><tr><th>bucket</th><th>raw rows</th><th>cleaned rows</th><th>share</th><th class="l">snapshotId</th>
<th>snapshot age</th>
<th title="now \u2212 the newest change applied (incremental maintenance)">fresh</th><th>rebuilt</th>
<th class="l">next rebuild</th></tr></thead>
<tbody id="bucket-rows"></tbody>
<tfoot><tr><td>all</td><td id="raw-total">—</td><td id="cleaned-total">—</td><td id="share-total">—</td>
<td></td><td></td><td></td><td></td></tr></tfoot></table></section>
<section><h2>Recent rebuilds</h2><table>
<thead><tr><th>bucket</th><th class="l">finished</th><th>ago</th><th>took</th><th>rows</th></tr></thead>
<tbody id="rebuild-rows"></tbody></table><div class="empty" id="rebuilds-empty">no rebuild recorded yet</div></section>
</main>
"""


def _script() -> str:
    return _JS.replace("__SKEW__", repr(SKEW_FACTOR)).replace("__REFRESH__", repr(DEFAULT_REFRESH_S))


def _sha256(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


@cache
def status_page_html() -> str:
    """The page, one self-contained HTML document."""
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        '<meta name="referrer" content="no-referrer">\n'
        '<link rel="icon" href="data:,">\n'  # no /favicon.ico request
        f"<title>bucketer status</title>\n<style>{_CSS}</style></head>\n"
        f"{_BODY}<script>{_script()}</script>\n</body></html>\n"
    )


@cache
def content_security_policy() -> str:
    """Only the page's own inline script and style run, and it may talk only to its own origin."""
    return (
        f"default-src 'none'; script-src {_sha256(_script())}; style-src {_sha256(_CSS)}; "
        "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )


async def _page(request: Request) -> Response:
    from starlette.responses import HTMLResponse

    return HTMLResponse(
        status_page_html(),
        headers={
            "Cache-Control": "no-store",
            "Content-Security-Policy": content_security_policy(),
            "Referrer-Policy": "no-referrer",  # the page's URL may carry ?token=
            "X-Content-Type-Options": "nosniff",
        },
    )


def status_page_route(path: str = "/") -> Route:
    """The Starlette route serving the page (GET and HEAD), left out of the OpenAPI document."""
    from starlette.routing import Route

    return Route(path, _page, methods=["GET"], include_in_schema=False)
