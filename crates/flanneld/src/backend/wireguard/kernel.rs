//! The kernel's WireGuard as a [`WgDataPath`]: the `wireguard` link is made through rtnetlink
//! (the netlink module), keys and peers are set and read through the `wireguard` generic
//! netlink family (`WG_CMD_SET_DEVICE` / `WG_CMD_GET_DEVICE`), exactly what `wg` itself sends.
//!
//! The messages are built by small pure functions so they are unit-tested on machines without
//! the module; the end-to-end proof runs in a QEMU guest with Debian's kernel
//! (`tests/wireguard_kernel.rs`).

use std::fmt::Debug;

use async_trait::async_trait;
use futures::StreamExt;
use genetlink::GenetlinkHandle;
use ipnet::IpNet;
use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_generic::GenlMessage;
use netlink_packet_wireguard::{
    WireguardAddressFamily, WireguardAllowedIp, WireguardAllowedIpAttr, WireguardAttribute,
    WireguardCmd, WireguardMessage, WireguardPeer, WireguardPeerAttribute, WireguardPeerFlags,
};

use super::datapath::{WgDataPath, WgDeviceConfig, WgDeviceView, WgKey, WgPeer};
use crate::backend::BackendError;
use crate::netlink::Netlink;

/// The link kind the kernel reports for its WireGuard devices.
const LINK_KIND: &str = "wireguard";

fn err(context: impl std::fmt::Display) -> BackendError {
    BackendError::Other(context.to_string())
}

/// Opens a generic netlink connection in the current network namespace.
fn genl_connect() -> Result<GenetlinkHandle, BackendError> {
    let (conn, handle, _) = genetlink::new_connection()
        .map_err(|e| err(format!("failed to open a generic netlink socket: {e}")))?;
    tokio::spawn(conn);
    Ok(handle)
}

/// Whether this kernel has WireGuard: the `wireguard` generic netlink family resolves (the
/// kernel loads the module on that request when it is installed but not loaded yet). Decides
/// between the kernel and the user-space data path; creates nothing.
pub async fn kernel_available() -> bool {
    let Ok(handle) = genl_connect() else {
        return false;
    };
    handle.resolve_family::<WireguardMessage>().await.is_ok()
}

/// A kernel WireGuard device, configured through generic netlink.
pub struct KernelWg {
    name: String,
    index: u32,
    genl: GenetlinkHandle,
}

impl KernelWg {
    /// Creates the `wireguard` link `name` with `mtu`, or reuses an existing one (so a restarted
    /// flanneld keeps its established sessions), and sets it up. A link of that name but another
    /// kind is deleted first. Must run inside a tokio runtime, in the target network namespace.
    pub async fn create(name: &str, mtu: u32) -> Result<KernelWg, BackendError> {
        let nl = Netlink::open().map_err(err)?;
        let existing = nl.link_details(name).await.map_err(err)?;
        let details = match existing {
            Some(d) if d.kind.as_deref() == Some(LINK_KIND) => {
                if d.mtu != mtu {
                    nl.set_mtu(d.index, mtu, name).await.map_err(err)?;
                }
                d
            }
            other => {
                if let Some(d) = other {
                    tracing::info!(
                        "{name} exists as a {} device, replacing it with a wireguard device",
                        d.kind.as_deref().unwrap_or("unknown")
                    );
                    nl.delete_link(d.index, name).await.map_err(err)?;
                }
                nl.create_wireguard(name, mtu).await.map_err(err)?;
                nl.link_details(name).await.map_err(err)?.ok_or_else(|| {
                    err(format!("wireguard device {name} vanished after creation"))
                })?
            }
        };
        nl.set_up(details.index, name).await.map_err(err)?;
        Ok(KernelWg {
            name: name.to_string(),
            index: details.index,
            genl: genl_connect()?,
        })
    }

    /// The device's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The device's interface index (for addresses and routes).
    pub fn index(&self) -> u32 {
        self.index
    }

