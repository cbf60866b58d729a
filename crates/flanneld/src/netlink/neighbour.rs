//! Neighbour (ARP/NDP) and bridge FDB entries: what vxlan needs per peer.

use std::net::IpAddr;

use futures::TryStreamExt;
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::AddressFamily;

use super::{format_mac, ignore_not_found, mac6, wrap, Netlink, NetlinkError};

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

impl Netlink {
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
                    // NUD_PERMANENT may come with other state bits (e.g. NOARP).
                    permanent: u16::from(m.header.state) & 0x80 != 0,
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

/// The destination attribute of a neighbour or FDB message.
fn neigh_destination(ip: IpAddr) -> NeighbourAttribute {
    NeighbourAttribute::Destination(match ip {
        IpAddr::V4(a) => NeighbourAddress::Inet(a),
        IpAddr::V6(a) => NeighbourAddress::Inet6(a),
    })
}

fn neigh_addr(a: &NeighbourAddress) -> Option<IpAddr> {
    match a {
        NeighbourAddress::Inet(a) => Some(IpAddr::V4(*a)),
        NeighbourAddress::Inet6(a) => Some(IpAddr::V6(*a)),
        // Bridge-family (FDB) entries carry the VXLAN remote as raw bytes.
        NeighbourAddress::Other(b) => match b.len() {
            4 => <[u8; 4]>::try_from(b.as_slice()).ok().map(IpAddr::from),
            16 => <[u8; 16]>::try_from(b.as_slice()).ok().map(IpAddr::from),
            _ => None,
        },
        _ => None,
    }
}
