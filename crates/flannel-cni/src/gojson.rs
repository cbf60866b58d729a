//! JSON text the way Go's `encoding/json` writes maps: keys sorted, compact, `<>&` escaped.
//!
//! The saved delegate config must be readable by the Go plugin and look like what it writes, so
//! routes keep the CNI Route field order (dst, gw, mtu, advmss, priority, table, scope).

use serde_json::Value;

/// Field order of a CNI route object.
pub const ROUTE_FIELDS: [&str; 7] = ["dst", "gw", "mtu", "advmss", "priority", "table", "scope"];

/// Compact Go-style JSON of a value (maps with sorted keys).
pub fn to_go_json(v: &Value) -> String {
    let mut s = String::new();
    write_value(v, &mut s, false);
    s
}

/// Compact Go-style JSON of a delegate config: like [`to_go_json`], with `ipam.routes` objects
/// in CNI Route field order.
pub fn delegate_to_go_json(v: &Value) -> String {
    let mut s = String::new();
    match v {
        Value::Object(m) => {
            s.push('{');
            for (i, (k, val)) in m.iter().enumerate() {
                if i > 0 {
                    s.push(',');
                }
                write_string(k, &mut s);
                s.push(':');
                if k == "ipam" {
                    write_ipam(val, &mut s);
                } else {
                    write_value(val, &mut s, false);
                }
            }
            s.push('}');
        }
        other => write_value(other, &mut s, false),
    }
    s
}

fn write_ipam(v: &Value, s: &mut String) {
    let Value::Object(m) = v else {
        write_value(v, s, false);
        return;
    };
    s.push('{');
    for (i, (k, val)) in m.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        write_string(k, s);
        s.push(':');
        if k == "routes" {
            match val {
                Value::Array(items) => {
                    s.push('[');
                    for (j, r) in items.iter().enumerate() {
                        if j > 0 {
                            s.push(',');
                        }
                        write_value(r, s, true);
                    }
                    s.push(']');
                }
                other => write_value(other, s, false),
            }
        } else {
            write_value(val, s, false);
        }
    }
    s.push('}');
}

fn write_value(v: &Value, s: &mut String, route: bool) {
    match v {
        Value::Null => s.push_str("null"),
        Value::Bool(b) => s.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => s.push_str(&n.to_string()),
        Value::String(t) => write_string(t, s),
        Value::Array(items) => {
            s.push('[');
            for (i, x) in items.iter().enumerate() {
                if i > 0 {
                    s.push(',');
                }
                write_value(x, s, false);
            }
            s.push(']');
        }
        Value::Object(m) => {
            s.push('{');
            let keys: Vec<&String> = if route {
                ROUTE_FIELDS
                    .iter()
                    .filter_map(|f| m.get_key_value(*f).map(|(k, _)| k))
                    .collect()
            } else {
                m.keys().collect()
            };
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    s.push(',');
                }
                write_string(k, s);
                s.push(':');
                write_value(&m[k], s, false);
            }
            s.push('}');
        }
    }
}

fn write_string(t: &str, s: &mut String) {
    let json = serde_json::to_string(t).unwrap_or_else(|_| "\"\"".into());
    s.push_str(
        &json
            .replace('<', "\\u003c")
            .replace('>', "\\u003e")
            .replace('&', "\\u0026"),
    );
}

/// Indented (4 spaces) JSON, as the Go library prints results.
pub fn to_indented(v: &Value) -> String {
    let mut buf = Vec::new();
    let fmt = serde_json::ser::PrettyFormatter::with_indent(b"    ");
    let mut ser = serde_json::Serializer::with_formatter(&mut buf, fmt);
    if serde::Serialize::serialize(v, &mut ser).is_err() {
        return to_go_json(v);
    }
    String::from_utf8(buf).unwrap_or_default()
}