    /// Sends one SET_DEVICE and waits for the kernel's acknowledgement.
    async fn set(&self, msg: WireguardMessage, what: &str) -> Result<(), BackendError> {
        let replies = request(self.genl.clone(), msg, NLM_F_REQUEST | NLM_F_ACK)
            .await
            .map_err(|e| err(format!("failed to {what} on {}: {e}", self.name)))?;
        drop(replies);
        Ok(())
    }
}

/// Sends a wireguard generic netlink request; returns the replies, or the kernel's error.
async fn request(
    mut genl: GenetlinkHandle,
    msg: WireguardMessage,
    flags: u16,
) -> Result<Vec<WireguardMessage>, String> {
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    let nlmsg = NetlinkMessage::new(header, GenlMessage::from_payload(msg).into());
    let mut stream = genl.request(nlmsg).await.map_err(|e| e.to_string())?;
    let mut replies = vec![];
    while let Some(reply) = stream.next().await {
        let reply = reply.map_err(|e| format!("bad reply: {e}"))?;
        match reply.payload {
            NetlinkPayload::InnerMessage(m) => replies.push(m.payload),
            NetlinkPayload::Error(e) if e.code.is_some() => return Err(e.to_io().to_string()),
            _ => {}
        }
    }
    Ok(replies)
}

#[async_trait]
impl WgDataPath for KernelWg {
    async fn set_device(&mut self, config: &WgDeviceConfig) -> Result<(), BackendError> {
        self.set(
            set_device_message(&self.name, config),
            "set the private key and listen port",
        )
        .await
    }

    async fn set_peer(&mut self, peer: &WgPeer) -> Result<(), BackendError> {
        self.set(set_peer_message(&self.name, peer), "configure a peer")
            .await
    }

    async fn remove_peer(&mut self, public_key: &WgKey) -> Result<(), BackendError> {
        self.set(remove_peer_message(&self.name, public_key), "remove a peer")
            .await
    }

    async fn peers(&self) -> Result<Vec<WgPeer>, BackendError> {
        let replies = request(
            self.genl.clone(),
            get_device_message(&self.name),
            NLM_F_REQUEST | NLM_F_DUMP,
        )
        .await
        .map_err(|e| err(format!("failed to read the peers of {}: {e}", self.name)))?;
        Ok(peers_from_replies(replies))
    }
}

/// Reads the kernel WireGuard device `name` (public key, port, peers) without changing it.
pub async fn read_device(name: &str) -> Result<WgDeviceView, String> {
    let genl = genl_connect().map_err(|e| e.to_string())?;
    let replies = request(genl, get_device_message(name), NLM_F_REQUEST | NLM_F_DUMP).await?;
    let mut view = WgDeviceView::default();
    for m in &replies {
        for a in &m.attributes {
            match a {
                WireguardAttribute::PublicKey(k) if *k != [0; 32] => view.public_key = Some(*k),
                WireguardAttribute::ListenPort(p) => view.listen_port = *p,
                _ => {}
            }
        }
    }
    view.peers = peers_from_replies(replies);
    Ok(view)
}

/// SET_DEVICE with the private key and listen port; peers are left alone (flannel adds and
/// removes them one lease at a time, so a restart does not drop working sessions).
pub fn set_device_message(ifname: &str, config: &WgDeviceConfig) -> WireguardMessage {
    WireguardMessage {
        cmd: WireguardCmd::SetDevice,
        attributes: vec![
            WireguardAttribute::IfName(ifname.to_string()),
            WireguardAttribute::PrivateKey(config.private_key),
            WireguardAttribute::ListenPort(config.listen_port),
        ],
    }
}

