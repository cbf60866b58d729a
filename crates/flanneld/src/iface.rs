//! Choosing the external interface and the public address other hosts reach this one on.
//!
//! Wrong choices on multi-NIC hosts are a top complaint, so the rules are the reference's
//! (`--iface` names or IPs, then `--iface-regex`, then `--iface-can-reach`, else the default
//! route) and every failure says what was looked at.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use netlink_packet_route::address::{AddressFlags, AddressScope};
use regex::Regex;

use crate::netlink::{Address, Link, Netlink, NetlinkError};

/// Why no usable interface was found.
#[derive(Debug, thiserror::Error)]
pub enum IfaceError {
    /// The kernel could not be asked.
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    /// A specific lookup failed.
    #[error("{0}")]
    NotFound(String),
    /// A `--iface-regex` value is not a valid regular expression.
    #[error("invalid --iface-regex {0:?}: {1}")]
    BadRegex(String, regex::Error),
}

/// Which address families the network uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpStack {
    /// IPv4 enabled.
    pub v4: bool,
    /// IPv6 enabled.
    pub v6: bool,
}

/// The interface chosen for overlay traffic and the addresses used on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExternalInterface {
    /// Interface name.
    pub name: String,
    /// Interface index.
    pub index: u32,
    /// Interface MTU (backends subtract their overhead).
    pub mtu: u32,
    /// The interface's own IPv4 address.
    pub iface_addr: Option<Ipv4Addr>,
    /// The interface's own IPv6 address.
    pub iface_v6_addr: Option<Ipv6Addr>,
    /// The IPv4 address advertised to others (`--public-ip` or the interface address).
    pub ext_addr: Option<Ipv4Addr>,
    /// The IPv6 address advertised to others.
    pub ext_v6_addr: Option<Ipv6Addr>,
}

/// The operator's interface-selection flags.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    /// `--iface` values (names or IPs), tried in order.
    pub ifaces: Vec<String>,
    /// `--iface-regex` values, tried after `ifaces`.
    pub regexes: Vec<String>,
    /// `--iface-can-reach` address.
    pub can_reach: Option<IpAddr>,
    /// `--public-ip`.
    pub public_ip: Option<Ipv4Addr>,
    /// `--public-ipv6`.
    pub public_ipv6: Option<Ipv6Addr>,
}

struct Snapshot {
    links: Vec<Link>,
    addrs: Vec<Address>,
}

impl Snapshot {
    fn link_by_index(&self, index: u32) -> Option<&Link> {
        self.links.iter().find(|l| l.index == index)
    }

    fn link_by_ip(&self, ip: IpAddr) -> Option<&Link> {
        let a = self.addrs.iter().find(|a| a.ip == ip)?;
        self.link_by_index(a.index)
    }

    /// The best address of a family on a link, per the reference's preference order.
    fn best_addr(&self, index: u32, v6: bool) -> Option<IpAddr> {
        let mut candidates: Vec<&Address> = self
            .addrs
            .iter()
            .filter(|a| a.index == index && a.ip.is_ipv6() == v6)
            .filter(|a| usable(a.ip) && !a.flags.contains(AddressFlags::Deprecated))
            .collect();
        candidates.sort_by_key(|a| {
            (
                a.scope != AddressScope::Universe || is_link_local(a.ip),
                !a.flags.contains(AddressFlags::Permanent) && a.ip.is_ipv6(),
                a.flags.contains(AddressFlags::Secondary),
            )
        });
        candidates.first().map(|a| a.ip)
    }

