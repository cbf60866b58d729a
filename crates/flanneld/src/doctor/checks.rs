//! The doctor's judgement: pure functions from what was read (store, subnet.env, kernel) to
//! findings, so they are unit-tested without a kernel and cost microseconds per lease.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr};

use flannel_types::backend_options::{IpipOptions, VxlanOptions};
use flannel_types::NetworkConfig;
use ipnet::{IpNet, Ipv4Net};
use netlink_packet_route::route::RouteType;
use serde::Serialize;

use crate::lease::Lease;
use crate::netlink::{format_mac, parse_mac, Address, LinkDetails, Neighbour, Route};
use crate::store::StoreInspection;

/// One inconsistency and what would fix it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// A stable name for the kind of problem (`route-missing`, `stale-fdb`...).
    pub check: &'static str,
    /// What it is about (a subnet, a device, a key).
    pub subject: String,
    /// What is wrong.
    pub problem: String,
    /// What would fix it.
    pub fix: String,
}

/// The kernel state the checks look at (one network namespace).
#[derive(Debug, Default, Clone)]
pub struct KernelState {
    /// flannel's devices (names starting with `flannel`), with details.
    pub devices: Vec<LinkDetails>,
    /// Whether each device is administratively up, by index.
    pub up: HashMap<u32, bool>,
    /// Every interface's name, by index (to print routes readably).
    pub names: HashMap<u32, String>,
    /// Every address of every interface.
    pub addresses: Vec<Address>,
    /// The IPv4 main-table routes.
    pub routes: Vec<Route>,
    /// Neighbour entries of flannel's vxlan devices, by device index.
    pub neighbours: HashMap<u32, Vec<Neighbour>>,
    /// FDB entries of flannel's vxlan devices, by device index.
    pub fdb: HashMap<u32, Vec<Neighbour>>,
    /// flannel's WireGuard devices as read back (kernel or user-space), by name.
    pub wireguard: super::wg::WgDevices,
}

impl KernelState {
    fn device(&self, name: &str) -> Option<&LinkDetails> {
        self.devices.iter().find(|d| d.name == name)
    }

    fn is_local(&self, ip: IpAddr) -> bool {
        self.addresses.iter().any(|a| a.ip == ip)
    }
}

/// subnet.env as read from disk.
#[derive(Debug, Clone)]
pub enum SubnetEnvState {
    /// The file could not be read (path, error).
    Unreadable(String, String),
    /// Its variables.
    Vars(BTreeMap<String, String>),
}

/// Whether flannel's firewall rules are in place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RulesState {
    /// Neither `--ip-masq` nor forward rules are asked for.
    NotWanted,
    /// All present, in order.
    Current,
    /// Some are missing (which firewall).
    Missing(&'static str),
    /// The firewall could not be read.
    Unknown(String),
}

/// Everything the checks need.
pub struct Inputs<'a> {
    /// The network configuration from the store (or net-conf.json).
    pub config: &'a NetworkConfig,
    /// Leases read from the store.
    pub store: &'a StoreInspection,
    /// subnet.env.
    pub subnet_env: &'a SubnetEnvState,
    /// The kernel.
    pub kernel: &'a KernelState,
    /// Firewall rules.
    pub rules: RulesState,
    /// `--ip-masq`.
    pub ip_masq: bool,
    /// `--ip-blackhole-route`.
    pub blackhole_route: bool,
    /// `--public-ip`, when given.
    pub public_ip: Option<Ipv4Addr>,
    /// Kubernetes mode (public IPs may be overridden by annotations).
    pub kube: bool,
}

/// What was found, and on what.
#[derive(Debug, Clone, Serialize)]
pub struct Diagnosis {
    /// `Backend.Type`.
    pub backend: String,
    /// The IPv4 network.
    pub network: Option<String>,
    /// This host's subnet, when known.
    pub own_subnet: Option<String>,
    /// Remote leases checked.
    pub remote_leases: usize,
    /// The inconsistencies.
    pub findings: Vec<Finding>,
}

pub(super) fn finding(
    check: &'static str,
    subject: impl Into<String>,
    problem: String,
    fix: String,
) -> Finding {
    Finding {
        check,
        subject: subject.into(),
        problem,
        fix,
    }
}

