//! The mesh dashboard: `GET /` on the control plane's port. One page,
//! inline CSS and JS, no external assets, no framework, no build step. It
//! reads `/v1/mesh` every 2 s and draws the services, routes, edges (a
//! table and an SVG graph), proxies and ejected endpoints.
//!
//! The page itself holds no data and is served to anyone. `/v1/mesh`
//! asks for a caller's identity like every other API path: the page
//! takes a bearer token from its URL fragment, `https://cp:15010/#token=…`
//! (a fragment is never sent to a server, so it shows in no access log or
//! proxy), keeps it in the tab's `sessionStorage`, takes it out of the
//! address bar, and sends it as `authorization: Bearer`. Without one (or
//! on a 401) it asks for it.
//!
//! Not chosen: letting `/v1/mesh` through unauthenticated from a loopback
//! address. It would be handy behind `kubectl port-forward`, but the
//! address says nothing about who asks once anything in the pod relays
//! connections (a sidecar in front of the control plane makes every
//! caller loopback), and on a shared machine every local user would read
//! the mesh's topology.
//!
//! Everything from `/v1/mesh` (node ids, route names — chosen by the
//! proxies) goes into the page as text nodes, never as markup; the
//! Content-Security-Policy allows only this page's own script and style
//! (by hash) and requests to its own origin.

use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use std::sync::OnceLock;

