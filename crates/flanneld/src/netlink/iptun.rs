//! The ipip (iptun) link kind: flannel's `flannel.ipip`, a tunnel with a fixed local address
//! and any remote (the remote is chosen per packet by the route's gateway).

use std::net::{IpAddr, Ipv4Addr};

use netlink_packet_route::link::InfoIpTunnel;
use rtnetlink::LinkIpIp;

use super::{wrap, Netlink, NetlinkError};

/// The parameters of an existing ipip device.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IptunInfo {
    /// Local (source) address; `None` or unspecified = any.
    pub local: Option<IpAddr>,
    /// Remote address; `None` or unspecified = any.
    pub remote: Option<IpAddr>,
    /// Underlay device index, if bound to one.
    pub dev: Option<u32>,
}

/// What flannel wants an ipip device to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpipSpec {
    /// Device name (`flannel.ipip`).
    pub name: String,
    /// Local (source) address of the outer header.
    pub local: Ipv4Addr,
    /// Device MTU.
    pub mtu: u32,
}

/// Reads the tunnel attributes of a link message.
pub(super) fn iptun_info(attrs: &[InfoIpTunnel]) -> IptunInfo {
    let mut x = IptunInfo::default();
    for attr in attrs {
        match attr {
            InfoIpTunnel::Local(l) => x.local = Some(*l),
            InfoIpTunnel::Remote(r) => x.remote = Some(*r),
            InfoIpTunnel::Link(l) if *l != 0 => x.dev = Some(*l),
            _ => {}
        }
    }
    x
}

impl Netlink {
    /// Creates an ipip device `local <spec.local> remote any` with the given MTU.
    pub async fn create_ipip(&self, spec: &IpipSpec) -> Result<(), NetlinkError> {
        let msg = LinkIpIp::new(&spec.name)
            .local(spec.local)
            .mtu(spec.mtu)
            .build();
        self.handle
            .link()
            .add(msg)
            .execute()
            .await
            .map_err(wrap(format!("failed to create ipip device {}", spec.name)))
    }
}