pub(super) const RESTART: &str = "restart flanneld on this host (it reconciles this at start-up)";

/// The vxlan lease data a remote host announces.
fn vtep_mac(l: &Lease) -> Option<[u8; 6]> {
    let v: serde_json::Value = l.attrs.backend_data.as_ref()?.parse().ok()?;
    parse_mac(v.get("VtepMAC")?.as_str()?)
}

/// The device a backend routes remote subnets through, and the kinds it may have.
fn overlay_device(config: &NetworkConfig) -> Option<(String, &'static [&'static str])> {
    match config.backend_type.as_str() {
        "vxlan" => {
            let vni = VxlanOptions::from_backend(&config.backend)
                .map(|o| o.vni)
                .unwrap_or(1);
            Some((format!("flannel.{vni}"), &["vxlan"]))
        }
        "udp" => Some(("flannel0".into(), &["tun"])),
        "ipip" => Some(("flannel.ipip".into(), &["ipip"])),
        "wireguard" => Some(("flannel-wg".into(), &["wireguard", "tun"])),
        _ => None,
    }
}

/// Runs every check.
pub fn diagnose(inp: &Inputs<'_>) -> Diagnosis {
    let mut out = vec![];
    let config = inp.config;
    let env_vars = match inp.subnet_env {
        SubnetEnvState::Vars(v) => Some(v),
        SubnetEnvState::Unreadable(path, e) => {
            out.push(finding(
                "subnet-env-missing",
                path.clone(),
                format!("cannot read subnet.env: {e}"),
                format!("{RESTART}; it writes {path}"),
            ));
            None
        }
    };
    let env_subnet: Option<Ipv4Net> = env_vars
        .and_then(|v| v.get("FLANNEL_SUBNET"))
        .and_then(|s| s.parse::<Ipv4Net>().ok())
        .map(|n| n.trunc());
    let env_mtu: Option<u32> = env_vars
        .and_then(|v| v.get("FLANNEL_MTU"))
        .and_then(|s| s.parse().ok());

    // The store's own view.
    for (key, why) in &inp.store.rejected {
        out.push(finding(
            "bad-lease",
            key.clone(),
            format!("unusable lease in the store (every flanneld skips it): {why}"),
            if inp.kube {
                format!("fix or remove the flannel annotations of {key}")
            } else {
                format!("delete or rewrite the key: etcdctl del {key}")
            },
        ));
    }
    let mut by_ip: BTreeMap<Ipv4Addr, Vec<&Lease>> = BTreeMap::new();
    for l in &inp.store.leases {
        by_ip.entry(l.attrs.public_ip).or_default().push(l);
    }
    for (ip, ls) in by_ip.iter().filter(|(_, ls)| ls.len() > 1) {
        let subnets: Vec<String> = ls.iter().map(|l| l.key.ipv4.to_string()).collect();
        out.push(finding(
            "duplicate-public-ip",
            ip.to_string(),
            format!(
                "{} leases announce public IP {ip}: {}; peers route all of them to one host",
                ls.len(),
                subnets.join(", ")
            ),
            "give each host its own --public-ip, and delete the leases of hosts that are gone"
                .into(),
        ));
    }

    // Which lease is ours.
    // Which lease is ours: the store says, else subnet.env's, else (no subnet.env) the only one
    // announcing an address of this host.
    let own: Option<&Lease> = inp
        .store
        .own
        .as_ref()
        .or_else(|| env_subnet.and_then(|s| inp.store.leases.iter().find(|l| l.key.ipv4 == s)))
        .or_else(|| {
            let mut local = inp.store.leases.iter().filter(|l| {
                Some(l.attrs.public_ip) == inp.public_ip
                    || inp.kernel.is_local(IpAddr::V4(l.attrs.public_ip))
            });
            match (local.next(), local.next()) {
                (Some(l), None) if env_subnet.is_none() => Some(l),
                _ => None,
            }
        });
    match (own, env_subnet) {
        (None, Some(s)) => out.push(finding(
            "own-lease-missing",
            s.to_string(),
            format!("subnet.env says this host has {s}, but the store holds no lease for it"),
            format!("{RESTART}: it acquires the lease again (the same subnet when it is free)"),
        )),
        (Some(l), Some(s)) if l.key.ipv4 != s => out.push(finding(
            "subnet-env-subnet",
            s.to_string(),
            format!(
                "subnet.env says {s} but the store leases {} to this host; pods get addresses of the wrong subnet",
                l.key.ipv4
            ),
            format!("{RESTART}; it rewrites subnet.env"),
        )),
        (None, None) if env_vars.is_some() => out.push(finding(
            "subnet-env-subnet",
            "FLANNEL_SUBNET",
            "subnet.env has no valid FLANNEL_SUBNET".into(),
            format!("{RESTART}; it rewrites subnet.env"),
        )),
        _ => {}
    }
    if let (Some(vars), Some(net)) = (env_vars, config.network.filter(|_| config.enable_ipv4)) {
        let got = vars
            .get("FLANNEL_NETWORK")
            .and_then(|s| s.parse::<Ipv4Net>().ok());
        if got != Some(net) {
            out.push(finding(
                "subnet-env-network",
                "FLANNEL_NETWORK",
                format!(
                    "subnet.env has FLANNEL_NETWORK={} but the network is {net}",
                    vars.get("FLANNEL_NETWORK").map_or("(none)", String::as_str)
                ),
                format!("{RESTART}; it rewrites subnet.env"),
            ));
        }
        let masq = vars.get("FLANNEL_IPMASQ").map(String::as_str) == Some("true");
        if masq != inp.ip_masq {
            out.push(finding(
                "subnet-env-ipmasq",
                "FLANNEL_IPMASQ",
                format!(
                    "subnet.env has FLANNEL_IPMASQ={masq} but flanneld runs with --ip-masq={}",
                    inp.ip_masq
                ),
                format!("{RESTART}; it rewrites subnet.env"),
            ));
        }
    }
    if let Some(l) = own {
        let ip = IpAddr::V4(l.attrs.public_ip);
        if !inp.kube && Some(l.attrs.public_ip) != inp.public_ip && !inp.kernel.is_local(ip) {
            out.push(finding(
                "public-ip-not-local",
                l.attrs.public_ip.to_string(),
                format!(
                    "this host's lease {} announces public IP {ip}, which is not an address of this host",
                    l.key
                ),
                "pass the right --public-ip / --iface, or delete the stale lease".into(),
            ));
        }
    }

    let own_key = own.map(|l| l.key);
    let remotes: Vec<&Lease> = inp
        .store
        .leases
        .iter()
        .filter(|l| Some(l.key) != own_key)
        .collect();

    // The overlay device.
    let device = overlay_device(config);
    let mut dev: Option<&LinkDetails> = None;
    if let Some((name, kinds)) = &device {
        match inp.kernel.device(name) {
            None => out.push(finding(
                "device-missing",
                name.clone(),
                format!("the {} device {name} does not exist", config.backend_type),
                RESTART.into(),
            )),
            Some(d) => {
                dev = Some(d);
                let kind = d.kind.clone().unwrap_or_default();
                if !kinds.contains(&kind.as_str()) {
                    out.push(finding(
                        "device-kind",
                        name.clone(),
                        format!("{name} is a {kind:?} device, not {}", kinds.join(" or ")),
                        format!("ip link delete {name}, then {RESTART}"),
                    ));
                }
                if inp.kernel.up.get(&d.index) == Some(&false) {
                    out.push(finding(
                        "device-down",
                        name.clone(),
                        format!("{name} is down"),
                        format!("ip link set dev {name} up"),
                    ));
                }
                if let Some(mtu) = env_mtu.filter(|m| *m != d.mtu) {
                    out.push(finding(
                        "mtu",
                        name.clone(),
                        format!(
                            "{name} has MTU {} but subnet.env gives pods FLANNEL_MTU={mtu}",
                            d.mtu
                        ),
                        format!("ip link set dev {name} mtu {mtu} (or {RESTART})"),
                    ));
                }
                if let Some(l) = own.filter(|_| config.backend_type != "udp") {
                    let want = IpAddr::V4(l.key.ipv4.network());
                    if !inp
                        .kernel
                        .addresses
                        .iter()
                        .any(|a| a.index == d.index && a.ip == want)
                    {
                        out.push(finding(
                            "address-missing",
                            name.clone(),
                            format!("{name} lacks its address {want}/32"),
                            format!("ip addr add {want}/32 dev {name} (or {RESTART})"),
                        ));
                    }
                }
            }
        }
    }

    // Routes.
    let mut routes: HashMap<IpNet, Vec<&Route>> = HashMap::new();
    for r in &inp.kernel.routes {
        if r.table != 254 {
            continue;
        }
        if let Some(n) = r.destination_net() {
            routes.entry(n).or_default().push(r);
        }
    }
    let backend = config.backend_type.as_str();
    let direct = match backend {
        "vxlan" => VxlanOptions::from_backend(&config.backend)
            .map(|o| o.direct_routing)
            .unwrap_or(false),
        "ipip" => IpipOptions::from_backend(&config.backend)
            .map(|o| o.direct_routing)
            .unwrap_or(false),
        _ => false,
    };
    let per_peer_routes = matches!(backend, "vxlan" | "host-gw" | "ipip");
    let mut vteps: HashMap<[u8; 6], IpAddr> = HashMap::new();
    let mut gateways: HashSet<IpAddr> = HashSet::new();
    let mut remote_subnets: HashSet<IpNet> = HashSet::new();
    for l in &remotes {
        let subnet = IpNet::V4(l.key.ipv4);
        remote_subnets.insert(subnet);
        if !per_peer_routes {
            continue;
        }
        if l.attrs.backend_type != backend {
            out.push(finding(
                "foreign-backend",
                l.key.ipv4.to_string(),
                format!(
                    "lease {} is of backend {:?}, this host runs {backend:?}: its pods are unreachable from here",
                    l.key, l.attrs.backend_type
                ),
                "run every host of the network with the same backend".into(),
            ));
            continue;
        }
        let public = IpAddr::V4(l.attrs.public_ip);
        let (gateway, oif) = match backend {
            "vxlan" => (IpAddr::V4(l.key.ipv4.network()), dev.map(|d| d.index)),
            "ipip" => (public, dev.map(|d| d.index)),
            _ => (public, None),
        };
        let found = routes.get(&subnet).is_some_and(|rs| {
            rs.iter().any(|r| {
                r.kind == RouteType::Unicast
                    && ((r.gateway == Some(gateway) && (oif.is_none() || r.oif == oif))
                        || (direct && r.gateway == Some(public)))
            })
        });
        if !found {
            let how = match (backend, dev) {
                ("vxlan" | "ipip", Some(d)) => format!(
                    "ip route replace {subnet} via {gateway} dev {} onlink",
                    d.name
                ),
                _ => format!("ip route replace {subnet} via {public}"),
            };
            let problem = match routes.get(&subnet) {
                Some(rs) => format!(
                    "the route to {subnet} (host {public}) is wrong: {}",
                    rs.iter()
                        .map(|r| describe_route(inp.kernel, r))
                        .collect::<Vec<_>>()
                        .join("; ")
                ),
                None => format!("no route to {subnet} (host {public})"),
            };
            out.push(finding(
                "route-missing",
                subnet.to_string(),
                problem,
                format!("{how} (or {RESTART})"),
            ));
        }
        if backend == "vxlan" {
            match vtep_mac(l) {
                Some(mac) => {
                    vteps.insert(mac, public);
                    gateways.insert(gateway);
                    // A peer reached by DirectRouting has a plain route and no neighbour/FDB.
                    let routed_directly = direct
                        && routes
                            .get(&subnet)
                            .is_some_and(|rs| rs.iter().any(|r| r.gateway == Some(public)));
                    if let (Some(d), false) = (dev, routed_directly) {
                        check_vxlan_peer(inp.kernel, d, l, gateway, mac, public, &mut out);
                    }
                }
                None => out.push(finding(
                    "bad-lease",
                    l.key.ipv4.to_string(),
                    format!("vxlan lease {} has no valid VtepMAC", l.key),
                    "the host owning it must restart flanneld (it rewrites its lease)".into(),
                )),
            }
        }
    }
    // Whole-network routes of the TUN backends.
    if let (Some(net), Some(d)) = (config.network, dev) {
        if matches!(backend, "udp" | "wireguard") {
            let n = IpNet::V4(net);
            let ok = routes
                .get(&n)
                .is_some_and(|rs| rs.iter().any(|r| r.oif == Some(d.index)));
            if !ok {
                out.push(finding(
                    "route-missing",
                    n.to_string(),
                    format!("no route to the flannel network {n} through {}", d.name),
                    format!("ip route replace {n} dev {} (or {RESTART})", d.name),
                ));
            }
        }
    }
    // Routes into the network that no lease explains.
    if let Some(net) = config.network {
        let net = IpNet::V4(net);
        let own_subnet = own.map(|l| IpNet::V4(l.key.ipv4));
        let mut extra: Vec<&Route> = inp
            .kernel
            .routes
            .iter()
            .filter(|r| r.table == 254 && r.kind == RouteType::Unicast)
            .filter(|r| {
                r.destination_net().is_some_and(|d| {
                    d.prefix_len() > net.prefix_len()
                        && net.contains(&d)
                        && Some(d) != own_subnet
                        && !remote_subnets.contains(&d)
                })
            })
            .collect();
        extra.sort_by_key(|r| r.destination_net());
        for r in extra {
            let d = r
                .destination_net()
                .map(|d| d.to_string())
                .unwrap_or_default();
            out.push(finding(
                "extra-route",
                d.clone(),
                format!(
                    "route {} points into the flannel network but no lease has {d}: traffic to it goes nowhere",
                    describe_route(inp.kernel, r)
                ),
                format!("ip route del {d}"),
            ));
        }
        if inp.blackhole_route {
            if let Some(s) = own_subnet {
                let present = routes
                    .get(&s)
                    .is_some_and(|rs| rs.iter().any(|r| r.kind == RouteType::BlackHole));
                if !present {
                    out.push(finding(
                        "blackhole-missing",
                        s.to_string(),
                        format!(
                            "--ip-blackhole-route is set but there is no blackhole route for {s}"
                        ),
                        format!("ip route add blackhole {s} (or {RESTART})"),
                    ));
                }
            }
        }
    }
    // vxlan FDB / neighbour entries that no lease explains.
    if let (Some(d), "vxlan") = (dev, backend) {
        let fdb = inp
            .kernel
            .fdb
            .get(&d.index)
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        for e in fdb {
            let Some(mac) = e.mac.filter(|m| *m != [0; 6]) else {
                continue;
            };
            if !vteps.contains_key(&mac) && e.dst.is_some() {
                out.push(finding(
                    "stale-fdb",
                    format_mac(&mac),
                    format!(
                        "fdb entry {} dst {} on {} belongs to no lease",
                        format_mac(&mac),
                        e.dst.map(|i| i.to_string()).unwrap_or_default(),
                        d.name
                    ),
                    format!("bridge fdb del {} dev {}", format_mac(&mac), d.name),
                ));
            }
        }
        let neigh = inp
            .kernel
            .neighbours
            .get(&d.index)
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        for n in neigh.iter().filter(|n| n.permanent) {
            let Some(ip) = n.ip.filter(|ip| ip.is_ipv4()) else {
                continue;
            };
            if !gateways.contains(&ip) {
                out.push(finding(
                    "stale-neighbour",
                    ip.to_string(),
                    format!("neighbour entry {ip} on {} belongs to no lease", d.name),
                    format!("ip neigh del {ip} dev {}", d.name),
                ));
            }
        }
    }
    if backend == "wireguard" {
        super::wg::check(&inp.kernel.wireguard, own, &remotes, &mut out);
    }
    if backend == "udp" {
        super::udp::check(inp.kernel, &remotes, &mut out);
    }
    match &inp.rules {
        RulesState::NotWanted | RulesState::Current => {}
        RulesState::Missing(fw) => out.push(finding(
            "rules-missing",
            *fw,
            format!(
                "flannel's {fw} masquerade/forward rules are missing or out of order{}",
                if inp.ip_masq {
                    " (pods' traffic to the outside is not masqueraded)"
                } else {
                    ""
                }
            ),
            format!(
                "{RESTART} (a running flanneld restores them within --iptables-resync seconds)"
            ),
        )),
        RulesState::Unknown(e) => out.push(finding(
            "rules-unreadable",
            "firewall",
            format!("cannot read the firewall rules: {e}"),
            "run doctor as root, with iptables/nft installed".into(),
        )),
    }

    Diagnosis {
        backend: config.backend_type.clone(),
        network: config.network.map(|n| n.to_string()),
        own_subnet: own.map(|l| l.key.ipv4.to_string()),
        remote_leases: remotes.len(),
        findings: out,
    }
}

