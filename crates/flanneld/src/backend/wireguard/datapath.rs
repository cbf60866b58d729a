//! The seam between the wireguard backend's control plane and its two data paths: the kernel's
//! WireGuard (configured through generic netlink) and the user-space WireGuard over TUN.

use std::net::SocketAddr;

use async_trait::async_trait;
use ipnet::IpNet;

use crate::backend::BackendError;

/// A WireGuard key (private, public or preshared), raw 32 bytes.
pub type WgKey = [u8; 32];

/// The device-wide settings flannel applies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WgDeviceConfig {
    /// This host's private key.
    pub private_key: WgKey,
    /// UDP port the device listens on.
    pub listen_port: u16,
}

/// One remote host, as flannel configures it from its lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WgPeer {
    /// The peer's public key (from its lease's BackendData).
    pub public_key: WgKey,
    /// The network's PSK, if configured.
    pub preshared_key: Option<WgKey>,
    /// Where the peer is reached.
    pub endpoint: Option<SocketAddr>,
    /// The peer's subnet(s); replaces what the device had for this peer.
    pub allowed_ips: Vec<IpNet>,
    /// Persistent keepalive in seconds (0 = off).
    pub keepalive_secs: u16,
}

/// A WireGuard device flannel can configure, whatever carries its packets.
#[async_trait]
pub trait WgDataPath: Send + Sync {
    /// Sets the private key and listen port.
    async fn set_device(&mut self, config: &WgDeviceConfig) -> Result<(), BackendError>;

    /// Adds a peer, or replaces everything about an existing one with this public key.
    async fn set_peer(&mut self, peer: &WgPeer) -> Result<(), BackendError>;

    /// Removes the peer with this public key (no error if absent).
    async fn remove_peer(&mut self, public_key: &WgKey) -> Result<(), BackendError>;

    /// The peers currently configured (keys, endpoints, allowed IPs, keepalive).
    async fn peers(&self) -> Result<Vec<WgPeer>, BackendError>;
}

/// A WireGuard device as read back (for `flanneld doctor`): what peers can rely on, never the
/// private or preshared keys.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WgDeviceView {
    /// The device's public key (none while no private key is set).
    pub public_key: Option<WgKey>,
    /// The UDP port it listens on.
    pub listen_port: u16,
    /// Its peers (`preshared_key` only says whether one is set).
    pub peers: Vec<WgPeer>,
}
