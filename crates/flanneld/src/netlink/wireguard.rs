//! Kernel WireGuard links (keys and peers are set over generic netlink by the backend).

use rtnetlink::LinkWireguard;

use super::{wrap, Netlink, NetlinkError};

impl Netlink {
    /// Creates a kernel WireGuard device.
    pub async fn create_wireguard(&self, name: &str, mtu: u32) -> Result<(), NetlinkError> {
        self.handle
            .link()
            .add(LinkWireguard::new(name).mtu(mtu).build())
            .execute()
            .await
            .map_err(wrap(format!("failed to create wireguard device {name}")))
    }
}
