//! The only module that speaks rtnetlink.
//!
//! Everything else asks for links, addresses and routes in domain terms; this module knows how
//! to build and read the netlink messages, and puts the object name into every error.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures::TryStreamExt;
use netlink_packet_route::address::{AddressAttribute, AddressFlags, AddressScope};
use netlink_packet_route::link::{LinkAttribute, LinkFlags};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteMessage};
use netlink_packet_route::AddressFamily;
use rtnetlink::{Handle, RouteMessageBuilder};

/// A netlink failure, with what was being done.
#[derive(Debug, thiserror::Error)]
#[error("{context}: {source}")]
pub struct NetlinkError {
    context: String,
    #[source]
    source: rtnetlink::Error,
}

/// Failure to open the netlink socket at all.
#[derive(Debug, thiserror::Error)]
#[error("failed to open a netlink socket: {0}")]
pub struct OpenError(#[from] std::io::Error);

fn wrap(context: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetlinkError {
    let context = context.into();
    move |source| NetlinkError { context, source }
}

/// A network interface as flannel needs to know it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    /// Kernel interface index.
    pub index: u32,
    /// Interface name.
    pub name: String,
    /// Current MTU.
    pub mtu: u32,
    /// Whether the interface is administratively up.
    pub up: bool,
}

/// An address configured on an interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address {
    /// Interface index the address is on.
    pub index: u32,
    /// The address itself.
    pub ip: IpAddr,
    /// Prefix length of the address.
    pub prefix_len: u8,
    /// Address scope (global, link, host).
    pub scope: AddressScope,
    /// IFA flags (deprecated, permanent, temporary...).
    pub flags: AddressFlags,
}

/// A route as read from the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Destination network address (unspecified for a default route).
    pub destination: Option<IpAddr>,
    /// Destination prefix length.
    pub prefix_len: u8,
    /// Gateway, if any.
    pub gateway: Option<IpAddr>,
    /// Output interface index.
    pub oif: Option<u32>,
    /// Preferred source address.
    pub pref_source: Option<IpAddr>,
}

/// A handle on the kernel's routing netlink socket of the current network namespace.
#[derive(Clone)]
pub struct Netlink {
    handle: Handle,
}

impl Netlink {
    /// Opens a netlink connection (must run inside a tokio runtime).
    pub fn open() -> Result<Self, OpenError> {
        let (conn, handle, _) = rtnetlink::new_connection()?;
        tokio::spawn(conn);
        Ok(Netlink { handle })
    }

    /// All interfaces.
    pub async fn links(&self) -> Result<Vec<Link>, NetlinkError> {
        let msgs: Vec<_> = self
            .handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(wrap("failed to list links"))?;
        Ok(msgs
            .into_iter()
            .map(|m| {
                let mut link = Link {
                    index: m.header.index,
                    name: String::new(),
                    mtu: 0,
                    up: m.header.flags.contains(LinkFlags::Up),
                };
                for a in m.attributes {
                    match a {
                        LinkAttribute::IfName(n) => link.name = n,
                        LinkAttribute::Mtu(mtu) => link.mtu = mtu,
                        _ => {}
                    }
                }
                link
            })
            .collect())
    }

    /// All addresses of all interfaces.
    pub async fn addresses(&self) -> Result<Vec<Address>, NetlinkError> {
        let msgs: Vec<_> = self
            .handle
            .address()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(wrap("failed to list addresses"))?;
        let mut out = vec![];
        for m in msgs {
            let mut ip = None;
            let mut local = None;
            let mut flags = AddressFlags::from_bits_retain(m.header.flags.bits() as u32);
            for a in m.attributes {
                match a {
                    AddressAttribute::Address(a) => ip = Some(a),
                    AddressAttribute::Local(a) => local = Some(a),
                    AddressAttribute::Flags(f) => flags = f,
                    _ => {}
                }
            }
            // For IPv4 IFA_LOCAL is the interface's own address (IFA_ADDRESS is the peer on
            // point-to-point links).
            if let Some(ip) = local.or(ip) {
                out.push(Address {
                    index: m.header.index,
                    ip,
                    prefix_len: m.header.prefix_len,
                    scope: m.header.scope,
                    flags,
                });
            }
        }
        Ok(out)
    }

    /// The routes of the main table for one address family.
    pub async fn routes(&self, ipv6: bool) -> Result<Vec<Route>, NetlinkError> {
        let msg = if ipv6 {
            RouteMessageBuilder::<Ipv6Addr>::new().build()
        } else {
            RouteMessageBuilder::<Ipv4Addr>::new().build()
        };
        let msgs: Vec<_> = self
            .handle
            .route()
            .get(msg)
            .execute()
            .try_collect()
            .await
            .map_err(wrap("failed to list routes"))?;
        Ok(msgs.into_iter().map(route_from_message).collect())
    }

    /// The route the kernel would use to reach `dst` (like `ip route get`).
    pub async fn route_get(&self, dst: IpAddr) -> Result<Vec<Route>, NetlinkError> {
        let msg = match dst {
            IpAddr::V4(a) => RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(a, 32)
                .build(),
            IpAddr::V6(a) => RouteMessageBuilder::<Ipv6Addr>::new()
                .destination_prefix(a, 128)
                .build(),
        };
        let msgs: Vec<_> = self
            .handle
            .route()
            .get(msg)
            .execute()
            .try_collect()
            .await
            .map_err(wrap(format!("failed to look up the route to {dst}")))?;
        Ok(msgs.into_iter().map(route_from_message).collect())
    }
}

fn route_addr(a: RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(a) => Some(IpAddr::V4(a)),
        RouteAddress::Inet6(a) => Some(IpAddr::V6(a)),
        _ => None,
    }
}

fn route_from_message(m: RouteMessage) -> Route {
    let mut r = Route {
        destination: None,
        prefix_len: m.header.destination_prefix_length,
        gateway: None,
        oif: None,
        pref_source: None,
    };
    for a in m.attributes {
        match a {
            RouteAttribute::Destination(d) => r.destination = route_addr(d),
            RouteAttribute::Gateway(g) => r.gateway = route_addr(g),
            RouteAttribute::Oif(i) => r.oif = Some(i),
            RouteAttribute::PrefSource(s) => r.pref_source = route_addr(s),
            _ => {}
        }
    }
    if r.destination.is_none() && m.header.address_family == AddressFamily::Inet6 {
        r.destination = Some(IpAddr::V6(Ipv6Addr::UNSPECIFIED));
    }
    r
}
