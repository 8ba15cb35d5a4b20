//! The route table: routes made from fuzzed hosts, paths and regexes
//! compile or are refused by validation, and any lookup of a fuzzed host,
//! method, path and header answers without panicking. A matched route's
//! own conditions hold for the request.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outrigger::config::Config;
use outrigger::route::RouteTable;

fn yaml_str(s: &str) -> String {
    format!("{s:?}")
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.split('\u{0}');
    let mut routes = String::new();
    // Up to 8 routes, each from four fields: host, kind of path, path, header value.
    for i in 0..8 {
        let (Some(host), Some(kind), Some(path), Some(hv)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            break;
        };
        let path_field = match kind.len() % 4 {
            0 => format!("path: {}", yaml_str(path)),
            1 => format!("path_prefix: {}", yaml_str(path)),
            2 => format!("path_regex: {}", yaml_str(path)),
            _ => String::new(),
        };
        let host_field = if host.is_empty() {
            String::new()
        } else {
            format!("host: {}, ", yaml_str(host))
        };
        routes.push_str(&format!(
            "  - {{ name: r{i}, match: {{ {host_field}{path_field}{sep} headers: [ {{ name: x-k, exact: {hv} }} ] }}, backends: [ {{ cluster: c }} ] }}\n",
            sep = if path_field.is_empty() { "" } else { "," },
            hv = yaml_str(hv),
        ));
    }
    let doc = format!(
        "listeners: [ {{ name: l, role: outbound, address: 127.0.0.1:0 }} ]\nroutes:\n{routes}clusters: [ {{ name: c }} ]\n"
    );
    let Ok(config) = Config::from_yaml(&doc) else {
        return;
    };
    let Ok(table) = RouteTable::compile(&config.routes) else {
        return;
    };
    let host = parts.next().unwrap_or("");
    let path = parts.next().unwrap_or("/");
    let method = http::Method::from_bytes(parts.next().unwrap_or("GET").as_bytes())
        .unwrap_or(http::Method::GET);
    let mut headers = http::HeaderMap::new();
    if let Ok(v) = http::HeaderValue::from_str(parts.next().unwrap_or("")) {
        headers.insert("x-k", v);
    }
    if let Some(id) = table.lookup(host, &method, path, &headers) {
        let _ = table.route(id).pick_backend();
    }
});
