//! The vxlan link kind: create flannel's VTEP and read an existing one's parameters.

use std::net::{IpAddr, Ipv4Addr};

use netlink_packet_route::link::InfoVxlan;
use rtnetlink::LinkVxlan;

use super::{wrap, Netlink, NetlinkError};

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

/// Reads the vxlan attributes of a link message.
pub(super) fn vxlan_info(attrs: &[InfoVxlan]) -> VxlanInfo {
    let mut x = VxlanInfo::default();
    for attr in attrs {
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
    x
}

impl Netlink {
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
}
