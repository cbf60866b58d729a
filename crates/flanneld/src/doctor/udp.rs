//! The udp backend's kernel data path in the diagnosis: every remote lease needs its route
//! through `flannel-udprx` and the neighbour entry whose MAC names the remote host; an entry
//! that names a host no lease has sends packets to the wrong place (or nowhere).

use std::collections::HashSet;
use std::net::IpAddr;

use netlink_packet_route::route::RouteType;

use super::checks::{finding, Finding, KernelState, RESTART};
use crate::backend::udp::kernel::{peer_mac, PEER_MAC_MARK, RX_DEVICE};
use crate::lease::Lease;
use crate::netlink::format_mac;

/// Checks the kernel path's routes and neighbour entries against the remote leases; nothing
/// to check when `flannel-udprx` does not exist (the TUN engine carries everything).
pub fn check(k: &KernelState, remotes: &[&Lease], out: &mut Vec<Finding>) {
    let Some(dev) = k.devices.iter().find(|d| d.name == RX_DEVICE) else {
        return;
    };
    let neigh = k
        .neighbours
        .get(&dev.index)
        .map(Vec::as_slice)
        .unwrap_or(&[]);
    let mut gateways = HashSet::new();
    for l in remotes {
        let subnet = l.key.ipv4;
        let gw = IpAddr::V4(subnet.network());
        gateways.insert(gw);
        let mac = peer_mac(l.attrs.public_ip);
        let routed = k.routes.iter().any(|r| {
            r.table == 254
                && r.kind == RouteType::Unicast
                && r.destination_net() == Some(ipnet::IpNet::V4(subnet))
                && r.gateway == Some(gw)
                && r.oif == Some(dev.index)
        });
        if !routed {
            out.push(finding(
                "route-missing",
                subnet.to_string(),
                format!(
                    "no kernel-path route to {subnet} (host {}) through {RX_DEVICE}",
                    l.attrs.public_ip
                ),
                format!("ip route replace {subnet} via {gw} dev {RX_DEVICE} onlink (or {RESTART})"),
            ));
        }
        if !neigh.iter().any(|n| n.ip == Some(gw) && n.mac == Some(mac)) {
            out.push(finding(
                "neighbour-missing",
                subnet.to_string(),
                format!(
                    "no neighbour entry {gw} lladdr {} on {RX_DEVICE}: packets to {subnet} do not reach host {}",
                    format_mac(&mac),
                    l.attrs.public_ip
                ),
                format!(
                    "ip neigh replace {gw} lladdr {} dev {RX_DEVICE} nud permanent (or {RESTART})",
                    format_mac(&mac)
                ),
            ));
        }
    }
    for n in neigh.iter().filter(|n| n.permanent) {
        let (Some(ip), Some(mac)) = (n.ip, n.mac) else {
            continue;
        };
        if mac[..2] == PEER_MAC_MARK && !gateways.contains(&ip) {
            out.push(finding(
                "stale-neighbour",
                ip.to_string(),
                format!(
                    "neighbour entry {ip} lladdr {} on {RX_DEVICE} belongs to no lease",
                    format_mac(&mac)
                ),
                format!("ip neigh del {ip} dev {RX_DEVICE}"),
            ));
        }
    }
}
