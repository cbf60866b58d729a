//! `wireguard`: one WireGuard peer per remote lease, as Go flannel's
//! `pkg/backend/wireguard`: devices `flannel-wg` (and `flannel-wg-v6` in `separate` mode),
//! the private key in `/run/flannel/wgkey` (or `WIREGUARD_KEY_FILE`), lease data
//! `{"PublicKey":"<b64>","Port":<port>}`, address `<subnet network>/32` (`/128`), route
//! `<Network> dev flannel-wg scope link`, peers keyed by public key.
//!
//! Packets are carried by the kernel's WireGuard where the kernel has it, else by the
//! user-space WireGuard of [`userspace`] (a TUN on the shared packet engine); the control
//! plane only talks to [`datapath::WgDataPath`], and [`open_datapath`] is the one place
//! that chooses.

pub mod datapath;
pub mod kernel;
pub mod keys;
pub mod uapi;
pub mod userspace;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use async_trait::async_trait;
use flannel_types::backend_options::{WireguardMode, WireguardOptions};
use flannel_types::gojson::FoldedObject;
use flannel_types::lease::RawJson;
use flannel_types::{ConfigError, LeaseAttrs, SubnetKey};
use ipnet::IpNet;

use super::{Backend, BackendContext, BackendError, Network};
use crate::lease::Lease;
use crate::netlink::{Netlink, RouteSpec};
use datapath::{WgDataPath, WgDeviceConfig, WgKey, WgPeer};

/// The IPv4 (or only) device.
pub const DEVICE: &str = "flannel-wg";
/// The IPv6 device in `separate` mode.
pub const DEVICE_V6: &str = "flannel-wg-v6";
/// Bytes of WireGuard + outer IP/UDP headers reserved from the MTU (Go's 80).
const OVERHEAD: u32 = 80;

fn err(e: impl std::fmt::Display) -> BackendError {
    BackendError::Other(e.to_string())
}

/// The data path of one device: the kernel's WireGuard when it is there, else user space
/// (`FLANNEL_WG_DATAPATH=userspace` forces user space, `kernel` forces the kernel).
pub async fn open_datapath(
    nl: &Netlink,
    name: &str,
    mtu: u32,
    config: &WgDeviceConfig,
) -> Result<Box<dyn WgDataPath>, BackendError> {
    let kernel = match std::env::var("FLANNEL_WG_DATAPATH").as_deref() {
        Ok("userspace") => false,
        Ok("kernel") => true,
        _ => kernel::kernel_available().await,
    };
    if kernel {
        let dp = kernel::KernelWg::create(name, mtu).await?;
        tracing::info!("wireguard: {name} is the kernel's WireGuard");
        return Ok(Box::new(dp));
    }
    // Go deletes an existing device and creates it anew; a TUN of ours is re-attached
    // instead (it outlives flanneld, so a restart keeps forwarding), anything else goes.
    if let Some(d) = nl.link_details(name).await.map_err(err)? {
        if d.kind.as_deref() != Some("tun") {
            tracing::info!("wireguard: deleting existing {name} ({:?})", d.kind);
            nl.delete_link(d.index, name).await.map_err(err)?;
        }
    }
    let dp = match userspace::UserspaceWg::create(name, mtu, config) {
        Ok(dp) => dp,
        Err(e) => {
            // A persistent TUN from a run with other queue/offload settings: replace it.
            tracing::warn!("wireguard: cannot attach to {name} ({e}); recreating it");
            if let Some(d) = nl.link_details(name).await.map_err(err)? {
                nl.delete_link(d.index, name).await.map_err(err)?;
            }
            userspace::UserspaceWg::create(name, mtu, config)?
        }
    };
    tracing::info!(
        "wireguard: {name} is user-space WireGuard (no kernel module): {:?} data path, {} queue(s), UDP GSO {}, GRO {}",
        dp.running.mode,
        dp.running.queues,
        dp.running.gso,
        dp.running.gro
    );
    Ok(Box::new(dp))
}

/// Removes a user-space `flannel-wg` TUN left by an earlier wireguard run when the network
/// now uses another backend (its route for the whole network would swallow traffic).
pub async fn remove_leftover_device(nl: &Netlink) {
    for name in [DEVICE, DEVICE_V6] {
        crate::backend::engine::preattach::release(name);
        if let Ok(Some(d)) = nl.link_details(name).await {
            if d.kind.as_deref() == Some("tun") {
                tracing::info!("wireguard: removing {name} left by an earlier wireguard run");
                if let Err(e) = nl.delete_link(d.index, name).await {
                    tracing::warn!("{e}");
                }
            }
        }
    }
}

