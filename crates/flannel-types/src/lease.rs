//! Subnet leases as stored in etcd: the key text and the attribute JSON.
//!
//! Both must be byte-identical with Go flannel so mixed clusters see each other's leases.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use ipnet::{Ipv4Net, Ipv6Net};
use serde_json::Value;

/// A malformed lease key or value (written by someone else); logged and skipped by readers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LeaseError {
    /// The key under `subnets/` is not `A.B.C.D-LEN[&V6-LEN]`.
    #[error("malformed subnet key {0:?}")]
    BadKey(String),
    /// The value is not a valid lease attribute document.
    #[error("malformed lease value: {0}")]
    BadValue(String),
}

/// The subnet(s) a lease key names: `10.5.52.0-24` or `10.12.13.0-24&fd00:12:13::-56`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SubnetKey {
    /// The IPv4 subnet (always present in etcd mode).
    pub ipv4: Ipv4Net,
    /// The IPv6 subnet of a dual-stack lease.
    pub ipv6: Option<Ipv6Net>,
}

impl SubnetKey {
    /// A key for the given subnets (host bits are expected to be zero already).
    pub fn new(ipv4: Ipv4Net, ipv6: Option<Ipv6Net>) -> Self {
        SubnetKey { ipv4, ipv6 }
    }
}

impl fmt::Display for SubnetKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ipv4.addr(), self.ipv4.prefix_len())?;
        if let Some(v6) = self.ipv6 {
            write!(f, "&{}-{}", v6.addr(), v6.prefix_len())?;
        }
        Ok(())
    }
}

fn all_digits(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

fn parse_v4_part(s: &str) -> Option<Ipv4Net> {
    let (ip, len) = s.split_once('-')?;
    let octets: Vec<&str> = ip.split('.').collect();
    if octets.len() != 4 || !octets.iter().all(|o| all_digits(o)) || !all_digits(len) {
        return None;
    }
    let ip = Ipv4Addr::from_str(ip).ok()?;
    let len: u8 = len.parse().ok()?;
    if len > 31 {
        return None;
    }
    Ipv4Net::new(ip, len).ok()
}

fn parse_v6_part(s: &str) -> Option<Ipv6Net> {
    let (ip, len) = s.rsplit_once('-')?;
    if ip.is_empty()
        || !ip
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b) || b == b':')
        || !all_digits(len)
    {
        return None;
    }
    let ip = Ipv6Addr::from_str(ip).ok()?;
    let len: u8 = len.parse().ok()?;
    if len > 127 {
        return None;
    }
    Ipv6Net::new(ip, len).ok()
}

impl FromStr for SubnetKey {
    type Err = LeaseError;

    /// Parses the last path element of a lease key with the reference's acceptance rules.
    fn from_str(s: &str) -> Result<Self, LeaseError> {
        let bad = || LeaseError::BadKey(s.to_string());
        let (v4, v6) = match s.split_once('&') {
            Some((a, b)) => (a, Some(b)),
            None => (s, None),
        };
        let ipv4 = parse_v4_part(v4).ok_or_else(bad)?;
        let ipv6 = match v6 {
            Some(p) => Some(parse_v6_part(p).ok_or_else(bad)?),
            None => None,
        };
        Ok(SubnetKey { ipv4, ipv6 })
    }
}

/// A JSON value kept as its compact text, so it is written back byte for byte.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawJson(String);

impl RawJson {
    /// Wraps JSON text (compacted); fails if it is not valid JSON.
    pub fn new(text: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str::<serde::de::IgnoredAny>(text)?;
        Ok(RawJson(compact(text)))
    }

    /// Serialises a value into raw JSON.
    pub fn from_value<T: serde::Serialize>(v: &T) -> Self {
        RawJson(serde_json::to_string(v).unwrap_or_else(|_| "null".into()))
    }

    /// The compact JSON text.
    pub fn get(&self) -> &str {
        &self.0
    }

    /// Decodes the value into a typed structure.
    pub fn parse<T: serde::de::DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_str(&self.0)
    }
}

/// What a host advertises about itself in its lease (the etcd value).
#[derive(Debug, Clone, PartialEq)]
pub struct LeaseAttrs {
    /// The address other hosts send overlay traffic to (`0.0.0.0` if unset).
    pub public_ip: Ipv4Addr,
    /// The IPv6 address of a dual-stack host.
    pub public_ipv6: Option<Ipv6Addr>,
    /// The backend that wrote the lease; empty for udp/alloc (Go omits it).
    pub backend_type: String,
    /// Backend-specific data (e.g. `{"VNI":1,"VtepMAC":"..."}`), kept as raw JSON.
    pub backend_data: Option<RawJson>,
    /// Backend-specific data for the IPv6 side.
    pub backend_v6_data: Option<RawJson>,
}

impl LeaseAttrs {
    /// Attributes with only a public IPv4 address (udp, alloc).
    pub fn public_only(public_ip: Ipv4Addr) -> Self {
        LeaseAttrs {
            public_ip,
            public_ipv6: None,
            backend_type: String::new(),
            backend_data: None,
            backend_v6_data: None,
        }
    }