fn check_vxlan_peer(
    k: &KernelState,
    d: &LinkDetails,
    l: &Lease,
    gateway: IpAddr,
    mac: [u8; 6],
    public: IpAddr,
    out: &mut Vec<Finding>,
) {
    let neigh = k.neighbours.get(&d.index).map(Vec::as_slice).unwrap_or(&[]);
    if !neigh
        .iter()
        .any(|n| n.ip == Some(gateway) && n.mac == Some(mac))
    {
        out.push(finding(
            "neighbour-missing",
            l.key.ipv4.to_string(),
            format!(
                "no neighbour entry {gateway} lladdr {} on {} for host {public}",
                format_mac(&mac),
                d.name
            ),
            format!(
                "ip neigh replace {gateway} lladdr {} dev {} nud permanent (or {RESTART})",
                format_mac(&mac),
                d.name
            ),
        ));
    }
    let fdb = k.fdb.get(&d.index).map(Vec::as_slice).unwrap_or(&[]);
    if !fdb
        .iter()
        .any(|e| e.mac == Some(mac) && e.dst == Some(public))
    {
        out.push(finding(
            "fdb-missing",
            l.key.ipv4.to_string(),
            format!(
                "no fdb entry {} dst {public} on {} (host {public})",
                format_mac(&mac),
                d.name
            ),
            format!(
                "bridge fdb replace {} dev {} dst {public} self permanent (or {RESTART})",
                format_mac(&mac),
                d.name
            ),
        ));
    }
}