    fn describe(&self) -> String {
        self.links
            .iter()
            .map(|l| {
                let addrs: Vec<String> = self
                    .addrs
                    .iter()
                    .filter(|a| a.index == l.index)
                    .map(|a| a.ip.to_string())
                    .collect();
                format!("{}:[{}]", l.name, addrs.join(" "))
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

fn is_link_local(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => a.is_link_local(),
        IpAddr::V6(a) => (a.segments()[0] & 0xffc0) == 0xfe80,
    }
}

/// Global unicast or link-local unicast, as Go's address filter accepts.
fn usable(ip: IpAddr) -> bool {
    !(ip.is_loopback()
        || ip.is_multicast()
        || ip.is_unspecified()
        || matches!(ip, IpAddr::V4(a) if a.is_broadcast()))
}

enum Lookup<'a> {
    Name(&'a str),
    Ip(IpAddr),
    Regex(&'a Regex),
    CanReach(IpAddr),
    Default,
}

/// Picks the external interface as the reference's `LookupExtIface` sequence does.
pub async fn select(
    nl: &Netlink,
    sel: &Selection,
    stack: IpStack,
) -> Result<ExternalInterface, IfaceError> {
    let snap = Snapshot {
        links: nl.links().await?,
        addrs: nl.addresses().await?,
    };
    if sel.ifaces.is_empty() && sel.regexes.is_empty() && sel.can_reach.is_none() {
        let how = match (sel.public_ip, sel.public_ipv6) {
            (Some(ip), _) => Lookup::Ip(IpAddr::V4(ip)),
            (None, Some(ip)) => Lookup::Ip(IpAddr::V6(ip)),
            (None, None) => Lookup::Default,
        };
        return lookup(nl, &snap, how, sel, stack).await;
    }
    let mut last_err = None;
    for iface in &sel.ifaces {
        let how = match iface.parse::<IpAddr>() {
            Ok(ip) => Lookup::Ip(ip),
            Err(_) => Lookup::Name(iface),
        };
        match lookup(nl, &snap, how, sel, stack).await {
            Ok(ext) => return Ok(ext),
            Err(e) => {
                tracing::info!("Could not find valid interface matching {iface}: {e}");
                last_err = Some(e);
            }
        }
    }
    for pattern in &sel.regexes {
        let re = Regex::new(pattern).map_err(|e| IfaceError::BadRegex(pattern.clone(), e))?;
        match lookup(nl, &snap, Lookup::Regex(&re), sel, stack).await {
            Ok(ext) => return Ok(ext),
            Err(e) => {
                tracing::info!("Could not find valid interface matching {pattern}: {e}");
                last_err = Some(e);
            }
        }
    }
    if let Some(dst) = sel.can_reach {
        match lookup(nl, &snap, Lookup::CanReach(dst), sel, stack).await {
            Ok(ext) => return Ok(ext),
            Err(e) => {
                tracing::info!("Could not find valid interface matching ifaceCanReach: {dst}: {e}");
                last_err = Some(e);
            }
        }
    }
    Err(IfaceError::NotFound(format!(
        "Failed to find interface to use that matches the interfaces and/or regexes provided{}",
        last_err
            .map(|e| format!(" (last error: {e})"))
            .unwrap_or_default()
    )))
}

async fn lookup(
    nl: &Netlink,
    snap: &Snapshot,
    how: Lookup<'_>,
    sel: &Selection,
    stack: IpStack,
) -> Result<ExternalInterface, IfaceError> {
    let not_found = |m: String| IfaceError::NotFound(m);
    let mut iface_addr: Option<Ipv4Addr> = None;
    let mut iface_v6_addr: Option<Ipv6Addr> = None;
    let link: Link = match how {
        Lookup::Name(name) => snap
            .links
            .iter()
            .find(|l| l.name == name)
            .cloned()
            .ok_or_else(|| {
                not_found(format!("error looking up interface {name}: Link not found"))
            })?,
        Lookup::Ip(ip) => {
            let l = snap.link_by_ip(ip).cloned().ok_or_else(|| {
                not_found(format!(
                    "error looking up interface {ip}: no interface with given IP found"
                ))
            })?;
            match ip {
                IpAddr::V4(a) => iface_addr = Some(a),
                IpAddr::V6(a) => iface_v6_addr = Some(a),
            }
            l
        }
        Lookup::Regex(re) => {
            let by_ip = snap.addrs.iter().find(|a| {
                usable(a.ip)
                    && ((stack.v4 && a.ip.is_ipv4()) || (stack.v6 && a.ip.is_ipv6()))
                    && re.is_match(&a.ip.to_string())
            });
            match by_ip {
                Some(a) => {
                    match a.ip {
                        IpAddr::V4(v) => iface_addr = Some(v),
                        IpAddr::V6(v) => iface_v6_addr = Some(v),
                    }
                    snap.link_by_index(a.index).cloned().ok_or_else(|| {
                        not_found(format!("interface of address {} vanished", a.ip))
                    })?
                }
                None => snap
                    .links
                    .iter()
                    .find(|l| re.is_match(&l.name))
                    .cloned()
                    .ok_or_else(|| {
                        not_found(format!(
                            "Could not match pattern {} to any of the available network interfaces ({})",
                            re.as_str(),
                            snap.describe()
                        ))
                    })?,
            }
        }
        Lookup::CanReach(dst) => {
            let routes = nl.route_get(dst).await?;
            let r = routes
                .first()
                .ok_or_else(|| not_found(format!("no route to {dst}")))?;
            let oif = r
                .oif
                .ok_or_else(|| not_found(format!("route to {dst} has no interface")))?;
            match r.pref_source {
                Some(IpAddr::V4(a)) => iface_addr = Some(a),
                Some(IpAddr::V6(a)) => iface_v6_addr = Some(a),
                None => {}
            }
            snap.link_by_index(oif)
                .cloned()
                .ok_or_else(|| not_found(format!("interface {oif} of route to {dst} vanished")))?
        }
        Lookup::Default => default_route_link(nl, snap, stack).await?,
    };
    if stack.v4 && iface_addr.is_none() {
        iface_addr = match snap.best_addr(link.index, false) {
            Some(IpAddr::V4(a)) => Some(a),
            _ => {
                return Err(not_found(format!(
                    "failed to find IPv4 address for interface {}",
                    link.name
                )))
            }
        };
    }
    if stack.v6 && iface_v6_addr.is_none() {
        iface_v6_addr = match snap.best_addr(link.index, true) {
            Some(IpAddr::V6(a)) => Some(a),
            _ => {
                return Err(not_found(format!(
                    "failed to find IPv6 address for interface {}",
                    link.name
                )))
            }
        };
    }
    if link.mtu == 0 {
        return Err(not_found(format!(
            "failed to determine MTU for {} interface",
            link.name
        )));
    }
    Ok(ExternalInterface {
        name: link.name.clone(),
        index: link.index,
        mtu: link.mtu,
        iface_addr,
        iface_v6_addr,
        ext_addr: if stack.v4 {
            sel.public_ip.or(iface_addr)
        } else {
            None
        },
        ext_v6_addr: if stack.v6 {
            sel.public_ipv6.or(iface_v6_addr)
        } else {
            None
        },
    })
}

async fn default_route_link(
    nl: &Netlink,
    snap: &Snapshot,
    stack: IpStack,
) -> Result<Link, IfaceError> {
    let find = |routes: Vec<crate::netlink::Route>| {
        routes
            .into_iter()
            .find(|r| r.prefix_len == 0 && r.oif.is_some())
            .and_then(|r| r.oif)
    };
    let v4 = if stack.v4 {
        find(nl.routes(false).await?)
    } else {
        None
    };
    let v6 = if stack.v6 {
        find(nl.routes(true).await?)
    } else {
        None
    };
    let no_default = || {
        IfaceError::NotFound("failed to get default interface: unable to find default route".into())
    };
    let index = if stack.v4 && stack.v6 {
        match (v4, v6) {
            (Some(a), Some(b)) if a == b => a,
            (Some(_), Some(_)) => {
                return Err(IfaceError::NotFound(
                    "failed to get default interface: IPv4 and IPv6 default routes use different interfaces"
                        .into(),
                ))
            }
            _ => {
                return Err(IfaceError::NotFound(
                    "failed to get default interface: dual-stack needs both an IPv4 and an IPv6 default route"
                        .into(),
                ))
            }
        }
    } else if stack.v4 {
        v4.ok_or_else(no_default)?
    } else {
        v6.ok_or_else(no_default)?
    };
    snap.link_by_index(index)
        .cloned()
        .ok_or_else(|| IfaceError::NotFound(format!("default route interface {index} not found")))
}
