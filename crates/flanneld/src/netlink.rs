//! The only module that speaks rtnetlink.
//!
//! Everything else asks for links, addresses and routes in domain terms; this module knows how
//! to build and read the netlink messages, and puts the object name into every error.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures::{StreamExt, TryStreamExt};
use ipnet::IpNet;
use netlink_packet_core::NetlinkPayload;
use netlink_packet_route::address::{AddressAttribute, AddressFlags, AddressScope};
use netlink_packet_route::link::{
    InfoData, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::{Handle, LinkUnspec, LinkVxlan, LinkWireguard, RouteMessageBuilder};

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

/// Whether a netlink failure means "no such object" (harmless when deleting).
pub fn is_not_found(e: &NetlinkError) -> bool {
    matches!(
        errno(e),
        Some(libc::ENOENT) | Some(libc::ESRCH) | Some(libc::ENODEV) | Some(libc::EADDRNOTAVAIL)
    )
}

/// Treats "no such object" as success (deleting what is already gone).
fn ignore_not_found(r: Result<(), NetlinkError>) -> Result<(), NetlinkError> {
    match r {
        Err(e) if is_not_found(&e) => Ok(()),
        other => other,
    }
}

/// The destination attribute of a neighbour or FDB message.
fn neigh_destination(ip: IpAddr) -> NeighbourAttribute {
    NeighbourAttribute::Destination(match ip {
        IpAddr::V4(a) => NeighbourAddress::Inet(a),
        IpAddr::V6(a) => NeighbourAddress::Inet6(a),
    })
}

/// Whether a netlink failure means "already exists".
pub fn is_exists(e: &NetlinkError) -> bool {
    errno(e) == Some(libc::EEXIST)
}

fn errno(e: &NetlinkError) -> Option<i32> {
    match &e.source {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| -c.get()),
        _ => None,
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

/// A link's type-specific details flannel checks before reusing a device.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LinkDetails {
    /// Index, name, MTU, up.
    pub index: u32,
    /// Interface name.
    pub name: String,
    /// Current MTU.
    pub mtu: u32,
    /// Link kind (`vxlan`, `bridge`, ...).
    pub kind: Option<String>,
    /// Hardware address.
    pub mac: Option<[u8; 6]>,
    /// VXLAN parameters when the link is a vxlan device.
    pub vxlan: Option<VxlanInfo>,
}

/// The parameters of an existing vxlan device.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VxlanInfo {
    /// VNI.
    pub vni: Option<u32>,
    /// Underlay device index.
    pub dev: Option<u32>,
    /// Local (source) address (IPv4 or IPv6).
    pub local: Option<IpAddr>,
    /// Multicast group.
    pub group: Option<Ipv4Addr>,
    /// UDP destination port.
    pub port: Option<u16>,
    /// Learning enabled.
    pub learning: Option<bool>,
    /// L2 miss notifications.
    pub l2miss: Option<bool>,
    /// GBP extension enabled.
    pub gbp: bool,
}

/// What flannel wants a vxlan device to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanSpec {
    /// Device name (`flannel.<VNI>`).
    pub name: String,
    /// VNI.
    pub vni: u32,
    /// Underlay device index.
    pub dev: u32,
    /// Local (source) address.
    pub local: Option<IpAddr>,
    /// UDP port; 0 = kernel default.
    pub port: u16,
    /// MAC learning.
    pub learning: bool,
    /// GBP extension.
    pub gbp: bool,
    /// Device MTU.
    pub mtu: u32,
    /// Device MAC (the VtepMAC advertised in the lease).
    pub mac: [u8; 6],
}

/// A neighbour (ARP/NDP) or FDB entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Neighbour {
    /// The IP address (`None` for bridge FDB entries).
    pub ip: Option<IpAddr>,
    /// The hardware address.
    pub mac: Option<[u8; 6]>,
    /// For vxlan FDB entries: the remote VTEP.
    pub dst: Option<IpAddr>,
    /// Whether the entry is permanent.
    pub permanent: bool,
}

