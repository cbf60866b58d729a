//! CNI result conversion between spec versions (0.1.0 ... 1.1.0).
//!
//! The Go plugin prints the delegate's result in the delegate's version; we convert it to the
//! version the runtime asked for, as the spec requires.

use serde_json::{json, Map, Value};

/// Every version this plugin speaks.
pub const SUPPORTED: [&str; 7] = [
    "0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0",
];

/// Numeric form of a version for comparisons (`""` means 0.1.0).
pub fn version_key(v: &str) -> (u32, u32, u32) {
    let v = if v.is_empty() { "0.1.0" } else { v };
    let mut it = v.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    (
        it.next().unwrap_or(0),
        it.next().unwrap_or(0),
        it.next().unwrap_or(0),
    )
}

fn is_legacy(v: &str) -> bool {
    version_key(v) < (0, 3, 0)
}

fn is_v4(address: &str) -> bool {
    !address.contains(':')
}

/// Converts `result` (in its own `cniVersion`, or `from` if it has none) to version `to`.
pub fn convert(result: &Value, from: &str, to: &str) -> Value {
    let Value::Object(r) = result else {
        return result.clone();
    };
    let from = r
        .get("cniVersion")
        .and_then(Value::as_str)
        .unwrap_or(from)
        .to_string();
    let to_v = if to.is_empty() { "0.1.0" } else { to };
    let mut out = if is_legacy(&from) && !is_legacy(to_v) {
        legacy_to_current(r)
    } else if !is_legacy(&from) && is_legacy(to_v) {
        return current_to_legacy(r, to_v);
    } else {
        r.clone()
    };
    if !is_legacy(to_v) {
        if let Some(Value::Array(ips)) = out.get_mut("ips") {
            for ip in ips.iter_mut().filter_map(Value::as_object_mut) {
                if version_key(to_v) >= (1, 0, 0) {
                    ip.remove("version");
                } else if !ip.contains_key("version") {
                    let v4 = ip.get("address").and_then(Value::as_str).is_none_or(is_v4);
                    ip.insert("version".into(), (if v4 { "4" } else { "6" }).into());
                }
            }
        }
        if version_key(to_v) < (1, 1, 0) {
            if let Some(Value::Array(ifs)) = out.get_mut("interfaces") {
                for i in ifs.iter_mut().filter_map(Value::as_object_mut) {
                    for k in ["mtu", "socketPath", "pciID"] {
                        i.remove(k);
                    }
                }
            }
            if let Some(Value::Array(rs)) = out.get_mut("routes") {
                for rt in rs.iter_mut().filter_map(Value::as_object_mut) {
                    for k in ["mtu", "advmss", "priority", "table", "scope"] {
                        rt.remove(k);
                    }
                }
            }
        }
    }
    out.insert("cniVersion".into(), to_v.into());
    Value::Object(out)
}

/// Gives routes without `gw` the gateway of their family's address: the route bridge really
/// installs, so the delegate's CHECK compares against what exists (Debian's bridge otherwise
/// reports a healthy pod's gateway-less route as missing).
pub fn fill_route_gateways(result: &mut Value) {
    let gateways: Vec<(bool, Value)> = result
        .get("ips")
        .and_then(Value::as_array)
        .map(|ips| {
            ips.iter()
                .filter_map(|ip| {
                    let gw = ip.get("gateway")?.clone();
                    let v4 = is_v4(ip.get("address")?.as_str()?);
                    Some((v4, gw))
                })
                .collect()
        })
        .unwrap_or_default();
    if let Some(Value::Array(routes)) = result.get_mut("routes") {
        for r in routes.iter_mut().filter_map(Value::as_object_mut) {
            if r.contains_key("gw") {
                continue;
            }
            let Some(v4) = r.get("dst").and_then(Value::as_str).map(is_v4) else {
                continue;
            };
            if let Some((_, gw)) = gateways.iter().find(|(f, _)| *f == v4) {
                r.insert("gw".into(), gw.clone());
            }
        }
    }
}

