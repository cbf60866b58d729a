//! Addresses: list, add (idempotent), delete.

use std::net::IpAddr;

use futures::TryStreamExt;
use netlink_packet_route::address::{AddressAttribute, AddressFlags, AddressScope};

use super::{is_exists, wrap, Netlink, NetlinkError};

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

impl Netlink {
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
}
