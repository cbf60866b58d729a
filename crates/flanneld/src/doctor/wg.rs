//! The wireguard part of the diagnosis: does each remote lease have its peer, with the lease's
//! subnet in its allowed IPs and the lease's address as endpoint, and does the device hold the
//! key this host announces? A mismatch here is exactly why a packet is dropped silently
//! ("no peer for ...", or a handshake nobody can answer).

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;

use ipnet::IpNet;

use super::checks::{finding, Finding, RESTART};
use crate::backend::wireguard::datapath::{WgDeviceView, WgKey, WgPeer};
use crate::backend::wireguard::keys::encode_key;
use crate::backend::wireguard::{parse_lease_data, DEVICE};
use crate::lease::Lease;

/// What was read from flannel's WireGuard devices (`flannel-wg`, `flannel-wg-v6`), by name.
pub type WgDevices = BTreeMap<String, Result<WgDeviceView, String>>;

/// The peer with `key` on `flannel-wg` (the device of IPv4 subnets in every mode).
fn find_peer<'a>(devs: &'a WgDevices, key: &WgKey) -> Option<(&'a str, &'a WgPeer)> {
    let d = devs.get(DEVICE)?.as_ref().ok()?;
    d.peers
        .iter()
        .find(|p| p.public_key == *key)
        .map(|p| (DEVICE, p))
}

/// Checks the WireGuard devices against the leases (`own`: this host's lease).
pub fn check(devs: &WgDevices, own: Option<&Lease>, remotes: &[&Lease], out: &mut Vec<Finding>) {
    for (name, d) in devs {
        if let Err(e) = d {
            out.push(finding(
                "wg-unreadable",
                name.clone(),
                format!("cannot read the WireGuard state of {name}: {e}"),
                format!(
                    "a user-space {name} is served by the running flanneld: start it ({RESTART})"
                ),
            ));
        }
    }
    if !matches!(devs.get(DEVICE), Some(Ok(_))) {
        return;
    }
    if let (Some(l), Some(Ok(d))) = (own, devs.get(DEVICE)) {
        if let Ok(data) = parse_lease_data(l.attrs.backend_data.as_ref()) {
            if d.public_key != Some(data.public_key) {
                out.push(finding(
                    "wg-key-mismatch",
                    DEVICE,
                    format!(
                        "{DEVICE} has public key {} but this host's lease announces {}: peers encrypt for a key this host does not hold",
                        d.public_key.map_or("(none)".into(), |k| encode_key(&k)),
                        encode_key(&data.public_key)
                    ),
                    RESTART.into(),
                ));
            }
        }
    }
    let mut announced: HashSet<WgKey> = HashSet::new();
    for l in remotes {
        if l.attrs.backend_type != "wireguard" {
            continue;
        }
        let data = match parse_lease_data(l.attrs.backend_data.as_ref()) {
            Ok(d) => d,
            Err(e) => {
                out.push(finding(
                    "bad-lease",
                    l.key.ipv4.to_string(),
                    format!("wireguard lease {}: {e}", l.key),
                    "the host owning it must restart flanneld (it rewrites its lease)".into(),
                ));
                continue;
            }
        };
        announced.insert(data.public_key);
        let v6 = parse_lease_data(l.attrs.backend_v6_data.as_ref()).ok();
        if let Some(d6) = &v6 {
            announced.insert(d6.public_key);
        }
        let v6_port = v6.map(|d| d.port);
        let key = encode_key(&data.public_key);
        let subnet = IpNet::V4(l.key.ipv4);
        let public = l.attrs.public_ip;
        let want_ep = format!("{public}:{}", data.port);
        let Some((dev, peer)) = find_peer(devs, &data.public_key) else {
            out.push(finding(
                "wg-peer-missing",
                subnet.to_string(),
                format!(
                    "no WireGuard peer for host {public} (key {key}): packets to {subnet} are dropped"
                ),
                format!(
                    "wg set {DEVICE} peer {key} endpoint {want_ep} allowed-ips {subnet} (or {RESTART})"
                ),
            ));
            continue;
        };
        if !peer.allowed_ips.contains(&subnet) {
            out.push(finding(
                "wg-peer-allowed-ips",
                subnet.to_string(),
                format!(
                    "peer {key} (host {public}) on {dev} lacks allowed-ip {subnet} (has: {}): packets to {subnet} are dropped",
                    list(&peer.allowed_ips)
                ),
                format!(
                    "wg set {dev} peer {key} allowed-ips {} (or {RESTART})",
                    list(&[peer.allowed_ips.clone(), vec![subnet]].concat()).replace(' ', "")
                ),
            ));
        }
        let ep_ok = peer.endpoint.is_some_and(|e| {
            (e.ip() == IpAddr::V4(public) && e.port() == data.port)
                || (l.attrs.public_ipv6.map(IpAddr::V6) == Some(e.ip())
                    && Some(e.port()) == v6_port)
        });
        if !ep_ok {
            out.push(finding(
                "wg-peer-endpoint",
                subnet.to_string(),
                format!(
                    "peer {key} on {dev} has endpoint {} but host {public} announces {want_ep}",
                    peer.endpoint.map_or("(none)".into(), |e| e.to_string())
                ),
                format!("wg set {dev} peer {key} endpoint {want_ep} (or {RESTART})"),
            ));
        }
    }
    for (name, d) in devs {
        let Ok(d) = d else { continue };
        for p in d
            .peers
            .iter()
            .filter(|p| !announced.contains(&p.public_key))
        {
            let key = encode_key(&p.public_key);
            out.push(finding(
                "stale-wg-peer",
                key.clone(),
                format!(
                    "peer {key} on {name} (allowed-ips {}) belongs to no lease",
                    list(&p.allowed_ips)
                ),
                format!("wg set {name} peer {key} remove"),
            ));
        }
    }
}