fn current_to_legacy(r: &Map<String, Value>, to: &str) -> Value {
    let ips: Vec<&Map<String, Value>> = r
        .get("ips")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_object).collect())
        .unwrap_or_default();
    let routes: Vec<&Value> = r
        .get("routes")
        .and_then(Value::as_array)
        .map(|a| a.iter().collect())
        .unwrap_or_default();
    let mut out = Map::new();
    out.insert("cniVersion".into(), to.into());
    for (key, v4) in [("ip4", true), ("ip6", false)] {
        let Some(ip) = ips.iter().find(|ip| {
            ip.get("address")
                .and_then(Value::as_str)
                .is_some_and(|a| is_v4(a) == v4)
        }) else {
            continue;
        };
        let mut m = Map::new();
        m.insert("ip".into(), ip["address"].clone());
        if let Some(gw) = ip.get("gateway") {
            m.insert("gateway".into(), gw.clone());
        }
        let fam_routes: Vec<Value> = routes
            .iter()
            .filter(|rt| {
                rt.get("dst")
                    .and_then(Value::as_str)
                    .is_some_and(|d| is_v4(d) == v4)
            })
            .map(|rt| {
                let mut x = Map::new();
                for k in ["dst", "gw"] {
                    if let Some(v) = rt.get(k) {
                        x.insert(k.into(), v.clone());
                    }
                }
                Value::Object(x)
            })
            .collect();
        if !fam_routes.is_empty() {
            m.insert("routes".into(), Value::Array(fam_routes));
        }
        out.insert(key.into(), Value::Object(m));
    }
    out.insert(
        "dns".into(),
        r.get("dns").cloned().unwrap_or_else(|| json!({})),
    );
    Value::Object(out)
}

fn legacy_to_current(r: &Map<String, Value>) -> Map<String, Value> {
    let mut ips = vec![];
    let mut routes = vec![];
    for key in ["ip4", "ip6"] {
        if let Some(Value::Object(m)) = r.get(key) {
            let mut ip = Map::new();
            if let Some(a) = m.get("ip") {
                ip.insert("address".into(), a.clone());
            }
            if let Some(g) = m.get("gateway") {
                ip.insert("gateway".into(), g.clone());
            }
            ips.push(Value::Object(ip));
            if let Some(Value::Array(rs)) = m.get("routes") {
                routes.extend(rs.iter().cloned());
            }
        }
    }
    let mut out = Map::new();
    out.insert("ips".into(), Value::Array(ips));
    if !routes.is_empty() {
        out.insert("routes".into(), Value::Array(routes));
    }
    if let Some(d) = r.get("dns") {
        out.insert("dns".into(), d.clone());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn current_versions_toggle_ip_version_field() {
        let r = json!({"cniVersion":"1.0.0","ips":[{"address":"10.1.17.2/24","gateway":"10.1.17.1","interface":2}]});
        let down = convert(&r, "1.0.0", "0.4.0");
        assert_eq!(down["ips"][0]["version"], "4");
        assert_eq!(down["cniVersion"], "0.4.0");
        let up = convert(&down, "0.4.0", "1.0.0");
        assert!(up["ips"][0].get("version").is_none());
    }

    #[test]
    fn legacy_round_trip() {
        let r = json!({"cniVersion":"0.3.1","ips":[{"version":"4","address":"10.1.17.2/24","gateway":"10.1.17.1"}],"routes":[{"dst":"10.1.0.0/16"}],"dns":{}});
        let l = convert(&r, "0.3.1", "0.2.0");
        assert_eq!(l["ip4"]["ip"], "10.1.17.2/24");
        assert_eq!(l["ip4"]["routes"][0]["dst"], "10.1.0.0/16");
        let back = convert(&l, "0.2.0", "1.0.0");
        assert_eq!(back["ips"][0]["address"], "10.1.17.2/24");
    }
}
