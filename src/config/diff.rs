//! What a reload changed, by kind and name, for the reload log.

use super::Config;
use serde_json::{Value, json};

/// `{ listeners: { added: [..], removed: [..], changed: [..] }, routes: .., clusters: .. }`
/// (kinds with no change left out).
pub fn diff(before: &Config, after: &Config) -> Value {
    fn by_name<'a, T: PartialEq>(a: &'a [T], b: &'a [T], name: fn(&T) -> &str) -> Option<Value> {
        let find = |list: &'a [T], n: &str| list.iter().find(|x| name(x) == n);
        let added: Vec<&str> = b
            .iter()
            .map(name)
            .filter(|n| find(a, n).is_none())
            .collect();
        let removed: Vec<&str> = a
            .iter()
            .map(name)
            .filter(|n| find(b, n).is_none())
            .collect();
        let changed: Vec<&str> = b
            .iter()
            .filter(|x| find(a, name(x)).is_some_and(|y| y != *x))
            .map(name)
            .collect();
        (!(added.is_empty() && removed.is_empty() && changed.is_empty()))
            .then(|| json!({ "added": added, "removed": removed, "changed": changed }))
    }
    let mut out = serde_json::Map::new();
    if let Some(v) = by_name(&before.listeners, &after.listeners, |l| &l.name) {
        out.insert("listeners".into(), v);
    }
    if let Some(v) = by_name(&before.routes, &after.routes, |r| &r.name) {
        out.insert("routes".into(), v);
    }
    if let Some(v) = by_name(&before.clusters, &after.clusters, |c| &c.name) {
        out.insert("clusters".into(), v);
    }
    if before.authorization != after.authorization {
        out.insert("authorization".into(), json!("changed"));
    }
    if before.tracing != after.tracing {
        out.insert("tracing".into(), json!("changed"));
    }
    Value::Object(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reload_says_what_changed() {
        let a = Config::from_yaml(
            "listeners: [ { name: out, role: outbound, address: 127.0.0.1:0 } ]\nroutes: [ { name: r1, backends: [ { cluster: c } ] }, { name: r2, backends: [ { cluster: c } ] } ]\nclusters: [ { name: c, endpoints: [ { address: 127.0.0.1:1 } ] } ]\n",
        )
        .unwrap();
        let b = Config::from_yaml(
            "listeners: [ { name: out, role: outbound, address: 127.0.0.1:0, access_log: true } ]\nroutes: [ { name: r1, backends: [ { cluster: c } ] }, { name: r3, backends: [ { cluster: c } ] } ]\nclusters: [ { name: c, endpoints: [ { address: 127.0.0.1:1 } ] } ]\n",
        )
        .unwrap();
        let d = diff(&a, &b);
        assert_eq!(d["listeners"]["changed"], json!(["out"]));
        assert_eq!(d["routes"]["added"], json!(["r3"]));
        assert_eq!(d["routes"]["removed"], json!(["r2"]));
        assert!(d.get("clusters").is_none());
    }
}