/// The page.
pub const PAGE: &str = r##"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Outrigger mesh</title>
<style>
:root { --bg:#f6f7f9; --card:#fff; --ink:#1d2330; --mute:#6b7385; --line:#e3e6ec;
        --ok:#1e8e3e; --warn:#c77700; --bad:#c62828; --accent:#2f5fd0; }
* { box-sizing:border-box; }
body { margin:0; font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;
       background:var(--bg); color:var(--ink); }
header { display:flex; align-items:baseline; gap:16px; padding:12px 20px;
         background:#14213d; color:#fff; }
header h1 { font-size:18px; margin:0; font-weight:600; }
header .status { color:#c9d3ea; font-size:13px; }
header .status.err { color:#ffb4a8; }
main { padding:12px 20px 24px; display:grid; gap:14px; grid-template-columns:1fr 1fr; }
section { background:var(--card); border:1px solid var(--line); border-radius:8px;
          padding:10px 12px; min-width:0; overflow-x:auto; }
section.wide { grid-column:1 / -1; }
.col { display:grid; gap:14px; align-content:start; min-width:0; }
h2 { font-size:14px; margin:0 0 8px; color:var(--mute); font-weight:600;
     text-transform:uppercase; letter-spacing:.04em; }
table { border-collapse:collapse; width:100%; font-variant-numeric:tabular-nums; }
th, td { text-align:left; padding:4px 8px; border-bottom:1px solid var(--line);
         white-space:nowrap; }
th { color:var(--mute); font-weight:500; font-size:12px; }
td.num, th.num { text-align:right; }
td.id { font-family:ui-monospace,Menlo,Consolas,monospace; font-size:12px; }
tr.nack td { background:#fdecea; }
tr.nack td.nackcell { color:var(--bad); font-weight:600; font-size:12px; }
tr.down td { color:var(--mute); }
.ok { color:var(--ok); } .warn { color:var(--warn); } .bad { color:var(--bad); font-weight:600; }
.empty { color:var(--mute); font-style:italic; }
svg { width:100%; height:auto; display:block; }
svg text { font-size:12px; fill:var(--ink); }
svg .rate { font-size:11px; fill:var(--mute); }
#tokenform { display:none; padding:12px 20px; background:#fff4e5; border-bottom:1px solid #f0d5a8; }
#tokenform.show { display:block; }
#tokenform input { width:420px; max-width:70%; padding:4px 6px; }
@media (max-width: 900px) { main { grid-template-columns:1fr; } }
</style>
</head>
<body>
<header><h1>Outrigger mesh</h1><span id="status" class="status">loading…</span></header>
<div id="tokenform">
  <label>The control plane wants a token for <code>/v1/mesh</code> (open this page as
  <code>/#token=…</code>): <input id="token" type="password" autocomplete="off"></label>
  <button id="usetoken">Use</button>
</div>
<main>
  <section class="wide"><h2>Services</h2><div id="services"></div></section>
  <section><h2>Who calls whom</h2><div id="graph"></div></section>
  <div class="col">
    <section><h2>Routes</h2><div id="routes"></div></section>
    <section><h2>Ejected endpoints</h2><div id="ejected"></div></section>
  </div>
  <section class="wide"><h2>Edges</h2><div id="edges"></div></section>
  <section class="wide"><h2>Proxies</h2><div id="proxies"></div></section>
</main>
<script>
"use strict";
(function () {
  const KEY = "outrigger-token";
  const POLL_MS = 2000;
  let token = new URLSearchParams(location.hash.slice(1)).get("token");
  if (token) {
    try { sessionStorage.setItem(KEY, token); } catch (e) {}
    history.replaceState(null, "", location.pathname + location.search);
  } else {
    try { token = sessionStorage.getItem(KEY); } catch (e) {}
  }
  const $ = (id) => document.getElementById(id);
  const SVG = "http://www.w3.org/2000/svg";

  function el(tag, attrs, ...kids) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v !== undefined && v !== null) e.setAttribute(k, String(v));
    }
    for (const k of kids) e.append(k instanceof Node ? k : document.createTextNode(String(k)));
    return e;
  }
  function svg(tag, attrs, text) {
    const e = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
    if (text !== undefined) e.textContent = String(text);
    return e;
  }
  const rate = (r) => (r === 0 ? "0" : r < 10 ? r.toFixed(2) : r.toFixed(1)) + "/s";
  const pct = (s) => (s === null || s === undefined) ? "–"
    : s >= 1 ? "100%" : (s * 100).toFixed(2) + "%";
  const ms = (v) => (v === null || v === undefined) ? "–"
    : (v < 1 ? v.toFixed(2) : v < 100 ? v.toFixed(1) : v.toFixed(0)) + " ms";
  const health = (s) => (s === null || s === undefined) ? "" : s >= 0.99 ? "ok" : s >= 0.95 ? "warn" : "bad";
  function ago(unix) {
    if (!unix) return "–";
    const s = Math.max(0, Math.round(Date.now() / 1000 - unix));
    return s < 90 ? s + "s ago" : s < 5400 ? Math.round(s / 60) + "m ago" : Math.round(s / 3600) + "h ago";
  }
  function td(text, cls) { return el("td", { class: cls }, text); }
  function figures(f) {
    return [td(rate(f.rate), "num"), td(pct(f.success), "num " + health(f.success)),
            td(ms(f.p50_ms), "num"), td(ms(f.p99_ms), "num")];
  }
  function table(heads, rows, empty) {
    if (!rows.length) return el("p", { class: "empty" }, empty);
    const head = el("tr", {}, ...heads.map((h) => el("th", { class: h.endsWith(" ") ? "num" : "" }, h.trim())));
    return el("table", {}, el("thead", {}, head), el("tbody", {}, ...rows));
  }
  function put(id, node) { $(id).replaceChildren(node); }

  function services(v) {
    const rows = v.services.map((s) => el("tr", { "data-service": s.service, "data-rate": s.rate },
      td(s.service, "id"), td(s.proxies, "num"), ...figures(s),
      td(s.inbound ? rate(s.inbound.rate) : "–", "num"),
      td(s.inbound ? pct(s.inbound.success) : "–", "num " + health(s.inbound && s.inbound.success))));
    put("services", table(["service", "proxies ", "rate ", "success ", "p50 ", "p99 ",
      "inbound rate ", "inbound success "], rows, "no services"));
  }
  function routes(v) {
    const rows = v.routes.map((r) => el("tr", { "data-route": r.route, "data-rate": r.rate },
      td(r.route, "id"), td(r.services.join(", ")), ...figures(r)));
    put("routes", table(["route", "to", "rate ", "success ", "p50 ", "p99 "], rows,
      "no traffic in the last minute"));
  }
  function edges(v) {
    const rows = v.edges.map((e) => el("tr", { "data-edge": e.from + " -> " + e.to, "data-rate": e.rate },
      td(e.from + " → " + e.to, "id"),
      td(e.from_identities.join(", "), "id"), td(e.to_identities.join(", "), "id"),
      td(e.mtls ? "mTLS" : "–", e.mtls ? "ok" : ""), ...figures(e)));
    put("edges", table(["caller → callee", "caller identity", "callee identity", "peer",
      "rate ", "success ", "p50 ", "p99 "], rows, "no calls in the last minute"));
  }
  function graph(v) {
    const names = new Set();
    for (const e of v.edges) { names.add(e.from); names.add(e.to); }
    for (const s of v.services) if (s.proxies > 0 || s.rate > 0) names.add(s.service);
    const list = [...names].sort();
    if (!list.length) { put("graph", el("p", { class: "empty" }, "nothing yet")); return; }
    const W = 560, H = 280, cx = W / 2, cy = H / 2, R = Math.min(W, H) / 2 - 36, r = 14;
    const pos = {};
    list.forEach((n, i) => {
      const a = -Math.PI / 2 + (2 * Math.PI * i) / list.length;
      pos[n] = list.length === 1 ? [cx, cy] : [cx + R * Math.cos(a), cy + R * Math.sin(a)];
    });
    const g = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": "service graph" });
    const defs = svg("defs");
    for (const c of ["ok", "warn", "bad", "idle"]) {
      const m = svg("marker", { id: "arrow-" + c, viewBox: "0 0 10 10", refX: 9, refY: 5,
        markerUnits: "userSpaceOnUse", markerWidth: 11, markerHeight: 11, orient: "auto-start-reverse" });
      m.append(svg("path", { d: "M0,0 L10,5 L0,10 z", fill: COLORS[c] }));
      defs.append(m);
    }
    g.append(defs);
    for (const e of v.edges) {
      if (e.from === e.to) continue;
      const [x1, y1] = pos[e.from], [x2, y2] = pos[e.to];
      const d = Math.hypot(x2 - x1, y2 - y1) || 1, ux = (x2 - x1) / d, uy = (y2 - y1) / d;
      const c = e.rate > 0 ? (health(e.success) || "ok") : "idle";
      g.append(svg("line", { x1: x1 + ux * r, y1: y1 + uy * r, x2: x2 - ux * (r + 2), y2: y2 - uy * (r + 2),
        stroke: COLORS[c], "stroke-width": (1.5 + Math.min(5, Math.log10(1 + e.rate) * 2)).toFixed(1),
        "marker-end": `url(#arrow-${c})` }));
      // The label beside the line's middle, on the side it leans to.
      const px = uy * 10, py = -ux * 10;
      g.append(svg("text", { x: (x1 + x2) / 2 + px, y: (y1 + y2) / 2 + py + 4,
        "text-anchor": px > 3 ? "start" : px < -3 ? "end" : "middle", class: "rate" },
        rate(e.rate) + " · " + pct(e.success)));
    }
    for (const n of list) {
      const [x, y] = pos[n];
      g.append(svg("circle", { cx: x, cy: y, r, fill: "#e8eefc", stroke: "#2f5fd0", "stroke-width": 1.5 }));
      const below = y >= cy - 1;
      g.append(svg("text", { x, y: below ? y + r + 14 : y - r - 6, "text-anchor": "middle" }, n));
    }
    put("graph", g);
  }
  const COLORS = { ok: "#1e8e3e", warn: "#c77700", bad: "#c62828", idle: "#a0a7b5" };
  // The error in full on hover; cut in the table.
  function nack(n) {
    if (!n) return td("–");
    const text = "v" + n.version + ", " + ago(n.at) + ": " + n.error;
    const cell = td(text.length > 52 ? text.slice(0, 51) + "…" : text, "nackcell");
    cell.setAttribute("title", n.error);
    return cell;
  }
  function proxies(v) {
    const rows = v.proxies.map((p) => el("tr", { "data-node": p.node,
        class: (p.nacked ? "nack " : "") + (p.connected ? "" : "down") },
      td(p.node, "id"), td(p.service, "id"), td(p.identity, "id"),
      td(p.version + (p.current !== p.version ? " (current " + p.current + ")" : ""), "num"),
      td(p.last_ack ? "v" + p.last_ack.version + ", " + ago(p.last_ack.at) : "–"),
      nack(p.last_nack),
      td(p.connected ? (p.draining ? "draining" : p.ready ? "ready" : "connected") : "gone",
         p.connected ? "ok" : "bad"),
      td(p.last_report_seconds_ago === null || p.last_report_seconds_ago === undefined ? "–"
         : Math.round(p.last_report_seconds_ago) + "s ago", "num")));
    put("proxies", table(["node", "service", "identity", "version ", "last ack", "last nack",
      "state", "report "], rows, "no proxies"));
  }
  function ejected(v) {
    const rows = v.ejected.map((e) => el("tr", { "data-cluster": e.cluster, title: e.cluster },
      td(e.target || e.cluster, "id"), td(e.ejected + " of " + e.total, "num bad"),
      td(e.addresses.map((a) => a.node ? a.node + " (" + a.address + ")" : a.address).join(", ") || "–", "id"),
      td(e.node, "id")));
    put("ejected", table(["service", "ejected ", "endpoints", "seen by"], rows,
      "no endpoint ejected"));
  }

  function status(text, err) {
    const s = $("status");
    s.textContent = text;
    s.className = "status" + (err ? " err" : "");
  }
  function askToken() {
    $("tokenform").className = "show";
  }
  $("usetoken").addEventListener("click", () => {
    token = $("token").value.trim();
    try { sessionStorage.setItem(KEY, token); } catch (e) {}
    $("tokenform").className = "";
    poll();
  });

  let timer = null;
  async function poll() {
    clearTimeout(timer);
    try {
      const headers = token ? { authorization: "Bearer " + token } : {};
      const r = await fetch("/v1/mesh", { headers, cache: "no-store" });
      if (r.status === 401 || r.status === 403) {
        status("not allowed: " + r.status + " (a token in the URL: /#token=…)", true);
        askToken();
      } else if (!r.ok) {
        status("/v1/mesh: " + r.status, true);
      } else {
        const v = await r.json();
        services(v); routes(v); edges(v); graph(v); proxies(v); ejected(v);
        const up = v.proxies.filter((p) => p.connected).length;
        status("model v" + v.version + " · " + up + " of " + v.proxies.length +
          " proxies connected · last " + v.window_seconds + " s · updated " +
          new Date().toLocaleTimeString(), false);
        document.body.setAttribute("data-loaded", String(v.generated_at));
      }
    } catch (e) {
      status("control plane unreachable: " + e, true);
    }
    timer = setTimeout(poll, POLL_MS);
  }
  poll();
})();
</script>
</body>
</html>
"##;

/// The hash sources of the page's inline `<tag>…</tag>` for its
/// Content-Security-Policy: `'sha256-…'`.
fn inline_hash(tag: &str) -> String {
    use base64::Engine;
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let body = PAGE
        .split_once(&open)
        .and_then(|(_, rest)| rest.split_once(&close))
        .map_or("", |(b, _)| b);
    // SHA-256 from the TLS provider's own hash: no crate added for it.
    let suite = rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256;
    let digest = suite
        .tls13()
        .map(|s| s.common.hash_provider.hash(body.as_bytes()))
        .map(|h| base64::engine::general_purpose::STANDARD.encode(h.as_ref()))
        .unwrap_or_default();
    format!("'sha256-{digest}'")
}

fn policy() -> &'static str {
    static CSP: OnceLock<String> = OnceLock::new();
    CSP.get_or_init(|| {
        format!(
            "default-src 'none'; script-src {}; style-src {}; connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
            inline_hash("script"),
            inline_hash("style")
        )
    })
}

/// `GET /`.
pub fn response() -> http::Response<BoxBody<Bytes, std::convert::Infallible>> {
    let mut r = http::Response::new(Full::new(Bytes::from_static(PAGE.as_bytes())).boxed());
    let h = r.headers_mut();
    let set = |h: &mut http::HeaderMap, k: http::header::HeaderName, v: &'static str| {
        h.insert(k, http::HeaderValue::from_static(v));
    };
    set(h, http::header::CONTENT_TYPE, "text/html; charset=utf-8");
    set(h, http::header::CACHE_CONTROL, "no-cache");
    set(h, http::header::REFERRER_POLICY, "no-referrer");
    set(h, http::header::X_CONTENT_TYPE_OPTIONS, "nosniff");
    set(h, http::header::X_FRAME_OPTIONS, "DENY");
    if let Ok(v) = http::HeaderValue::from_str(policy()) {
        h.insert(http::header::CONTENT_SECURITY_POLICY, v);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policy_allows_the_pages_own_script_and_style() {
        let p = policy();
        assert!(p.contains("script-src 'sha256-"), "{p}");
        assert!(!p.contains("sha256-'"), "an empty hash: {p}");
        assert!(!p.contains("unsafe-inline"));
        // Data from the API never goes in as markup.
        assert!(!PAGE.contains("innerHTML"));
        // Nothing loaded from elsewhere: the one URL is the SVG namespace.
        assert_eq!(PAGE.matches("http://").count(), 1);
        assert!(!PAGE.contains("https://") && !PAGE.contains(" src=") && !PAGE.contains(" href="));
    }
}