/// A change of the set of links.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkEvent {
    /// A link was created or changed.
    New {
        /// Index.
        index: u32,
        /// Name.
        name: String,
    },
    /// A link was deleted.
    Deleted {
        /// Index.
        index: u32,
        /// Name.
        name: String,
    },
}

fn mac6(v: &[u8]) -> Option<[u8; 6]> {
    v.try_into().ok()
}

fn neigh_addr(a: &NeighbourAddress) -> Option<IpAddr> {
    match a {
        NeighbourAddress::Inet(a) => Some(IpAddr::V4(*a)),
        NeighbourAddress::Inet6(a) => Some(IpAddr::V6(*a)),
        _ => None,
    }
}

fn link_name(m: &LinkMessage) -> String {
    m.attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::IfName(n) => Some(n.clone()),
            _ => None,
        })
        .unwrap_or_default()
}

impl Netlink {
    /// Details of the link called `name`, if it exists.
    pub async fn link_details(&self, name: &str) -> Result<Option<LinkDetails>, NetlinkError> {
        let msgs: Result<Vec<LinkMessage>, _> = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute()
            .try_collect()
            .await;
        let msgs = match msgs {
            Ok(m) => m,
            Err(e) => {
                let e = NetlinkError {
                    context: format!("failed to look up link {name}"),
                    source: e,
                };
                if is_not_found(&e) {
                    return Ok(None);
                }
                return Err(e);
            }
        };
        let Some(m) = msgs.into_iter().next() else {
            return Ok(None);
        };
        let mut d = LinkDetails {
            index: m.header.index,
            name: link_name(&m),
            ..Default::default()
        };
        for a in &m.attributes {
            match a {
                LinkAttribute::Mtu(mtu) => d.mtu = *mtu,
                LinkAttribute::Address(mac) => d.mac = mac6(mac),
                LinkAttribute::LinkInfo(infos) => {
                    for info in infos {
                        match info {
                            LinkInfo::Kind(k) => d.kind = Some(k.to_string()),
                            LinkInfo::Data(InfoData::Vxlan(v)) => {
                                let mut x = VxlanInfo::default();
                                for attr in v {
                                    match attr {
                                        InfoVxlan::Id(id) => x.vni = Some(*id),
                                        InfoVxlan::Link(l) => x.dev = Some(*l),
                                        InfoVxlan::Local(l) => x.local = Some(IpAddr::V4(*l)),
                                        InfoVxlan::Local6(l) => x.local = Some(IpAddr::V6(*l)),
                                        InfoVxlan::Group(g) => x.group = Some(*g),
                                        InfoVxlan::Port(p) => x.port = Some(*p),
                                        InfoVxlan::Learning(l) => x.learning = Some(*l),
                                        InfoVxlan::L2Miss(l) => x.l2miss = Some(*l),
                                        InfoVxlan::Gbp => x.gbp = true,
                                        _ => {}
                                    }
                                }
                                d.vxlan = Some(x);
                            }
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(Some(d))
    }

    /// Creates a vxlan device as flannel configures it (no L2/L3 miss, fixed MAC).
    pub async fn create_vxlan(&self, spec: &VxlanSpec) -> Result<(), NetlinkError> {
        let mut b = LinkVxlan::new(&spec.name, spec.vni)
            .dev(spec.dev)
            .learning(spec.learning)
            .l2miss(false)
            .l3miss(false)
            .mtu(spec.mtu)
            .address(spec.mac.to_vec());
        match spec.local {
            Some(IpAddr::V4(l)) => b = b.local(l),
            Some(IpAddr::V6(l)) => b = b.local6(l),
            None => {}
        }
        if spec.port > 0 {
            b = b.port(spec.port);
        }
        if spec.gbp {
            b = b.gbp();
        }
        self.handle
            .link()
            .add(b.build())
            .execute()
            .await
            .map_err(wrap(format!("failed to create vxlan device {}", spec.name)))
    }

    /// Creates a kernel WireGuard device (keys and peers are set over generic netlink).
    pub async fn create_wireguard(&self, name: &str, mtu: u32) -> Result<(), NetlinkError> {
        self.handle
            .link()
            .add(LinkWireguard::new(name).mtu(mtu).build())
            .execute()
            .await
            .map_err(wrap(format!("failed to create wireguard device {name}")))
    }

    /// Deletes a link.
    pub async fn delete_link(&self, index: u32, name: &str) -> Result<(), NetlinkError> {
        self.handle
            .link()
            .del(index)
            .execute()
            .await
            .map_err(wrap(format!("failed to delete link {name}")))
    }

    /// Sets a link administratively up.
    pub async fn set_up(&self, index: u32, name: &str) -> Result<(), NetlinkError> {
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .map_err(wrap(format!("failed to set {name} up")))
    }

    /// Sets a link's MTU.
    pub async fn set_mtu(&self, index: u32, mtu: u32, name: &str) -> Result<(), NetlinkError> {
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).mtu(mtu).build())
            .execute()
            .await
            .map_err(wrap(format!("failed to set the MTU of {name} to {mtu}")))
    }

    /// Adds an address to a link (an existing identical address is fine).
    pub async fn add_address(
        &self,
        index: u32,
        ip: IpAddr,
        prefix_len: u8,
        name: &str,
    ) -> Result<(), NetlinkError> {
        let r = self
            .handle
            .address()
            .add(index, ip, prefix_len)
            .execute()
            .await
            .map_err(wrap(format!(
                "failed to add address {ip}/{prefix_len} to {name}"
            )));
        match r {
            Err(e) if is_exists(&e) => Ok(()),
            other => other,
        }
    }

    /// Removes an address from a link.
    pub async fn del_address(&self, addr: &Address, name: &str) -> Result<(), NetlinkError> {
        let msgs: Vec<_> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(addr.index)
            .execute()
            .try_collect()
            .await
            .map_err(wrap(format!("failed to list addresses of {name}")))?;
        for m in msgs {
            let same = m.attributes.iter().any(|a| match a {
                AddressAttribute::Local(ip) | AddressAttribute::Address(ip) => *ip == addr.ip,
                _ => false,
            }) && m.header.prefix_len == addr.prefix_len;
            if same {
                return self
                    .handle
                    .address()
                    .del(m)
                    .execute()
                    .await
                    .map_err(wrap(format!(
                        "failed to delete address {}/{} from {name}",
                        addr.ip, addr.prefix_len
                    )));
            }
        }
        Ok(())
    }

    /// Installs or replaces a route.
    pub async fn replace_route(&self, r: &RouteSpec) -> Result<(), NetlinkError> {
        self.handle
            .route()
            .add(r.message()?)
            .replace()
            .execute()
            .await
            .map_err(wrap(format!("failed to replace route {r}")))
    }

    /// Installs or replaces a device route with scope link (`<dst> dev <oif> scope link`, as
    /// the wireguard backend's network route).
    pub async fn replace_link_route(&self, r: &RouteSpec) -> Result<(), NetlinkError> {
        let mut msg = r.message()?;
        msg.header.scope = RouteScope::Link;
        self.handle
            .route()
            .add(msg)
            .replace()
            .execute()
            .await
            .map_err(wrap(format!("failed to replace route {r} scope link")))
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

    /// Sets a permanent neighbour entry `ip -> mac` on a link (replacing any other).
    pub async fn replace_neighbour(
        &self,
        index: u32,
        ip: IpAddr,
        mac: [u8; 6],
    ) -> Result<(), NetlinkError> {
        self.handle
            .neighbours()
            .add(index, ip)
            .link_layer_address(&mac)
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .map_err(wrap(format!(
                "failed to set neighbour {ip} on link #{index}"
            )))
    }

    /// Removes the neighbour entry for `ip` on a link (absent is fine).
    pub async fn delete_neighbour(&self, index: u32, ip: IpAddr) -> Result<(), NetlinkError> {
        let mut msg = NeighbourMessage::default();
        msg.header.ifindex = index;
        msg.header.family = match ip {
            IpAddr::V4(_) => AddressFamily::Inet,
            IpAddr::V6(_) => AddressFamily::Inet6,
        };
        msg.attributes.push(neigh_destination(ip));
        self.delete_neighbour_message(
            msg,
            format!("failed to delete neighbour {ip} on link #{index}"),
        )
        .await
    }

    /// Sends a neighbour/FDB delete; an entry that is already gone is not an error.
    async fn delete_neighbour_message(
        &self,
        msg: NeighbourMessage,
        context: String,
    ) -> Result<(), NetlinkError> {
        ignore_not_found(
            self.handle
                .neighbours()
                .del(msg)
                .execute()
                .await
                .map_err(wrap(context)),
        )
    }

    /// Sets a permanent FDB entry `mac -> dst` (self) on a vxlan device.
    pub async fn replace_fdb(
        &self,
        index: u32,
        mac: [u8; 6],
        dst: IpAddr,
    ) -> Result<(), NetlinkError> {
        self.handle
            .neighbours()
            .add_bridge(index, &mac)
            .destination(dst)
            .flags(NeighbourFlags::Own)
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .map_err(wrap(format!(
                "failed to set FDB entry {} dst {dst} on link #{index}",
                format_mac(&mac)
            )))
    }

    /// Removes an FDB entry (absent is fine).
    pub async fn delete_fdb(
        &self,
        index: u32,
        mac: [u8; 6],
        dst: Option<IpAddr>,
    ) -> Result<(), NetlinkError> {
        let mut msg = NeighbourMessage::default();
        msg.header.ifindex = index;
        msg.header.family = AddressFamily::Bridge;
        msg.header.flags = NeighbourFlags::Own;
        msg.header.state = NeighbourState::Permanent;
        msg.attributes
            .push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
        msg.attributes.extend(dst.map(neigh_destination));
        let context = format!(
            "failed to delete FDB entry {} on link #{index}",
            format_mac(&mac)
        );
        self.delete_neighbour_message(msg, context).await
    }

    /// Neighbour entries (`bridge == false`) or FDB entries (`bridge == true`) of one link.
    pub async fn neighbours(
        &self,
        index: u32,
        bridge: bool,
    ) -> Result<Vec<Neighbour>, NetlinkError> {
        let mut req = self.handle.neighbours().get();
        if bridge {
            req = req.set_address_family(AddressFamily::Bridge);
        }
        let msgs: Vec<NeighbourMessage> = req
            .execute()
            .try_collect()
            .await
            .map_err(wrap(format!("failed to list neighbours of link #{index}")))?;
        Ok(msgs
            .into_iter()
            .filter(|m| m.header.ifindex == index)
            .filter(|m| (m.header.family == AddressFamily::Bridge) == bridge)
            .map(|m| {
                let mut n = Neighbour {
                    ip: None,
                    mac: None,
                    dst: None,
                    permanent: m.header.state == NeighbourState::Permanent,
                };
                for a in &m.attributes {
                    match a {
                        NeighbourAttribute::Destination(d) => {
                            if bridge {
                                n.dst = neigh_addr(d)
                            } else {
                                n.ip = neigh_addr(d)
                            }
                        }
                        NeighbourAttribute::LinkLayerAddress(l) => n.mac = mac6(l),
                        _ => {}
                    }
                }
                n
            })
            .collect())
    }
}

/// A MAC address as lower-case colon text, the way Go prints it in BackendData.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let parts: Vec<u8> = s
        .split(':')
        .map(|p| u8::from_str_radix(p, 16))
        .collect::<Result<_, _>>()
        .ok()?;
    if s.split(':').any(|p| p.len() != 2) {
        return None;
    }
    parts.try_into().ok()
}

/// Subscribes to link changes; the receiver yields events until the task is dropped.
pub fn link_events() -> Result<tokio::sync::mpsc::UnboundedReceiver<LinkEvent>, OpenError> {
    let (conn, _handle, mut messages) =
        rtnetlink::new_multicast_connection(&[rtnetlink::MulticastGroup::Link])?;
    tokio::spawn(conn);
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some((msg, _)) = messages.next().await {
            let ev = match msg.payload {
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(m)) => LinkEvent::New {
                    index: m.header.index,
                    name: link_name(&m),
                },
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(m)) => {
                    LinkEvent::Deleted {
                        index: m.header.index,
                        name: link_name(&m),
                    }
                }
                _ => continue,
            };
            if tx.send(ev).is_err() {
                return;
            }
        }
    });
    Ok(rx)
}