/// `BackendData` / `BackendV6Data` of a wireguard lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseData {
    /// The host's public key.
    pub public_key: WgKey,
    /// Its listen port (0: assume ours).
    pub port: u16,
}

/// The lease data JSON, byte for byte as Go writes it.
pub fn lease_data_json(public_key: &WgKey, port: u16) -> RawJson {
    RawJson::new(&format!(
        r#"{{"PublicKey":"{}","Port":{port}}}"#,
        keys::encode_key(public_key)
    ))
    .expect("valid JSON")
}

/// Parses lease data with Go's rules (case-insensitive keys); a bad key is an error.
pub fn parse_lease_data(data: Option<&RawJson>) -> Result<LeaseData, String> {
    let data = data.ok_or("no backend data")?;
    let o = FoldedObject::parse(data.get(), "wireguard.wireguardLeaseAttrs")
        .map_err(|e| format!("failed to unmarshal BackendData: {e}"))?;
    let key = o
        .string_field("PublicKey")
        .map_err(|e| format!("failed to unmarshal BackendData: {e}"))?
        .unwrap_or_default();
    let public_key =
        keys::parse_key(&key).map_err(|e| format!("failed to parse PublicKey {key:?}: {e}"))?;
    let port = o
        .int_field("Port", "uint16", 0, 65535)
        .map_err(|e| format!("failed to unmarshal BackendData: {e}"))?
        .unwrap_or(0) as u16;
    Ok(LeaseData { public_key, port })
}

/// Checked backend settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Mode (device layout and endpoint choice).
    pub mode: WireguardMode,
    /// Port of the IPv4 / single device.
    pub listen_port: u16,
    /// Port of the IPv6 device (separate mode).
    pub listen_port_v6: u16,
    /// Device MTU before the overhead (0: the interface's).
    pub mtu: u32,
    /// PSK for every peer.
    pub psk: Option<WgKey>,
    /// Keepalive seconds (0: off).
    pub keepalive: u16,
}

impl Settings {
    /// Reads and checks the options (Go's messages where it has them).
    pub fn from_backend(backend: &serde_json::Value) -> Result<Self, BackendError> {
        let o = WireguardOptions::from_backend(backend)?;
        let port = |v: i64, what: &str| {
            u16::try_from(v)
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| ConfigError(format!("invalid {what} {v}: must be 1..65535")))
        };
        let psk = if o.psk.is_empty() {
            None
        } else {
            Some(
                keys::parse_key(&o.psk)
                    .map_err(|e| ConfigError(format!("could not parse PSK: {e}")))?,
            )
        };
        // Go's PersistentKeepaliveInterval is a time.Duration counted in seconds by flannel.
        let keepalive = u16::try_from(o.persistent_keepalive_interval).map_err(|_| {
            ConfigError(format!(
                "invalid PersistentKeepaliveInterval {}",
                o.persistent_keepalive_interval
            ))
        })?;
        Ok(Settings {
            mode: o.mode,
            listen_port: port(o.listen_port, "ListenPort")?,
            listen_port_v6: port(o.listen_port_v6, "ListenPortV6")?,
            mtu: u32::try_from(o.mtu.max(0)).unwrap_or(0),
            psk,
            keepalive,
        })
    }
}

/// The wireguard backend.
pub struct WireguardBackend {
    settings: Settings,
}

impl WireguardBackend {
    /// Registry constructor.
    pub fn create(ctx: &BackendContext) -> Result<Box<dyn Backend>, BackendError> {
        Ok(Box::new(WireguardBackend {
            settings: Settings::from_backend(&ctx.config.backend)?,
        }))
    }
}

/// Which address families a device carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    V4,
    V6,
    /// The single device of auto/ipv4/ipv6 modes.
    Both,
}

struct Dev {
    name: String,
    family: Family,
    port: u16,
    index: u32,
    dp: Box<dyn WgDataPath>,
    /// Remote subnet -> the public key configured for it.
    peers: HashMap<SubnetKey, WgKey>,
}