/// SET_DEVICE adding or updating one peer. Allowed IPs are replaced, the PSK is always sent
/// (all zeros clears it, as the kernel defines), keepalive always (0 = off), so the peer ends
/// up exactly as described whatever it was before.
pub fn set_peer_message(ifname: &str, peer: &WgPeer) -> WireguardMessage {
    let mut attrs = vec![
        WireguardPeerAttribute::PublicKey(peer.public_key),
        WireguardPeerAttribute::Flags(WireguardPeerFlags::ReplaceAllowedIps),
        WireguardPeerAttribute::PresharedKey(peer.preshared_key.unwrap_or([0; 32])),
    ];
    if let Some(endpoint) = peer.endpoint {
        attrs.push(WireguardPeerAttribute::Endpoint(endpoint));
    }
    attrs.push(WireguardPeerAttribute::PersistentKeepalive(
        peer.keepalive_secs,
    ));
    attrs.push(WireguardPeerAttribute::AllowedIps(
        peer.allowed_ips.iter().map(allowed_ip).collect(),
    ));
    WireguardMessage {
        cmd: WireguardCmd::SetDevice,
        attributes: vec![
            WireguardAttribute::IfName(ifname.to_string()),
            WireguardAttribute::Peers(vec![WireguardPeer(attrs)]),
        ],
    }
}

/// SET_DEVICE removing the peer with this key (`WGPEER_F_REMOVE_ME`; the kernel ignores an
/// unknown key).
pub fn remove_peer_message(ifname: &str, public_key: &WgKey) -> WireguardMessage {
    WireguardMessage {
        cmd: WireguardCmd::SetDevice,
        attributes: vec![
            WireguardAttribute::IfName(ifname.to_string()),
            WireguardAttribute::Peers(vec![WireguardPeer(vec![
                WireguardPeerAttribute::PublicKey(*public_key),
                WireguardPeerAttribute::Flags(WireguardPeerFlags::RemoveMe),
            ])]),
        ],
    }
}

/// GET_DEVICE (sent as a dump) for one device.
pub fn get_device_message(ifname: &str) -> WireguardMessage {
    WireguardMessage {
        cmd: WireguardCmd::GetDevice,
        attributes: vec![WireguardAttribute::IfName(ifname.to_string())],
    }
}

fn allowed_ip(net: &IpNet) -> WireguardAllowedIp {
    let family = match net {
        IpNet::V4(_) => WireguardAddressFamily::Ipv4,
        IpNet::V6(_) => WireguardAddressFamily::Ipv6,
    };
    WireguardAllowedIp(vec![
        WireguardAllowedIpAttr::Family(family),
        WireguardAllowedIpAttr::IpAddr(net.network()),
        WireguardAllowedIpAttr::Cidr(net.prefix_len()),
    ])
}

/// The peers of a GET_DEVICE dump. The kernel splits a long peer list over several messages
/// and may continue one peer's allowed IPs in the next message, repeating only its public key;
/// such continuations are merged.
pub fn peers_from_replies(replies: Vec<WireguardMessage>) -> Vec<WgPeer> {
    let mut peers: Vec<WgPeer> = vec![];
    for msg in replies {
        for attr in msg.attributes {
            let WireguardAttribute::Peers(list) = attr else {
                continue;
            };
            for WireguardPeer(attrs) in list {
                let Some(peer) = peer_from_attributes(attrs) else {
                    continue;
                };
                match peers.last_mut() {
                    Some(last) if last.public_key == peer.public_key => {
                        last.allowed_ips.extend(peer.allowed_ips);
                        last.endpoint = last.endpoint.or(peer.endpoint);
                    }
                    _ => peers.push(peer),
                }
            }
        }
    }
    peers
}

fn peer_from_attributes(attrs: Vec<WireguardPeerAttribute>) -> Option<WgPeer> {
    let mut public_key = None;
    let mut peer = WgPeer {
        public_key: [0; 32],
        preshared_key: None,
        endpoint: None,
        allowed_ips: vec![],
        keepalive_secs: 0,
    };
    for a in attrs {
        match a {
            WireguardPeerAttribute::PublicKey(k) => public_key = Some(k),
            WireguardPeerAttribute::PresharedKey(k) if k != [0; 32] => peer.preshared_key = Some(k),
            WireguardPeerAttribute::Endpoint(e) => peer.endpoint = Some(e),
            WireguardPeerAttribute::PersistentKeepalive(s) => peer.keepalive_secs = s,
            WireguardPeerAttribute::AllowedIps(ips) => {
                peer.allowed_ips
                    .extend(ips.into_iter().filter_map(|WireguardAllowedIp(a)| {
                        let mut ip = None;
                        let mut cidr = None;
                        for x in a {
                            match x {
                                WireguardAllowedIpAttr::IpAddr(i) => ip = Some(i),
                                WireguardAllowedIpAttr::Cidr(c) => cidr = Some(c),
                                _ => {}
                            }
                        }
                        IpNet::new(ip?, cidr?).ok()
                    }))
            }
            _ => {}
        }
    }
    peer.public_key = public_key?;
    Some(peer)
}

