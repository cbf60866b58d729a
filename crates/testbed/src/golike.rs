//! Hosts configured by hand exactly as Go flannel's vxlan backend configures them, for interop
//! tests: the device and the per-peer entries are made with `ip`/`bridge`, not by our code.

use crate::netns::NetNs;

/// Makes Go flannel's `flannel.1` (VNI 1, port 8472, nolearning, MTU 1450) with `mac`, local
/// address `local`, the `<subnet net>/32` address, and a `cni0` bridge holding `<subnet .1>/24`.
/// `subnet_net` is the subnet's network address, e.g. `10.5.250.0`.
pub fn go_vxlan_device(ns: &NetNs, local: &str, mac: &str, subnet_net: &str) {
    let bridge_addr = format!("{}.1/24", subnet_net.trim_end_matches(".0"));
    for args in [
        vec![
            "link",
            "add",
            "flannel.1",
            "type",
            "vxlan",
            "id",
            "1",
            "local",
            local,
            "dev",
            "eth0",
            "nolearning",
            "dstport",
            "8472",
        ],
        vec![
            "link",
            "set",
            "flannel.1",
            "address",
            mac,
            "mtu",
            "1450",
            "up",
        ],
        vec![
            "addr",
            "add",
            &format!("{subnet_net}/32"),
            "dev",
            "flannel.1",
        ],
        vec!["link", "add", "cni0", "type", "bridge"],
        vec!["addr", "add", &bridge_addr, "dev", "cni0"],
        vec!["link", "set", "cni0", "up"],
    ] {
        ns.ip(&args);
    }
}

/// Adds what Go flannel adds for a peer's lease: a permanent neighbour for the peer's subnet
/// address, a `self permanent` FDB entry towards its public IP, and the onlink route.
/// `subnet` is the peer's subnet in CIDR form (`10.5.1.0/24`).
pub fn go_vxlan_peer(ns: &NetNs, subnet: &str, mac: &str, public_ip: &str) {
    let gw = subnet.split('/').next().unwrap_or(subnet);
    ns.ip(&[
        "neigh",
        "replace",
        gw,
        "lladdr",
        mac,
        "dev",
        "flannel.1",
        "nud",
        "permanent",
    ]);
    ns.run(
        "bridge",
        &[
            "fdb",
            "replace",
            mac,
            "dev",
            "flannel.1",
            "dst",
            public_ip,
            "self",
            "permanent",
        ],
    );
    ns.ip(&[
        "route",
        "replace",
        subnet,
        "via",
        gw,
        "dev",
        "flannel.1",
        "onlink",
    ]);
}