struct WgNetwork {
    lease: Lease,
    mtu: u32,
    settings: Settings,
    nl: Netlink,
    devs: Vec<Dev>,
    network4: Option<ipnet::Ipv4Net>,
    network6: Option<ipnet::Ipv6Net>,
    enable_ipv4: bool,
    enable_ipv6: bool,
    own_v4: Option<Ipv4Addr>,
    own_v6: Option<Ipv6Addr>,
}

fn is_private4(ip: Ipv4Addr) -> bool {
    ip.is_private()
}

fn is_private6(ip: Ipv6Addr) -> bool {
    (ip.segments()[0] & 0xfe00) == 0xfc00
}

/// Whether the single device reaches a peer over IPv6: always in `ipv6` mode, never in `ipv4`;
/// in `auto` as Go: v6 if the peer has only v6; v4 if it has only v4, or its v4 is public and
/// we have v4; else v6 if both its and our v6 are public (not fc00::/7); else v4.
pub fn endpoint_is_v6(
    mode: WireguardMode,
    peer_v4: Option<Ipv4Addr>,
    peer_v6: Option<Ipv6Addr>,
    own_v4: Option<Ipv4Addr>,
    own_v6: Option<Ipv6Addr>,
) -> bool {
    match mode {
        WireguardMode::Ipv6 => true,
        WireguardMode::Auto => match (peer_v4, peer_v6) {
            (None, Some(_)) => true,
            (_, None) => false,
            (Some(v4), Some(_)) if !is_private4(v4) && own_v4.is_some() => false,
            (_, Some(v6)) => !is_private6(v6) && own_v6.is_some_and(|o| !is_private6(o)),
        },
        _ => false,
    }
}

#[async_trait]
impl Backend for WireguardBackend {
    async fn register_network(
        &self,
        ctx: &BackendContext,
    ) -> Result<Box<dyn Network>, BackendError> {
        let s = &self.settings;
        let nl = Netlink::open().map_err(err)?;
        let key_path = keys::key_file();
        let (private, created) = keys::load_or_create(&key_path).map_err(err)?;
        let public = keys::public_key(&private);
        tracing::info!(
            "wireguard: {} private key {} (public key {})",
            if created { "created" } else { "using" },
            key_path.display(),
            keys::encode_key(&public)
        );
        let base = if s.mtu > 0 { s.mtu } else { ctx.ext.mtu };
        let mtu = base
            .checked_sub(OVERHEAD)
            .filter(|m| *m >= 68)
            .ok_or_else(|| {
                err(format!(
                    "wireguard: MTU {base} is too small for the {OVERHEAD}-byte overhead"
                ))
            })?;
        let cfg = &ctx.config;
        let mut layout = vec![];
        match s.mode {
            WireguardMode::Separate => {
                if cfg.enable_ipv4 {
                    layout.push((DEVICE, Family::V4, s.listen_port));
                }
                if cfg.enable_ipv6 {
                    layout.push((DEVICE_V6, Family::V6, s.listen_port_v6));
                }
            }
            _ => layout.push((DEVICE, Family::Both, s.listen_port)),
        }
        let mut devs = vec![];
        for (name, family, port) in layout {
            let dc = WgDeviceConfig {
                private_key: private,
                listen_port: port,
            };
            let mut dp = open_datapath(&nl, name, mtu, &dc).await?;
            dp.set_device(&dc).await?;
            let d = nl
                .link_details(name)
                .await
                .map_err(err)?
                .ok_or_else(|| err(format!("{name} missing after creation")))?;
            if d.mtu != mtu {
                nl.set_mtu(d.index, mtu, name).await.map_err(err)?;
            }
            devs.push(Dev {
                name: name.to_string(),
                family,
                port,
                index: d.index,
                dp,
                peers: HashMap::new(),
            });
        }
        let has = |f: Family| {
            devs.iter()
                .any(|d| d.family == f || d.family == Family::Both)
        };
        let public_ip = ctx.ext.ext_addr.unwrap_or(Ipv4Addr::UNSPECIFIED);
        let v6_port = devs
            .iter()
            .find(|d| d.family == Family::V6)
            .map_or(s.listen_port, |d| d.port);
        let attrs = LeaseAttrs {
            public_ip,
            public_ipv6: if cfg.enable_ipv6 {
                ctx.ext.ext_v6_addr
            } else {
                None
            },
            backend_type: "wireguard".into(),
            backend_data: (cfg.enable_ipv4 && has(Family::V4))
                .then(|| lease_data_json(&public, s.listen_port)),
            backend_v6_data: (cfg.enable_ipv6 && has(Family::V6) && ctx.ext.ext_v6_addr.is_some())
                .then(|| lease_data_json(&public, v6_port)),
        };
        let lease = ctx.store.acquire_lease(cfg, &attrs).await?;
        let mut net = WgNetwork {
            lease,
            mtu,
            settings: s.clone(),
            nl,
            devs,
            network4: cfg.network,
            network6: cfg.ipv6_network,
            enable_ipv4: cfg.enable_ipv4,
            enable_ipv6: cfg.enable_ipv6,
            own_v4: ctx.ext.ext_addr,
            own_v6: ctx.ext.ext_v6_addr,
        };
        for i in 0..net.devs.len() {
            net.configure(i).await?;
        }
        Ok(Box::new(net))
    }
}

