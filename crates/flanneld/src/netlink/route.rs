//! Routes: listing, `ip route get`, replace and delete (protocol `boot`, like Go flannel).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures::TryStreamExt;
use ipnet::IpNet;
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::AddressFamily;
use rtnetlink::RouteMessageBuilder;

use super::{ignore_not_found, wrap, Netlink, NetlinkError};

/// A route as read from the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Route type (unicast, blackhole...).
    pub kind: RouteType,
    /// Routing table id.
    pub table: u32,
    /// Who installed it (flannel uses `boot`, like Go flannel's netlink library).
    pub protocol: RouteProtocol,
    /// Whether the gateway is declared on-link.
    pub onlink: bool,
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

impl Netlink {
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

    /// Installs or replaces a route.
    pub async fn replace_route(&self, r: &RouteSpec) -> Result<(), NetlinkError> {
        self.replace_route_message(r.message()?, r, "").await
    }

    /// Installs or replaces a device route with scope link (`<dst> dev <oif> scope link`, as
    /// the wireguard backend's network route).
    pub async fn replace_link_route(&self, r: &RouteSpec) -> Result<(), NetlinkError> {
        let mut msg = r.message()?;
        msg.header.scope = RouteScope::Link;
        self.replace_route_message(msg, r, " scope link").await
    }

    async fn replace_route_message(
        &self,
        msg: RouteMessage,
        r: &RouteSpec,
        what: &str,
    ) -> Result<(), NetlinkError> {
        self.handle
            .route()
            .add(msg)
            .replace()
            .execute()
            .await
            .map_err(wrap(format!("failed to replace route {r}{what}")))
    }

    /// Removes a route; a route that is already gone is not an error.
    pub async fn delete_route(&self, r: &RouteSpec) -> Result<(), NetlinkError> {
        let mut msg = r.message()?;
        // Match whatever protocol installed it (Go flannel or us).
        msg.header.protocol = RouteProtocol::Unspec;
        ignore_not_found(
            self.handle
                .route()
                .del(msg)
                .execute()
                .await
                .map_err(wrap(format!("failed to delete route {r}"))),
        )
    }

    /// Deletes a route exactly as read from the kernel.
    pub async fn delete_kernel_route(&self, r: &Route) -> Result<(), NetlinkError> {
        let Some(dst) = r.destination_net() else {
            return Ok(());
        };
        let spec = RouteSpec {
            dst,
            gateway: r.gateway,
            oif: r.oif,
            onlink: false,
            blackhole: r.kind == RouteType::BlackHole,
        };
        self.delete_route(&spec).await
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
        kind: m.header.kind,
        table: m.header.table as u32,
        protocol: m.header.protocol,
        onlink: m.header.flags.contains(RouteFlags::Onlink),
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
            RouteAttribute::Table(t) => r.table = t,
            _ => {}
        }
    }
    if r.destination.is_none() && m.header.address_family == AddressFamily::Inet6 {
        r.destination = Some(IpAddr::V6(Ipv6Addr::UNSPECIFIED));
    }
    r
}

impl Route {
    /// The destination as a network (`0.0.0.0/0` for a default route).
    pub fn destination_net(&self) -> Option<IpNet> {
        let dst = self
            .destination
            .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        IpNet::new(dst, self.prefix_len).ok()
    }
}

/// A route flannel wants: what, through which gateway and device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteSpec {
    /// Destination network.
    pub dst: IpNet,
    /// Next hop, if any.
    pub gateway: Option<IpAddr>,
    /// Output device, if fixed.
    pub oif: Option<u32>,
    /// Declare the gateway reachable on the device without a connected route (vxlan).
    pub onlink: bool,
    /// A blackhole route instead of a unicast one.
    pub blackhole: bool,
}

impl RouteSpec {
    /// The netlink message for this route (protocol `boot`, as Go flannel's routes).
    fn message(&self) -> Result<RouteMessage, NetlinkError> {
        let mut b = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(self.dst.network(), self.dst.prefix_len())
            .map_err(|e| self.invalid(e))?
            .protocol(RouteProtocol::Boot);
        if let Some(g) = self.gateway {
            b = b.gateway(g).map_err(|e| self.invalid(e))?;
        }
        if let Some(i) = self.oif {
            b = b.output_interface(i);
        }
        if self.onlink {
            b = b.onlink();
        }
        let mut msg = b.build();
        if self.blackhole {
            msg.header.kind = RouteType::BlackHole;
            msg.header.scope = RouteScope::Universe;
        }
        Ok(msg)
    }

    fn invalid(&self, e: impl std::fmt::Display) -> NetlinkError {
        NetlinkError {
            context: format!("invalid route {self}"),
            source: rtnetlink::Error::InvalidNla(e.to_string()),
        }
    }

    /// Whether a kernel route is this one (destination, gateway, device, type).
    pub fn matches(&self, r: &Route) -> bool {
        r.destination_net() == Some(self.dst)
            && r.gateway == self.gateway
            && (self.oif.is_none() || r.oif == self.oif)
            && (r.kind == RouteType::BlackHole) == self.blackhole
    }
}

impl std::fmt::Display for RouteSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.blackhole {
            write!(f, "blackhole ")?;
        }
        write!(f, "{}", self.dst)?;
        if let Some(g) = self.gateway {
            write!(f, " via {g}")?;
        }
        if let Some(i) = self.oif {
            write!(f, " dev #{i}")?;
        }
        if self.onlink {
            write!(f, " onlink")?;
        }
        Ok(())
    }
}