fn list(nets: &[IpNet]) -> String {
    if nets.is_empty() {
        return "(none)".into();
    }
    nets.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::wireguard::lease_data_json;
    use flannel_types::{LeaseAttrs, SubnetKey};

    fn lease(subnet: &str, ip: &str, key: Option<WgKey>) -> Lease {
        let mut attrs = LeaseAttrs::public_only(ip.parse().unwrap());
        attrs.backend_type = "wireguard".into();
        attrs.backend_data = Some(match key {
            Some(k) => lease_data_json(&k, 51820),
            None => flannel_types::lease::RawJson::new(r#"{"PublicKey":"c2hvcnQ=","Port":51820}"#)
                .expect("valid JSON"),
        });
        Lease {
            key: SubnetKey::new(subnet.parse().unwrap(), None),
            attrs,
            expiration: None,
            ttl_id: 0,
        }
    }

    fn peer(key: WgKey, ep: &str, ips: &[&str]) -> WgPeer {
        WgPeer {
            public_key: key,
            preshared_key: None,
            endpoint: ep.parse().ok(),
            allowed_ips: ips.iter().map(|i| i.parse().unwrap()).collect(),
            keepalive_secs: 0,
        }
    }

    fn checks(devs: &WgDevices, own: &Lease, remotes: &[&Lease]) -> Vec<&'static str> {
        let mut out = vec![];
        check(devs, Some(own), remotes, &mut out);
        out.iter().map(|f| f.check).collect()
    }

    #[test]
    fn consistent_then_each_kind_of_drift() {
        let own = lease("10.5.1.0/24", "192.168.1.1", Some([1; 32]));
        let r2 = lease("10.5.2.0/24", "192.168.1.2", Some([2; 32]));
        let r3 = lease("10.5.3.0/24", "192.168.1.3", Some([3; 32]));
        let good = WgDeviceView {
            public_key: Some([1; 32]),
            listen_port: 51820,
            peers: vec![
                peer([2; 32], "192.168.1.2:51820", &["10.5.2.0/24"]),
                peer([3; 32], "192.168.1.3:51820", &["10.5.3.0/24"]),
            ],
        };
        let devs: WgDevices = [(DEVICE.to_string(), Ok(good.clone()))].into();
        assert!(checks(&devs, &own, &[&r2, &r3]).is_empty());

        let mut bad = good.clone();
        bad.public_key = Some([9; 32]);
        bad.peers[0].allowed_ips.clear();
        bad.peers[1].endpoint = None;
        bad.peers
            .push(peer([4; 32], "192.168.1.4:51820", &["10.5.4.0/24"]));
        let devs: WgDevices = [(DEVICE.to_string(), Ok(bad))].into();
        let mut got = checks(&devs, &own, &[&r2, &r3]);
        got.sort();
        assert_eq!(
            got,
            [
                "stale-wg-peer",
                "wg-key-mismatch",
                "wg-peer-allowed-ips",
                "wg-peer-endpoint"
            ]
        );

        let broken = lease("10.5.5.0/24", "192.168.1.5", None);
        let mut missing = good;
        missing.peers.remove(0);
        let devs: WgDevices = [(DEVICE.to_string(), Ok(missing))].into();
        let mut got = checks(&devs, &own, &[&r2, &r3, &broken]);
        got.sort();
        assert_eq!(got, ["bad-lease", "wg-peer-missing"]);

        let devs: WgDevices = [(DEVICE.to_string(), Err("connection refused".into()))].into();
        assert_eq!(checks(&devs, &own, &[&r2]), ["wg-unreadable"]);
    }
}
