//! WireGuard in user space: a TUN device driven by the shared packet engine
//! (`backend::engine`), with boringtun's Noise protocol core (`noise::Tunn`, one per peer)
//! as the engine's codec. Used where the kernel has no WireGuard module.
//!
//! Peers are found by the destination's allowed-ips (outbound) and by the receiver index of
//! the message, or the static key of a handshake initiation (inbound); a decrypted packet is
//! only delivered if its source is in the sending peer's allowed-ips (cryptokey routing). A
//! timer thread drives each peer's handshake, rekey and keepalive timers, and every peer gets
//! a handshake initiation as soon as it is configured, so sessions exist before the first
//! packet (and are re-established at once after a restart).
//!
//! Both families, as the kernel's WireGuard: the TUN carries IPv4 and IPv6 pod packets
//! (allowed-ips tables per family), and the UDP sockets are dual-stack `[::]:port`, so a
//! peer's endpoint may be IPv4 or IPv6 (the single device of `auto` mode can have both kinds
//! of peers at once).

use std::collections::HashMap;
use std::net::{Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::{Packet, Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use super::datapath::{WgDataPath, WgDeviceConfig, WgKey, WgPeer};
use crate::backend::engine::{self, sock::UdpSock, Codec, Emit, Mode, Running, Tx};
use crate::backend::udp::packet::ipv4_dst;
use crate::backend::udp::routes::{Prefix, RouteTable};
use crate::backend::BackendError;

fn err(e: impl std::fmt::Display) -> BackendError {
    BackendError::Other(e.to_string())
}

/// The destination of an IPv6 packet (`None` if it is not one).
fn ipv6_dst(pkt: &[u8]) -> Option<u128> {
    let d: [u8; 16] = pkt.get(24..40)?.try_into().ok()?;
    (pkt[0] >> 4 == 6).then(|| u128::from_be_bytes(d))
}

/// A peer's session and where it is reached, under one lock: every packet to or from the peer
/// takes the session's lock anyway, so the endpoint (updated by every authenticated packet,
/// when the peer roams) costs nothing extra.
struct Session {
    tunn: Tunn,
    endpoint: Option<SocketAddr>,
}

/// One configured peer.
struct Peer {
    config: Mutex<WgPeer>,
    session: Mutex<Session>,
}

impl Peer {
    fn endpoint(&self) -> Option<SocketAddr> {
        lock(&self.session).endpoint
    }
}

/// The device: keys, peers and the allowed-ips tables.
struct Inner {
    private: StaticSecret,
    public: PublicKey,
    listen_port: u16,
    peers: HashMap<u32, Arc<Peer>>,
    by_key: HashMap<WgKey, u32>,
    allowed4: RouteTable<u32, Ipv4Net>,
    allowed6: RouteTable<u32, Ipv6Net>,
    next_index: u32,
}

impl Inner {
    /// The peer whose allowed-ips hold the packet's destination.
    #[inline]
    fn route(&self, pkt: &[u8]) -> Option<u32> {
        match pkt.first()? >> 4 {
            4 => self.allowed4.lookup(ipv4_dst(pkt)?),
            6 => self.allowed6.lookup(ipv6_dst(pkt)?),
            _ => None,
        }
    }
}

/// Gives `index` exactly `nets` in `table`: what it had goes, and a subnet moves from any
/// other peer to it.
fn replace_allowed<P: Prefix>(table: &mut RouteTable<u32, P>, index: u32, nets: &[P]) {
    for (net, owner) in table.entries() {
        if owner == index || nets.contains(&net) {
            table.remove(net);
        }
    }
    for n in nets {
        table.insert(*n, index);
    }
}

/// Removes every allowed IP of peer `index`.
fn remove_allowed<P: Prefix>(table: &mut RouteTable<u32, P>, index: u32) {
    for (net, owner) in table.entries() {
        if owner == index {
            table.remove(net);
        }
    }
}

/// How long after start packets without a peer are held (not dropped) for the peers that
/// the lease watch is about to configure: a restart then loses nothing in between.
const HOLD_AFTER_START: Duration = Duration::from_secs(3);
/// At most this many packets are held.
const HOLD_MAX: usize = 1024;

/// The engine's codec: WireGuard messages on the wire.
pub struct WgCodec {
    inner: RwLock<Inner>,
    hold_until: std::time::Instant,
    held: Mutex<Vec<Vec<u8>>>,
}

impl WgCodec {
    fn new(private: WgKey, listen_port: u16) -> Self {
        let private = StaticSecret::from(private);
        WgCodec {
            inner: RwLock::new(Inner {
                public: PublicKey::from(&private),
                private,
                listen_port,
                peers: HashMap::new(),
                by_key: HashMap::new(),
                allowed4: RouteTable::default(),
                allowed6: RouteTable::default(),
                next_index: 1,
            }),
            hold_until: std::time::Instant::now() + HOLD_AFTER_START,
            held: Mutex::new(vec![]),
        }
    }

    /// Keeps a packet that has no peer yet, shortly after start.
    fn hold(&self, pkt: &[u8]) {
        if std::time::Instant::now() < self.hold_until {
            let mut h = lock(&self.held);
            if h.len() < HOLD_MAX {
                h.push(pkt.to_vec());
            }
        }
    }

    /// The held packets now routed to peer `index`.
    fn take_held(&self, index: u32) -> Vec<Vec<u8>> {
        let mut h = lock(&self.held);
        if h.is_empty() {
            return vec![];
        }
        let g = self.read();
        let (mine, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut *h)
            .into_iter()
            .partition(|p| g.route(p) == Some(index));
        *h = rest;
        mine
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets the private key (all sessions restart) and records the listen port.
    pub fn set_device(&self, config: &WgDeviceConfig) {
        let mut g = self.write();
        g.listen_port = config.listen_port;
        let private = StaticSecret::from(config.private_key);
        let public = PublicKey::from(&private);
        if public == g.public {
            return;
        }
        g.public = public;
        g.private = private.clone();
        for p in g.peers.values() {
            lock(&p.session)
                .tunn
                .set_static_private(private.clone(), public, None);
        }
    }

    /// Adds or updates a peer; returns it and its index.
    fn set_peer(&self, peer: &WgPeer) -> (u32, Arc<Peer>) {
        let mut nets4 = vec![];
        let mut nets6 = vec![];
        for n in &peer.allowed_ips {
            match n {
                IpNet::V4(n) => nets4.push(n.trunc()),
                IpNet::V6(n) => nets6.push(n.trunc()),
            }
        }
        let mut g = self.write();
        let existing = g.by_key.get(&peer.public_key).copied();
        let index = match existing {
            Some(i) => i,
            None => {
                let i = g.next_index;
                g.next_index = (g.next_index + 1) % (1 << 24);
                if g.next_index == 0 {
                    g.next_index = 1;
                }
                i
            }
        };
        replace_allowed(&mut g.allowed4, index, &nets4);
        replace_allowed(&mut g.allowed6, index, &nets6);
        let fresh_tunn = || {
            Tunn::new(
                g.private.clone(),
                PublicKey::from(peer.public_key),
                peer.preshared_key,
                (peer.keepalive_secs > 0).then_some(peer.keepalive_secs),
                index,
                None,
            )
        };
        let p = match existing.and_then(|i| g.peers.get(&i).cloned()) {
            Some(p) => {
                let mut cfg = lock(&p.config);
                let mut session = lock(&p.session);
                if cfg.preshared_key != peer.preshared_key
                    || cfg.keepalive_secs != peer.keepalive_secs
                {
                    session.tunn = fresh_tunn();
                }
                session.endpoint = peer.endpoint;
                drop(session);
                *cfg = peer.clone();
                drop(cfg);
                p
            }
            None => {
                let p = Arc::new(Peer {
                    config: Mutex::new(peer.clone()),
                    session: Mutex::new(Session {
                        tunn: fresh_tunn(),
                        endpoint: peer.endpoint,
                    }),
                });
                g.peers.insert(index, p.clone());
                g.by_key.insert(peer.public_key, index);
                p
            }
        };
        (index, p)
    }

    /// Removes a peer and its allowed-ips.
    pub fn remove_peer(&self, key: &WgKey) {
        let mut g = self.write();
        if let Some(i) = g.by_key.remove(key) {
            g.peers.remove(&i);
            remove_allowed(&mut g.allowed4, i);
            remove_allowed(&mut g.allowed6, i);
        }
    }

    /// Removes every peer.
    pub fn clear_peers(&self) {
        let mut g = self.write();
        g.peers.clear();
        g.by_key.clear();
        g.allowed4 = RouteTable::default();
        g.allowed6 = RouteTable::default();
    }

    /// The configured peers, with allowed-ips as the table has them.
    pub fn peers(&self) -> Vec<WgPeer> {
        let g = self.read();
        let entries4 = g.allowed4.entries();
        let entries6 = g.allowed6.entries();
        let mut out: Vec<WgPeer> = g
            .peers
            .iter()
            .map(|(i, p)| {
                let mut c = lock(&p.config).clone();
                c.endpoint = p.endpoint();
                c.allowed_ips = entries4
                    .iter()
                    .filter(|(_, o)| o == i)
                    .map(|(n, _)| IpNet::V4(*n))
                    .chain(
                        entries6
                            .iter()
                            .filter(|(_, o)| o == i)
                            .map(|(n, _)| IpNet::V6(*n)),
                    )
                    .collect();
                c
            })
            .collect();
        out.sort_by_key(|p| p.public_key);
        out
    }

    /// Device and peer state for the UAPI `get` (private key, port, per-peer statistics).
    pub fn status(&self) -> DeviceStatus {
        let (private, listen_port) = {
            let g = self.read();
            (g.private.to_bytes(), g.listen_port)
        };
        let peers = self
            .peers()
            .into_iter()
            .map(|cfg| {
                let g = self.read();
                let (hs, tx, rx) = g
                    .by_key
                    .get(&cfg.public_key)
                    .and_then(|i| g.peers.get(i))
                    .map(|p| {
                        let (t, tx, rx, _, _) = lock(&p.session).tunn.stats();
                        (t.map(|d| SystemTime::now() - d), tx, rx)
                    })
                    .unwrap_or((None, 0, 0));
                PeerStatus {
                    config: cfg,
                    last_handshake: hs,
                    tx_bytes: tx as u64,
                    rx_bytes: rx as u64,
                }
            })
            .collect();
        DeviceStatus {
            private_key: private,
            listen_port,
            peers,
        }
    }

    fn peer_for_datagram(&self, g: &Inner, dgram: &[u8]) -> Option<(u32, Arc<Peer>)> {
        let index = match Tunn::parse_incoming_packet(dgram).ok()? {
            Packet::HandshakeInit(init) => {
                let half = parse_handshake_anon(&g.private, &g.public, &init).ok()?;
                *g.by_key.get(&half.peer_static_public)?
            }
            Packet::HandshakeResponse(r) => r.receiver_idx >> 8,
            Packet::PacketCookieReply(c) => c.receiver_idx >> 8,
            Packet::PacketData(d) => d.receiver_idx >> 8,
        };
        g.peers.get(&index).map(|p| (index, p.clone()))
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A peer as the UAPI reports it.
pub struct PeerStatus {
    /// Its configuration.
    pub config: WgPeer,
    /// When the last handshake completed.
    pub last_handshake: Option<SystemTime>,
    /// Payload bytes sent.
    pub tx_bytes: u64,
    /// Payload bytes received.
    pub rx_bytes: u64,
}

/// The device as the UAPI reports it.
pub struct DeviceStatus {
    /// The private key.
    pub private_key: WgKey,
    /// The UDP port.
    pub listen_port: u16,
    /// The peers.
    pub peers: Vec<PeerStatus>,
}

impl Codec for WgCodec {
    type Local = ();
    type Addr = SocketAddr;
    /// Message header (16) + tag (16) + padding to 16 bytes.
    const ROOM: usize = 48;
    const NAME: &'static str = "wireguard";

    fn local(&self) {}

    fn outbound(
        &self,
        _local: &mut (),
        pkts: &mut [Vec<u8>],
        sizes: &[usize],
        outs: &mut [Vec<u8>],
        verdicts: &mut [Tx<SocketAddr>],
        _reply: &mut dyn FnMut(&[u8]),
    ) {
        let g = self.read();
        let n = pkts.len();
        let route = |pkt: &[u8]| g.route(pkt);
        let mut i = 0;
        while i < n {
            verdicts[i] = Tx::Drop;
            let Some(idx) = route(&pkts[i][..sizes[i]]) else {
                self.hold(&pkts[i][..sizes[i]]);
                i += 1;
                continue;
            };
            let Some(peer) = g.peers.get(&idx) else {
                i += 1;
                continue;
            };
            // Consecutive packets to the same peer share one lock of its session.
            let mut session = lock(&peer.session);
            let ep = session.endpoint;
            let mut j = i;
            loop {
                if let Some(ep) = ep {
                    if let TunnResult::WriteToNetwork(b) =
                        session.tunn.encapsulate(&pkts[j][..sizes[j]], &mut outs[j])
                    {
                        verdicts[j] = Tx::Encoded(ep, b.len());
                    }
                }
                j += 1;
                if j == n || route(&pkts[j][..sizes[j]]) != Some(idx) {
                    break;
                }
                verdicts[j] = Tx::Drop;
            }
            i = j;
        }
    }

    fn inbound(
        &self,
        _local: &mut (),
        src: SocketAddr,
        dgram: &mut [u8],
        scratch: &mut [u8],
        emit: &mut dyn FnMut(Emit<'_, SocketAddr>),
    ) {
        let g = self.read();
        let Some((index, peer)) = self.peer_for_datagram(&g, dgram) else {
            tracing::trace!("wireguard: datagram from {src} for no known peer");
            return;
        };
        let mut session = lock(&peer.session);
        let Session { tunn, endpoint } = &mut *session;
        let mut r = tunn.decapsulate(Some(src.ip()), dgram, scratch);
        loop {
            // Cryptokey routing: the inner source must be one of the sending peer's allowed
            // IPs, of its family's table.
            let (pkt, allowed) = match r {
                TunnResult::WriteToNetwork(b) => {
                    emit(Emit::Net(src, b));
                    r = tunn.decapsulate(None, &[], scratch);
                    continue;
                }
                TunnResult::WriteToTunnelV4(pkt, from) => {
                    (pkt, g.allowed4.lookup(u32::from(from)) == Some(index))
                }
                TunnResult::WriteToTunnelV6(pkt, from) => {
                    (pkt, g.allowed6.lookup(u128::from(from)) == Some(index))
                }
                TunnResult::Done => {
                    if dgram.first() == Some(&2) {
                        // A handshake response completed our handshake: roam to its source.
                        *endpoint = Some(src);
                    }
                    return;
                }
                TunnResult::Err(e) => {
                    tracing::debug!("wireguard: datagram from {src}: {e:?}");
                    return;
                }
            };
            if allowed {
                if *endpoint != Some(src) {
                    *endpoint = Some(src);
                }
                emit(Emit::Tun(pkt));
            } else {
                tracing::debug!(
                    "wireguard: dropping a packet from {src}: its inner source is not in the peer's allowed IPs"
                );
            }
            return;
        }
    }
}

/// The user-space WireGuard device `flannel-wg`.
pub struct UserspaceWg {
    codec: Arc<WgCodec>,
    sender: Arc<UdpSock>,
    /// What runs.
    pub running: Running,
}

impl UserspaceWg {
    /// Opens (or re-attaches to) the persistent TUN `name`, starts the packet workers on
    /// the dual-stack `[::]:<listen_port>` (both families, like the kernel's two sockets on
    /// the port; `0.0.0.0` on a kernel without IPv6), the timer thread and the UAPI socket.
    pub fn create(name: &str, mtu: u32, config: &WgDeviceConfig) -> Result<Self, BackendError> {
        let mode = Mode::from_env();
        let (devs, mode) = engine::open_tun(name, mode, mode.queues())
            .map_err(|e| err(format!("failed to open TUN device {name}: {e}")))?;
        let codec = Arc::new(WgCodec::new(config.private_key, config.listen_port));
        let bind = SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), config.listen_port);
        let (running, sender) = engine::start(devs, mode, bind, mtu as usize, codec.clone())
            .map_err(|e| {
                err(format!(
                    "failed to start the wireguard data path on {bind}: {e}"
                ))
            })?;
        let sender = Arc::new(sender);
        {
            let codec = codec.clone();
            let sender = sender.clone();
            std::thread::Builder::new()
                .name("wg-timers".into())
                .spawn(move || timers(&codec, &sender))
                .map_err(err)?;
        }
        super::uapi::serve(name, codec.clone()).map_err(err)?;
        Ok(UserspaceWg {
            codec,
            sender,
            running,
        })
    }

    /// The codec (device state), for the UAPI.
    pub fn codec(&self) -> &Arc<WgCodec> {
        &self.codec
    }
}

/// Starts a handshake with `peer` now, if none is under way.
fn initiate(peer: &Peer, sender: &UdpSock) {
    let mut session = lock(&peer.session);
    let Some(ep) = session.endpoint else {
        return;
    };
    let mut buf = [0u8; 256];
    if let TunnResult::WriteToNetwork(b) = session.tunn.format_handshake_initiation(&mut buf, false)
    {
        if let Err(e) = sender.send_to(b, ep) {
            tracing::debug!("wireguard: handshake to {ep}: {e}");
        }
    }
}

/// Every 100 ms: each peer's timers (handshake retries, rekeys, keepalives).
fn timers(codec: &WgCodec, sender: &UdpSock) {
    let mut buf = vec![0u8; 256];
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let peers: Vec<Arc<Peer>> = codec.read().peers.values().cloned().collect();
        for p in peers {
            let mut session = lock(&p.session);
            let Session { tunn, endpoint } = &mut *session;
            if let TunnResult::WriteToNetwork(b) = tunn.update_timers(&mut buf) {
                if let Some(ep) = *endpoint {
                    if let Err(e) = sender.send_to(b, ep) {
                        tracing::debug!("wireguard: timer send to {ep}: {e}");
                    }
                }
            }
        }
    }
}

/// Applies a UAPI/flannel peer and starts its handshake.
pub fn apply_peer(codec: &WgCodec, sender: Option<&UdpSock>, peer: &WgPeer) -> Result<(), String> {
    let (index, p) = codec.set_peer(peer);
    let Some(s) = sender else {
        return Ok(());
    };
    // Packets held since start for this peer: queued in its session (sent once the
    // handshake completes); the first one starts the handshake.
    let mut buf = vec![0u8; 65_536];
    for pkt in codec.take_held(index) {
        let mut session = lock(&p.session);
        let Session { tunn, endpoint } = &mut *session;
        if let (TunnResult::WriteToNetwork(b), Some(ep)) =
            (tunn.encapsulate(&pkt, &mut buf), *endpoint)
        {
            let _ = s.send_to(b, ep);
        }
    }
    initiate(&p, s);
    Ok(())
}

#[async_trait]
impl WgDataPath for UserspaceWg {
    async fn set_device(&mut self, config: &WgDeviceConfig) -> Result<(), BackendError> {
        let port = self.codec.read().listen_port;
        if config.listen_port != port {
            return Err(err(format!(
                "the user-space WireGuard device listens on {port}; changing it to {} needs a restart",
                config.listen_port
            )));
        }
        self.codec.set_device(config);
        Ok(())
    }

    async fn set_peer(&mut self, peer: &WgPeer) -> Result<(), BackendError> {
        apply_peer(&self.codec, Some(&self.sender), peer).map_err(err)
    }

    async fn remove_peer(&mut self, public_key: &WgKey) -> Result<(), BackendError> {
        self.codec.remove_peer(public_key);
        Ok(())
    }

    async fn peers(&self) -> Result<Vec<WgPeer>, BackendError> {
        Ok(self.codec.peers())
    }
}