impl Debug for KernelWg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelWg")
            .field("name", &self.name)
            .field("index", &self.index)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_core::{Emitable, ParseableParametrized};
    use netlink_packet_generic::GenlHeader;
    use netlink_packet_wireguard::WireguardDeviceFlags;

    // Attribute numbers from the kernel's include/uapi/linux/wireguard.h, checked here
    // independently of the crate that emits them.
    const WGDEVICE_A_IFNAME: u16 = 2;
    const WGDEVICE_A_PRIVATE_KEY: u16 = 3;
    const WGDEVICE_A_LISTEN_PORT: u16 = 6;
    const WGDEVICE_A_PEERS: u16 = 8;
    const WGPEER_A_PUBLIC_KEY: u16 = 1;
    const WGPEER_A_PRESHARED_KEY: u16 = 2;
    const WGPEER_A_FLAGS: u16 = 3;
    const WGPEER_A_ENDPOINT: u16 = 4;
    const WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL: u16 = 5;
    const WGPEER_A_ALLOWEDIPS: u16 = 9;
    const WGALLOWEDIP_A_FAMILY: u16 = 1;
    const WGALLOWEDIP_A_IPADDR: u16 = 2;
    const WGALLOWEDIP_A_CIDR_MASK: u16 = 3;
    const WGPEER_F_REMOVE_ME: u32 = 1;
    const WGPEER_F_REPLACE_ALLOWEDIPS: u32 = 2;
    const NLA_TYPE_MASK: u16 = 0x3fff;

    /// (type, payload) of each netlink attribute in `buf`, walked by hand.
    fn nlas(mut buf: &[u8]) -> Vec<(u16, Vec<u8>)> {
        let mut out = vec![];
        while buf.len() >= 4 {
            let len = u16::from_ne_bytes([buf[0], buf[1]]) as usize;
            let kind = u16::from_ne_bytes([buf[2], buf[3]]) & NLA_TYPE_MASK;
            assert!(len >= 4 && len <= buf.len(), "bad attribute length {len}");
            out.push((kind, buf[4..len].to_vec()));
            let padded = (len + 3) & !3;
            buf = &buf[padded.min(buf.len())..];
        }
        out
    }

    fn attr(list: &[(u16, Vec<u8>)], kind: u16) -> Vec<u8> {
        list.iter()
            .find(|(k, _)| *k == kind)
            .unwrap_or_else(|| panic!("attribute {kind} missing in {list:?}"))
            .1
            .clone()
    }

    fn emit(msg: &WireguardMessage) -> Vec<u8> {
        let mut buf = vec![0; msg.buffer_len()];
        msg.emit(&mut buf);
        buf
    }

    fn key(b: u8) -> WgKey {
        [b; 32]
    }

    fn sample_peer() -> WgPeer {
        WgPeer {
            public_key: key(7),
            preshared_key: Some(key(9)),
            endpoint: Some("192.168.100.12:51820".parse().unwrap()),
            allowed_ips: vec![
                "10.20.3.0/24".parse().unwrap(),
                "fd00:20:3::/64".parse().unwrap(),
            ],
            keepalive_secs: 25,
        }
    }

    #[test]
    fn set_device_carries_ifname_private_key_and_port_but_no_peers() {
        let msg = set_device_message(
            "flannel-wg",
            &WgDeviceConfig {
                private_key: key(1),
                listen_port: 51820,
            },
        );
        assert_eq!(msg.cmd, WireguardCmd::SetDevice);
        let top = nlas(&emit(&msg));
        assert_eq!(attr(&top, WGDEVICE_A_IFNAME), b"flannel-wg\0");
        assert_eq!(attr(&top, WGDEVICE_A_PRIVATE_KEY), vec![1u8; 32]);
        assert_eq!(attr(&top, WGDEVICE_A_LISTEN_PORT), 51820u16.to_ne_bytes());
        assert!(
            top.iter().all(|(k, _)| *k != WGDEVICE_A_PEERS),
            "no peer section, so existing peers stay"
        );
        assert!(
            !msg.attributes
                .iter()
                .any(|a| matches!(a, WireguardAttribute::Flags(f) if f.contains(WireguardDeviceFlags::ReplacePeers))),
            "peers are never replaced wholesale"
        );
    }

    #[test]
    fn set_peer_replaces_allowed_ips_and_sets_every_field() {
        let top = nlas(&emit(&set_peer_message("flannel-wg", &sample_peer())));
        assert_eq!(attr(&top, WGDEVICE_A_IFNAME), b"flannel-wg\0");
        let peers = nlas(&attr(&top, WGDEVICE_A_PEERS));
        assert_eq!(peers.len(), 1);
        let p = nlas(&peers[0].1);
        assert_eq!(attr(&p, WGPEER_A_PUBLIC_KEY), vec![7u8; 32]);
        assert_eq!(attr(&p, WGPEER_A_PRESHARED_KEY), vec![9u8; 32]);
        assert_eq!(
            attr(&p, WGPEER_A_FLAGS),
            WGPEER_F_REPLACE_ALLOWEDIPS.to_ne_bytes()
        );
        assert_eq!(
            attr(&p, WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL),
            25u16.to_ne_bytes()
        );
        // struct sockaddr_in: family AF_INET (host order), port and address in network order.
        let ep = attr(&p, WGPEER_A_ENDPOINT);
        assert_eq!(ep.len(), 16);
        assert_eq!(u16::from_ne_bytes([ep[0], ep[1]]), libc::AF_INET as u16);
        assert_eq!(&ep[2..4], &51820u16.to_be_bytes());
        assert_eq!(&ep[4..8], &[192, 168, 100, 12]);
        let ips = nlas(&attr(&p, WGPEER_A_ALLOWEDIPS));
        assert_eq!(ips.len(), 2);
        let v4 = nlas(&ips[0].1);
        assert_eq!(
            attr(&v4, WGALLOWEDIP_A_FAMILY),
            (libc::AF_INET as u16).to_ne_bytes()
        );
        assert_eq!(attr(&v4, WGALLOWEDIP_A_IPADDR), vec![10, 20, 3, 0]);
        assert_eq!(attr(&v4, WGALLOWEDIP_A_CIDR_MASK), vec![24]);
        let v6 = nlas(&ips[1].1);
        assert_eq!(
            attr(&v6, WGALLOWEDIP_A_FAMILY),
            (libc::AF_INET6 as u16).to_ne_bytes()
        );
        assert_eq!(attr(&v6, WGALLOWEDIP_A_IPADDR).len(), 16);
        assert_eq!(attr(&v6, WGALLOWEDIP_A_CIDR_MASK), vec![64]);
    }

    #[test]
    fn set_peer_without_psk_or_endpoint_clears_the_psk_and_keeps_the_endpoint() {
        let peer = WgPeer {
            preshared_key: None,
            endpoint: None,
            keepalive_secs: 0,
            ..sample_peer()
        };
        let top = nlas(&emit(&set_peer_message("wg0", &peer)));
        let p = nlas(&nlas(&attr(&top, WGDEVICE_A_PEERS))[0].1);
        assert_eq!(attr(&p, WGPEER_A_PRESHARED_KEY), vec![0u8; 32]);
        assert!(p.iter().all(|(k, _)| *k != WGPEER_A_ENDPOINT));
        assert_eq!(
            attr(&p, WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL),
            0u16.to_ne_bytes()
        );
    }

    #[test]
    fn v6_endpoint_is_a_sockaddr_in6() {
        let peer = WgPeer {
            endpoint: Some("[fd00:100::12]:51821".parse().unwrap()),
            ..sample_peer()
        };
        let top = nlas(&emit(&set_peer_message("flannel-wg-v6", &peer)));
        let p = nlas(&nlas(&attr(&top, WGDEVICE_A_PEERS))[0].1);
        let ep = attr(&p, WGPEER_A_ENDPOINT);
        assert_eq!(ep.len(), 28);
        assert_eq!(u16::from_ne_bytes([ep[0], ep[1]]), libc::AF_INET6 as u16);
        assert_eq!(&ep[2..4], &51821u16.to_be_bytes());
        let addr: std::net::Ipv6Addr = "fd00:100::12".parse().unwrap();
        assert_eq!(&ep[8..24], &addr.octets());
    }

    #[test]
    fn remove_peer_is_key_plus_remove_me_only() {
        let top = nlas(&emit(&remove_peer_message("flannel-wg", &key(5))));
        let peers = nlas(&attr(&top, WGDEVICE_A_PEERS));
        let p = nlas(&peers[0].1);
        assert_eq!(p.len(), 2, "{p:?}");
        assert_eq!(attr(&p, WGPEER_A_PUBLIC_KEY), vec![5u8; 32]);
        assert_eq!(attr(&p, WGPEER_A_FLAGS), WGPEER_F_REMOVE_ME.to_ne_bytes());
    }

    #[test]
    fn get_device_names_the_device() {
        let msg = get_device_message("flannel-wg");
        assert_eq!(msg.cmd, WireguardCmd::GetDevice);
        let top = nlas(&emit(&msg));
        assert_eq!(top, vec![(WGDEVICE_A_IFNAME, b"flannel-wg\0".to_vec())]);
    }

    /// Round trip through bytes, as the kernel's reply would arrive.
    fn reparse(msg: WireguardMessage) -> WireguardMessage {
        let header = GenlHeader {
            cmd: u8::from(msg.cmd),
            version: 1,
        };
        WireguardMessage::parse_with_param(&emit(&msg), header).expect("parse")
    }

    #[test]
    fn peers_are_read_back_and_split_dumps_merged() {
        let a = sample_peer();
        let b = WgPeer {
            public_key: key(8),
            preshared_key: None,
            endpoint: Some("192.168.100.13:51820".parse().unwrap()),
            allowed_ips: vec!["10.20.4.0/24".parse().unwrap()],
            keepalive_secs: 0,
        };
        // The kernel's reply shape: device attributes, then the peer list; here peer `a`'s
        // allowed IPs continue in a second message that repeats only its key.
        let first = set_peer_message("flannel-wg", &a);
        let mut first_attrs = first.attributes.clone();
        if let WireguardAttribute::Peers(list) = &mut first_attrs[1] {
            list[0]
                .0
                .retain(|x| !matches!(x, WireguardPeerAttribute::AllowedIps(_)));
            list[0]
                .0
                .push(WireguardPeerAttribute::AllowedIps(vec![allowed_ip(
                    &a.allowed_ips[0],
                )]));
        }
        let continuation = WireguardMessage {
            cmd: WireguardCmd::GetDevice,
            attributes: vec![WireguardAttribute::Peers(vec![
                WireguardPeer(vec![
                    WireguardPeerAttribute::PublicKey(a.public_key),
                    WireguardPeerAttribute::AllowedIps(vec![allowed_ip(&a.allowed_ips[1])]),
                ]),
                set_peer_message("flannel-wg", &b).attributes[1]
                    .clone()
                    .into_peers()[0]
                    .clone(),
            ])],
        };
        let replies = vec![
            reparse(WireguardMessage {
                cmd: WireguardCmd::GetDevice,
                attributes: first_attrs,
            }),
            reparse(continuation),
        ];
        assert_eq!(peers_from_replies(replies), vec![a, b]);
    }

    trait IntoPeers {
        fn into_peers(self) -> Vec<WireguardPeer>;
    }

    impl IntoPeers for WireguardAttribute {
        fn into_peers(self) -> Vec<WireguardPeer> {
            match self {
                WireguardAttribute::Peers(p) => p,
                other => panic!("not a peer list: {other:?}"),
            }
        }
    }
}
