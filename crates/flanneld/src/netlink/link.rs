//! Links of any kind: list, details (with the kind-specific parameters flannel checks), up,
//! MTU, delete. Creating a link is per kind ([`super::vxlan`], [`super::iptun`]).

use futures::TryStreamExt;
use netlink_packet_route::link::{InfoData, LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use rtnetlink::LinkUnspec;

use super::iptun::{iptun_info, IptunInfo};
use super::vxlan::{vxlan_info, VxlanInfo};
use super::{is_not_found, mac6, wrap, Netlink, NetlinkError};

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

/// A link's type-specific details flannel checks before reusing a device.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LinkDetails {
    /// Index, name, MTU, up.
    pub index: u32,
    /// Interface name.
    pub name: String,
    /// Current MTU.
    pub mtu: u32,
    /// Link kind (`vxlan`, `ipip`, `bridge`, ...).
    pub kind: Option<String>,
    /// Hardware address.
    pub mac: Option<[u8; 6]>,
    /// VXLAN parameters when the link is a vxlan device.
    pub vxlan: Option<VxlanInfo>,
    /// Tunnel parameters when the link is an ipip (iptun) device.
    pub iptun: Option<IptunInfo>,
}

pub(super) fn link_name(m: &LinkMessage) -> String {
    m.attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::IfName(n) => Some(n.clone()),
            _ => None,
        })
        .unwrap_or_default()
}

impl Netlink {
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
                            LinkInfo::Data(InfoData::Vxlan(v)) => d.vxlan = Some(vxlan_info(v)),
                            LinkInfo::Data(InfoData::IpTunnel(v)) => d.iptun = Some(iptun_info(v)),
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(Some(d))
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
}