impl WgNetwork {
    fn own_nets(&self, family: Family) -> (Vec<IpNet>, Vec<IpNet>) {
        let mut subnets = vec![];
        let mut networks = vec![];
        if family != Family::V6 && self.enable_ipv4 {
            subnets.push(IpNet::V4(self.lease.key.ipv4));
            networks.extend(self.network4.map(IpNet::V4));
        }
        if family != Family::V4 && self.enable_ipv6 {
            subnets.extend(self.lease.key.ipv6.map(IpNet::V6));
            networks.extend(self.network6.map(IpNet::V6));
        }
        (subnets, networks)
    }

    /// Address(es), up, network route(s).
    async fn configure(&mut self, i: usize) -> Result<(), BackendError> {
        let (index, name, family) = {
            let d = &self.devs[i];
            (d.index, d.name.clone(), d.family)
        };
        let (subnets, networks) = self.own_nets(family);
        let addrs = self.nl.addresses().await.map_err(err)?;
        for a in addrs.iter().filter(|a| a.index == index) {
            let wanted = subnets
                .iter()
                .any(|s| s.network() == a.ip && s.max_prefix_len() == a.prefix_len);
            if !wanted && networks.iter().any(|n| n.contains(&a.ip)) {
                self.nl.del_address(a, &name).await.map_err(err)?;
            }
        }
        for s in &subnets {
            let have = addrs.iter().any(|a| {
                a.index == index && a.ip == s.network() && a.prefix_len == s.max_prefix_len()
            });
            if !have {
                self.nl
                    .add_address(index, s.network(), s.max_prefix_len(), &name)
                    .await
                    .map_err(err)?;
            }
        }
        self.nl.set_up(index, &name).await.map_err(err)?;
        self.routes(i).await
    }

    /// `<Network> dev flannel-wg scope link` (replace).
    async fn routes(&self, i: usize) -> Result<(), BackendError> {
        let d = &self.devs[i];
        let (_, networks) = self.own_nets(d.family);
        for n in networks {
            self.nl
                .replace_link_route(&RouteSpec {
                    dst: n,
                    gateway: None,
                    oif: Some(d.index),
                    onlink: false,
                    blackhole: false,
                })
                .await
                .map_err(err)?;
        }
        Ok(())
    }