    /// Serialises exactly like Go's `json.Marshal(LeaseAttrs)`.
    pub fn to_json(&self) -> String {
        let mut out = String::with_capacity(128);
        out.push_str("{\"PublicIP\":\"");
        out.push_str(&self.public_ip.to_string());
        out.push_str("\",\"PublicIPv6\":");
        match self.public_ipv6 {
            Some(v6) => {
                out.push('"');
                out.push_str(&v6.to_string());
                out.push('"');
            }
            None => out.push_str("null"),
        }
        if !self.backend_type.is_empty() {
            out.push_str(",\"BackendType\":");
            out.push_str(&go_string(&self.backend_type));
        }
        if let Some(d) = &self.backend_data {
            out.push_str(",\"BackendData\":");
            out.push_str(d.get());
        }
        if let Some(d) = &self.backend_v6_data {
            out.push_str(",\"BackendV6Data\":");
            out.push_str(d.get());
        }
        out.push('}');
        out
    }

    /// Parses an etcd lease value with Go's rules (case-insensitive keys, unknown keys ignored).
    pub fn from_json(text: &str) -> Result<Self, LeaseError> {
        let bad = |m: String| LeaseError::BadValue(m);
        let map: serde_json::Map<String, Value> = match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(m)) => m,
            Ok(other) => {
                return Err(bad(format!(
                    "expected a JSON object, got {}",
                    crate::gojson::go_kind(&other)
                )))
            }
            Err(e) => return Err(bad(e.to_string())),
        };
        // Keep raw text for the BackendData fields: re-parse as RawValue map.
        let raw: std::collections::BTreeMap<String, Box<serde_json::value::RawValue>> =
            serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
        let get = |field: &str| {
            map.iter()
                .find(|(k, _)| k.as_str() == field)
                .or_else(|| map.iter().find(|(k, _)| k.eq_ignore_ascii_case(field)))
        };
        let get_raw = |field: &str| -> Option<RawJson> {
            let key = get(field)?.0;
            raw.get(key).map(|r| RawJson(compact(r.get())))
        };
        let public_ip = match get("PublicIP").map(|(_, v)| v) {
            None => Ipv4Addr::UNSPECIFIED,
            Some(Value::String(s)) => crate::config::parse_ipv4_addr(s)
                .map_err(|e| bad(format!("PublicIP {s:?}: {e}")))?,
            Some(other) => return Err(bad(format!("PublicIP must be a string, got {other}"))),
        };
        let public_ipv6 = match get("PublicIPv6").map(|(_, v)| v) {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(
                crate::config::parse_ipv6_addr(s)
                    .map_err(|e| bad(format!("PublicIPv6 {s:?}: {e}")))?,
            ),
            Some(other) => return Err(bad(format!("PublicIPv6 must be a string, got {other}"))),
        };
        let backend_type = match get("BackendType").map(|(_, v)| v) {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(s)) => s.clone(),
            Some(other) => return Err(bad(format!("BackendType must be a string, got {other}"))),
        };
        Ok(LeaseAttrs {
            public_ip,
            public_ipv6,
            backend_type,
            backend_data: get_raw("BackendData"),
            backend_v6_data: get_raw("BackendV6Data"),
        })
    }
}

/// Encodes a string the way Go's encoder does (HTML characters escaped).
pub fn go_string(s: &str) -> String {
    let json = serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_string());
    json.replace('<', "\\u003c")
        .replace('>', "\\u003e")
        .replace('&', "\\u0026")
}

/// Removes insignificant whitespace from a JSON text, as Go does when embedding a RawMessage.
pub fn compact(json: &str) -> String {
    let mut out = String::with_capacity(json.len());
    let mut in_string = false;
    let mut escaped = false;
    for c in json.chars() {
        if in_string {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
        } else if c == '"' {
            in_string = true;
            out.push(c);
        } else if !c.is_whitespace() {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_round_trips() {
        for k in ["10.12.13.0-24", "10.12.13.0-24&fd00:12:13::-56"] {
            assert_eq!(k.parse::<SubnetKey>().unwrap().to_string(), k);
        }
    }

    #[test]
    fn invalid_keys_rejected() {
        for k in [
            "10",
            "10.12.13.0",
            "10.12.13-24",
            "10.12.13.300-24",
            "10.12.13.0-24hi",
            "&2001::-56",
            "10.12.13.0-24&:12:13:-56",
            "10.12.13.0-24&20011::-56",
            "10.12.13.0-24&2001-56",
            "10.12.13.0-24&2001::",
            "10.12.13.0-24&2001::-56hi",
            "10.12.13.0-32",
            "10.12.13.0-24&2001::-128",
        ] {
            assert!(k.parse::<SubnetKey>().is_err(), "{k} should be rejected");
        }
    }

    #[test]
    fn udp_attrs_exact_bytes() {
        let a = LeaseAttrs::public_only("1.2.3.4".parse().unwrap());
        assert_eq!(a.to_json(), r#"{"PublicIP":"1.2.3.4","PublicIPv6":null}"#);
    }

    #[test]
    fn vxlan_attrs_round_trip_exact() {
        let text = r#"{"PublicIP":"192.168.64.3","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}}"#;
        let a = LeaseAttrs::from_json(text).unwrap();
        assert_eq!(a.backend_type, "vxlan");
        assert_eq!(a.to_json(), text);
    }

    #[test]
    fn null_public_ip_fails_and_garbage_fails() {
        assert!(LeaseAttrs::from_json(r#"{"PublicIP":null}"#).is_err());
        assert!(LeaseAttrs::from_json("garbage").is_err());
        assert!(LeaseAttrs::from_json(r#"{"PublicIP":"1.2.3"}"#).is_err());
    }
}