fn describe_route(k: &KernelState, r: &Route) -> String {
    let mut s = r
        .destination_net()
        .map(|d| d.to_string())
        .unwrap_or_default();
    if r.kind == RouteType::BlackHole {
        s = format!("blackhole {s}");
    }
    if let Some(g) = r.gateway {
        s.push_str(&format!(" via {g}"));
    }
    if let Some(o) = r.oif {
        match k.names.get(&o) {
            Some(n) => s.push_str(&format!(" dev {n}")),
            None => s.push_str(&format!(" dev #{o}")),
        }
    }
    if r.onlink {
        s.push_str(" onlink");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use flannel_types::{LeaseAttrs, SubnetKey};
    use netlink_packet_route::address::{AddressFlags, AddressScope};
    use netlink_packet_route::route::RouteProtocol;

    fn lease(subnet: &str, ip: &str, backend: &str) -> Lease {
        let mut attrs = LeaseAttrs::public_only(ip.parse().unwrap());
        attrs.backend_type = backend.into();
        Lease {
            key: SubnetKey::new(subnet.parse().unwrap(), None),
            attrs,
            expiration: None,
            ttl_id: 0,
        }
    }

    fn route(dst: &str, gw: Option<&str>, oif: u32) -> Route {
        let n: IpNet = dst.parse().unwrap();
        Route {
            kind: RouteType::Unicast,
            table: 254,
            protocol: RouteProtocol::Boot,
            onlink: false,
            destination: Some(n.addr()),
            prefix_len: n.prefix_len(),
            gateway: gw.map(|g| g.parse().unwrap()),
            oif: Some(oif),
            pref_source: None,
        }
    }

    fn kernel(routes: Vec<Route>) -> KernelState {
        KernelState {
            names: [(2, "eth0".to_string())].into(),
            up: [(2, true)].into(),
            addresses: vec![Address {
                index: 2,
                ip: "192.168.1.1".parse().unwrap(),
                prefix_len: 24,
                scope: AddressScope::Universe,
                flags: AddressFlags::empty(),
            }],
            routes,
            ..Default::default()
        }
    }

    fn env(subnet: &str, mtu: u32) -> SubnetEnvState {
        SubnetEnvState::Vars(
            [
                ("FLANNEL_NETWORK".to_string(), "10.9.0.0/16".to_string()),
                ("FLANNEL_SUBNET".to_string(), subnet.to_string()),
                ("FLANNEL_MTU".to_string(), mtu.to_string()),
                ("FLANNEL_IPMASQ".to_string(), "false".to_string()),
            ]
            .into(),
        )
    }

    fn run(
        config: &str,
        leases: Vec<Lease>,
        k: &KernelState,
        e: &SubnetEnvState,
    ) -> Vec<&'static str> {
        let config = NetworkConfig::parse_and_check(config).unwrap();
        let store = StoreInspection {
            leases,
            ..Default::default()
        };
        let d = diagnose(&Inputs {
            config: &config,
            store: &store,
            subnet_env: e,
            kernel: k,
            rules: RulesState::NotWanted,
            ip_masq: false,
            blackhole_route: false,
            public_ip: None,
            kube: false,
        });
        d.findings.iter().map(|f| f.check).collect()
    }

    const HOSTGW: &str = r#"{"Network":"10.9.0.0/16","Backend":{"Type":"host-gw"}}"#;

    #[test]
    fn host_gw_agrees_then_reports_missing_and_extra_routes() {
        let leases = vec![
            lease("10.9.1.0/24", "192.168.1.1", "host-gw"),
            lease("10.9.2.0/24", "192.168.1.2", "host-gw"),
        ];
        let e = env("10.9.1.1/24", 1500);
        let good = kernel(vec![route("10.9.2.0/24", Some("192.168.1.2"), 2)]);
        assert_eq!(run(HOSTGW, leases.clone(), &good, &e), Vec::<&str>::new());

        let drift = kernel(vec![route("10.9.3.0/24", Some("192.168.1.3"), 2)]);
        assert_eq!(
            run(HOSTGW, leases, &drift, &e),
            vec!["route-missing", "extra-route"]
        );
    }

    #[test]
    fn subnet_env_and_store_disagreements() {
        let leases = vec![
            lease("10.9.1.0/24", "192.168.1.1", "host-gw"),
            lease("10.9.2.0/24", "192.168.1.1", "host-gw"),
        ];
        let k = kernel(vec![]);
        // subnet.env names a subnet the store does not hold; two leases share a public IP.
        let found = run(HOSTGW, leases, &k, &env("10.9.7.1/24", 1500));
        assert!(found.contains(&"own-lease-missing"), "{found:?}");
        assert!(found.contains(&"duplicate-public-ip"), "{found:?}");
        let found = run(
            HOSTGW,
            vec![lease("10.9.1.0/24", "192.168.1.1", "host-gw")],
            &k,
            &SubnetEnvState::Unreadable("/run/flannel/subnet.env".into(), "No such file".into()),
        );
        assert_eq!(found, vec!["subnet-env-missing"]);
    }

    #[test]
    fn udp_needs_its_device_and_network_route() {
        let config = r#"{"Network":"10.9.0.0/16","Backend":{"Type":"udp"}}"#;
        let leases = vec![
            lease("10.9.1.0/24", "192.168.1.1", ""),
            lease("10.9.2.0/24", "192.168.1.2", ""),
        ];
        let e = env("10.9.1.1/24", 1472);
        assert_eq!(
            run(config, leases.clone(), &kernel(vec![]), &e),
            vec!["device-missing"]
        );
        let mut k = kernel(vec![route("10.9.0.0/16", None, 3)]);
        k.devices.push(LinkDetails {
            index: 3,
            name: "flannel0".into(),
            mtu: 1472,
            kind: Some("tun".into()),
            ..Default::default()
        });
        k.up.insert(3, true);
        assert_eq!(run(config, leases.clone(), &k, &e), Vec::<&str>::new());
        k.routes.clear();
        assert_eq!(run(config, leases, &k, &e), vec!["route-missing"]);
    }
}