    /// The peer device `i` should have for lease `l` (`None`: nothing for this device).
    fn desired(&self, i: usize, l: &Lease) -> Result<Option<WgPeer>, String> {
        let d = &self.devs[i];
        let a = &l.attrs;
        let v4 = || -> Result<(LeaseData, SocketAddr), String> {
            let data = parse_lease_data(a.backend_data.as_ref())?;
            let port = if data.port == 0 { d.port } else { data.port };
            Ok((data, SocketAddr::new(IpAddr::V4(a.public_ip), port)))
        };
        let v6 = || -> Result<(LeaseData, SocketAddr), String> {
            let data = parse_lease_data(a.backend_v6_data.as_ref())
                .map_err(|e| format!("BackendV6Data: {e}"))?;
            let ip = a.public_ipv6.ok_or("no PublicIPv6")?;
            let port = if data.port == 0 { d.port } else { data.port };
            Ok((data, SocketAddr::new(IpAddr::V6(ip), port)))
        };
        let (data, endpoint, allowed) = match d.family {
            Family::V4 => {
                if a.backend_data.is_none() {
                    return Ok(None);
                }
                let (data, ep) = v4()?;
                (data, ep, vec![IpNet::V4(l.key.ipv4)])
            }
            Family::V6 => {
                let (Some(sn), Some(_)) = (l.key.ipv6, a.backend_v6_data.as_ref()) else {
                    return Ok(None);
                };
                let (data, ep) = v6()?;
                (data, ep, vec![IpNet::V6(sn)])
            }
            Family::Both => {
                let mut allowed = vec![];
                if self.enable_ipv4 {
                    allowed.push(IpNet::V4(l.key.ipv4));
                }
                if self.enable_ipv6 {
                    allowed.extend(l.key.ipv6.map(IpNet::V6));
                }
                let peer_v4 = a.backend_data.is_some() && !a.public_ip.is_unspecified();
                let peer_v6 = a.backend_v6_data.is_some() && a.public_ipv6.is_some();
                let use_v6 = endpoint_is_v6(
                    self.settings.mode,
                    peer_v4.then_some(a.public_ip),
                    if peer_v6 { a.public_ipv6 } else { None },
                    self.own_v4,
                    self.own_v6,
                );
                let (data, ep) = if use_v6 { v6()? } else { v4()? };
                (data, ep, allowed)
            }
        };
        Ok(Some(WgPeer {
            public_key: data.public_key,
            preshared_key: self.settings.psk,
            endpoint: Some(endpoint),
            allowed_ips: allowed,
            keepalive_secs: self.settings.keepalive,
        }))
    }

    async fn add(&mut self, l: &Lease) {
        for i in 0..self.devs.len() {
            let want = match self.desired(i, l) {
                Ok(Some(p)) => p,
                Ok(None) => continue,
                Err(e) => {
                    tracing::warn!(
                        "wireguard: ignoring lease {} on {}: {e}",
                        l.key,
                        self.devs[i].name
                    );
                    continue;
                }
            };
            let d = &mut self.devs[i];
            if let Some(old) = d.peers.get(&l.key).copied() {
                if old != want.public_key {
                    if let Err(e) = d.dp.remove_peer(&old).await {
                        tracing::warn!("wireguard: {e}");
                    }
                }
            }
            match d.dp.set_peer(&want).await {
                Ok(()) => {
                    d.peers.insert(l.key, want.public_key);
                    tracing::info!(
                        "wireguard: {} peer {} endpoint {:?} allowed-ips {:?}",
                        d.name,
                        keys::encode_key(&want.public_key),
                        want.endpoint,
                        want.allowed_ips
                    );
                }
                Err(e) => tracing::warn!(
                    "wireguard: {}: failed to add peer for {}: {e}",
                    d.name,
                    l.key
                ),
            }
            if let Err(e) = self.routes(i).await {
                tracing::warn!("wireguard: {e}");
            }
        }
    }

    async fn remove(&mut self, l: &Lease) {
        for d in &mut self.devs {
            let key = match d.peers.remove(&l.key) {
                Some(k) => k,
                None => continue,
            };
            match d.dp.remove_peer(&key).await {
                Ok(()) => tracing::info!(
                    "wireguard: {} removed peer {} ({})",
                    d.name,
                    keys::encode_key(&key),
                    l.key
                ),
                Err(e) => tracing::warn!("wireguard: {e}"),
            }
        }
    }
}

#[async_trait]
impl Network for WgNetwork {
    fn lease(&self) -> &Lease {
        &self.lease
    }

    fn mtu(&self) -> u32 {
        self.mtu
    }

    async fn lease_added(&mut self, l: &Lease) {
        self.add(l).await
    }

    async fn lease_removed(&mut self, l: &Lease) {
        self.remove(l).await
    }

    async fn resync(&mut self, current: &[Lease]) {
        for i in 0..self.devs.len() {
            let mut keep = std::collections::HashSet::new();
            for l in current {
                if let Ok(Some(p)) = self.desired(i, l) {
                    keep.insert(p.public_key);
                }
            }
            let d = &mut self.devs[i];
            d.peers.retain(|_, k| keep.contains(k));
            let have = match d.dp.peers().await {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!("wireguard: {e}");
                    continue;
                }
            };
            for p in have.into_iter().filter(|p| !keep.contains(&p.public_key)) {
                tracing::info!(
                    "wireguard: {} removing peer {} (no lease)",
                    d.name,
                    keys::encode_key(&p.public_key)
                );
                if let Err(e) = d.dp.remove_peer(&p.public_key).await {
                    tracing::warn!("wireguard: {e}");
                }
            }
        }
    }

    fn check_interval(&self) -> std::time::Duration {
        std::time::Duration::from_secs(10)
    }

    async fn check(&mut self, _current: &[Lease]) {
        for i in 0..self.devs.len() {
            if let Err(e) = self.routes(i).await {
                tracing::warn!("wireguard: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_data_is_gos_json() {
        let k = [7u8; 32];
        assert_eq!(
            lease_data_json(&k, 51820).get(),
            r#"{"PublicKey":"BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=","Port":51820}"#
        );
        let back = parse_lease_data(Some(&lease_data_json(&k, 51820))).unwrap();
        assert_eq!(back.public_key, k);
        assert_eq!(back.port, 51820);
        // Go's decoding: case-insensitive keys, Port optional.
        let r = RawJson::new(r#"{"publickey":"BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc="}"#)
            .unwrap();
        assert_eq!(parse_lease_data(Some(&r)).unwrap().port, 0);
    }

    #[test]
    fn bad_lease_data_is_an_error() {
        let bad = RawJson::new(r#"{"PublicKey":"garbage!!","Port":51820}"#).unwrap();
        assert!(parse_lease_data(Some(&bad))
            .unwrap_err()
            .contains("failed to parse PublicKey"));
        let short = RawJson::new(r#"{"PublicKey":"AAAA","Port":51820}"#).unwrap();
        assert!(parse_lease_data(Some(&short))
            .unwrap_err()
            .contains("incorrect key size: 3"));
        assert!(parse_lease_data(None).is_err());
    }

    #[test]
    fn auto_mode_endpoint_choice_is_gos() {
        let v4 = |s: &str| Some(s.parse::<Ipv4Addr>().unwrap());
        let v6 = |s: &str| Some(s.parse::<Ipv6Addr>().unwrap());
        let auto = WireguardMode::Auto;
        // Only one family on the peer: that one.
        assert!(!endpoint_is_v6(
            auto,
            v4("10.0.0.1"),
            None,
            v4("10.0.0.2"),
            v6("2001:db8::2")
        ));
        assert!(endpoint_is_v6(
            auto,
            None,
            v6("fd00::1"),
            v4("10.0.0.2"),
            v6("fd00::2")
        ));
        // Public peer v4 and we have v4: v4.
        assert!(!endpoint_is_v6(
            auto,
            v4("8.8.8.8"),
            v6("2001:db8::1"),
            v4("1.1.1.1"),
            v6("2001:db8::2")
        ));
        // Private v4, public v6 on both sides: v6.
        assert!(endpoint_is_v6(
            auto,
            v4("10.0.0.1"),
            v6("2001:db8::1"),
            v4("10.0.0.2"),
            v6("2001:db8::2")
        ));
        // Private v4, ULA v6: v4.
        assert!(!endpoint_is_v6(
            auto,
            v4("10.0.0.1"),
            v6("fd00::1"),
            v4("10.0.0.2"),
            v6("fd00::2")
        ));
        // Our v6 is ULA: v4.
        assert!(!endpoint_is_v6(
            auto,
            v4("10.0.0.1"),
            v6("2001:db8::1"),
            v4("10.0.0.2"),
            v6("fd00::2")
        ));
        // Fixed modes.
        assert!(endpoint_is_v6(
            WireguardMode::Ipv6,
            v4("8.8.8.8"),
            v6("fd00::1"),
            None,
            None
        ));
        assert!(!endpoint_is_v6(
            WireguardMode::Ipv4,
            None,
            v6("2001:db8::1"),
            None,
            None
        ));
    }

    #[test]
    fn options_are_checked() {
        let s = Settings::from_backend(&serde_json::json!({"Type":"wireguard"})).unwrap();
        assert_eq!((s.listen_port, s.listen_port_v6), (51820, 51821));
        assert_eq!(s.psk, None);
        let e = Settings::from_backend(&serde_json::json!({"Type":"wireguard","PSK":"AAAA"}))
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "could not parse PSK: wgtypes: incorrect key size: 3"
        );
        let e = Settings::from_backend(&serde_json::json!({"Type":"wireguard","Mode":"x"}))
            .unwrap_err();
        assert_eq!(e.to_string(), "no valid Mode configured");
    }
}
