//! `vxlan`: kernel VXLAN, wire- and host-compatible with Go flannel.
//!
//! Per remote lease: a permanent neighbour (remote subnet's network address -> its VtepMAC), an
//! FDB entry (VtepMAC -> remote PublicIP) and an onlink route `<subnet> via <network address>`;
//! with DirectRouting and a peer on the same L2, a plain route via its PublicIP instead.
//!
//! Better than the reference: the VtepMAC stays stable across restarts (existing device's MAC,
//! else the MAC of our own previous lease); a device deleted behind our back is recreated and
//! every remote entry replayed; stale entries of vanished peers are removed on every snapshot;
//! nothing the kernel forwards with is deleted and re-added on start (restarts drop no flow).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use async_trait::async_trait;
use flannel_types::backend_options::VxlanOptions;
use flannel_types::gojson::FoldedObject;
use flannel_types::lease::RawJson;
use flannel_types::{LeaseAttrs, NetworkConfig, SubnetKey};
use ipnet::{IpNet, Ipv4Net};
use rand::Rng;

use super::{Backend, BackendContext, BackendError, Network};
use crate::iface::ExternalInterface;
use crate::lease::{Lease, LeaseEvent};
use crate::netlink::{format_mac, parse_mac, LinkDetails, Netlink, RouteSpec, VxlanSpec};

/// Bytes of VXLAN encapsulation (outer IPv4 + UDP + VXLAN + inner Ethernet).
const OVERHEAD: u32 = 50;

/// The kernel's default VXLAN port (used when `Port` is 0).
const KERNEL_DEFAULT_PORT: u16 = 8472;

/// The vxlan backend.
pub struct VxlanBackend {
    opts: VxlanOptions,
}

impl VxlanBackend {
    /// Registry constructor: validates the options.
    pub fn create(ctx: &BackendContext) -> Result<Box<dyn Backend>, BackendError> {
        let opts = VxlanOptions::from_backend(&ctx.config.backend)?;
        if !(0..=0xff_ffff).contains(&opts.vni) {
            return Err(BackendError::Other(format!(
                "invalid VNI {}: must be 0..16777215",
                opts.vni
            )));
        }
        if !(0..=65535).contains(&opts.port) {
            return Err(BackendError::Other(format!(
                "invalid vxlan Port {}",
                opts.port
            )));
        }
        Ok(Box::new(VxlanBackend { opts }))
    }
}

fn nl_err(e: impl std::fmt::Display) -> BackendError {
    BackendError::Other(e.to_string())
}

fn random_mac() -> [u8; 6] {
    let mut mac: [u8; 6] = rand::rng().random();
    mac[0] = (mac[0] & 0xfe) | 0x02; // unicast, locally administered
    mac
}

/// `{"VNI":1,"VtepMAC":"..."}` of a lease.
#[derive(Debug, Clone, PartialEq, Eq)]
struct VxlanLeaseData {
    vni: i64,
    mac: [u8; 6],
}

fn parse_lease_data(data: Option<&RawJson>) -> Result<VxlanLeaseData, String> {
    let data = data.ok_or("no BackendData")?;
    let v: serde_json::Value = data.parse().map_err(|e| e.to_string())?;
    let o = FoldedObject::from_value(v, "vxlan.vxlanLeaseAttrs")?;
    let vni = o.int_field("VNI", "int", i64::MIN, i64::MAX)?.unwrap_or(0);
    let mac_text = o.string_field("VtepMAC")?.ok_or("no VtepMAC")?;
    let mac = parse_mac(&mac_text).ok_or_else(|| format!("invalid VtepMAC {mac_text:?}"))?;
    Ok(VxlanLeaseData { vni, mac })
}

/// What was installed for one remote lease.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Applied {
    /// Neighbour + FDB + onlink route through the vxlan device.
    Tunnel {
        subnet: Ipv4Net,
        gateway: Ipv4Addr,
        mac: [u8; 6],
        public_ip: Ipv4Addr,
    },
    /// A plain route to the peer's public IP (DirectRouting, same L2).
    Direct {
        subnet: Ipv4Net,
        public_ip: Ipv4Addr,
    },
}

struct VxlanNetwork {
    nl: Netlink,
    lease: Lease,
    config: NetworkConfig,
    ext: ExternalInterface,
    opts: VxlanOptions,
    spec: VxlanSpec,
    index: u32,
    mtu: u32,
    applied: BTreeMap<SubnetKey, Applied>,
}

fn compatible(d: &LinkDetails, spec: &VxlanSpec) -> bool {
    let Some(x) = &d.vxlan else {
        return false;
    };
    d.kind.as_deref() == Some("vxlan")
        && x.vni == Some(spec.vni)
        && (x.dev.is_none() || x.dev == Some(spec.dev))
        && (spec.local.is_none() || x.local.is_none() || x.local == spec.local)
        && x.group.is_none_or(|g| g.is_unspecified())
        && x.l2miss != Some(true)
        && x.port.unwrap_or(KERNEL_DEFAULT_PORT)
            == if spec.port == 0 {
                KERNEL_DEFAULT_PORT
            } else {
                spec.port
            }
        && x.gbp == spec.gbp
}

/// Makes sure the device exists as `spec` says; returns its details (reusing a compatible one).
async fn ensure_device(nl: &Netlink, spec: &VxlanSpec) -> Result<LinkDetails, BackendError> {
    if let Some(d) = nl.link_details(&spec.name).await.map_err(nl_err)? {
        if compatible(&d, spec) {
            tracing::info!(
                "reusing existing vxlan device {} ({:?})",
                spec.name,
                d.mac.map(|m| format_mac(&m))
            );
            return Ok(d);
        }
        tracing::warn!(
            "{} already exists with incompatible configuration, recreating it",
            spec.name
        );
        nl.delete_link(d.index, &spec.name).await.map_err(nl_err)?;
    }
    nl.create_vxlan(spec).await.map_err(nl_err)?;
    nl.link_details(&spec.name)
        .await
        .map_err(nl_err)?
        .ok_or_else(|| BackendError::Other(format!("{} vanished right after creation", spec.name)))
}

/// Puts `<subnet network>/32` on the device, removes other addresses of the flannel network
/// from it, and sets it up; leaves an already-correct device untouched.
async fn configure_device(
    nl: &Netlink,
    index: u32,
    name: &str,
    subnet: Ipv4Net,
    network: Option<Ipv4Net>,
) -> Result<(), BackendError> {
    let want = IpAddr::V4(subnet.network());
    let addrs = nl.addresses().await.map_err(nl_err)?;
    for a in addrs.iter().filter(|a| a.index == index) {
        let stale = a.ip != want
            && match (a.ip, network) {
                (IpAddr::V4(ip), Some(n)) => n.contains(&ip),
                _ => false,
            };
        if stale {
            tracing::info!(
                "removing stale address {}/{} from {name}",
                a.ip,
                a.prefix_len
            );
            nl.del_address(a, name).await.map_err(nl_err)?;
        }
    }
    if !addrs
        .iter()
        .any(|a| a.index == index && a.ip == want && a.prefix_len == 32)
    {
        nl.add_address(index, want, 32, name)
            .await
            .map_err(nl_err)?;
    }
    nl.set_up(index, name).await.map_err(nl_err)
}

#[async_trait]
impl Backend for VxlanBackend {
    async fn register_network(
        &self,
        ctx: &BackendContext,
    ) -> Result<Box<dyn Network>, BackendError> {
        let nl = Netlink::open().map_err(nl_err)?;
        let vni = self.opts.vni as u32;
        let name = format!("flannel.{vni}");
        let base_mtu = if self.opts.mtu > 0 {
            self.opts.mtu as u32
        } else {
            ctx.ext.mtu
        };
        let public_ip = ctx.ext.ext_addr.unwrap_or(Ipv4Addr::UNSPECIFIED);
        // Stable VtepMAC: the existing device's, else the one in our previous lease.
        let existing_mac = nl
            .link_details(&name)
            .await
            .map_err(nl_err)?
            .and_then(|d| d.mac);
        let previous_mac = match existing_mac {
            Some(_) => None,
            None => ctx
                .store
                .lease_by_public_ip(public_ip)
                .await
                .ok()
                .flatten()
                .filter(|l| l.attrs.backend_type == "vxlan")
                .and_then(|l| parse_lease_data(l.attrs.backend_data.as_ref()).ok())
                .map(|d| d.mac),
        };
        let mut spec = VxlanSpec {
            name: name.clone(),
            vni,
            dev: ctx.ext.index,
            local: ctx.ext.iface_addr,
            port: self.opts.port as u16,
            learning: self.opts.learning,
            gbp: self.opts.gbp,
            mtu: base_mtu.saturating_sub(OVERHEAD),
            mac: existing_mac.or(previous_mac).unwrap_or_else(random_mac),
        };
        let dev = ensure_device(&nl, &spec).await?;
        if let Some(mac) = dev.mac {
            spec.mac = mac;
        }
        let data = RawJson::new(&format!(
            r#"{{"VNI":{vni},"VtepMAC":"{}"}}"#,
            format_mac(&spec.mac)
        ))
        .map_err(nl_err)?;
        let attrs = LeaseAttrs {
            public_ip,
            public_ipv6: None,
            backend_type: "vxlan".into(),
            backend_data: Some(data),
            backend_v6_data: None,
        };
        let lease = ctx.store.acquire_lease(&ctx.config, &attrs).await?;
        configure_device(&nl, dev.index, &name, lease.key.ipv4, ctx.config.network).await?;
        let now = nl
            .link_details(&name)
            .await
            .map_err(nl_err)?
            .ok_or_else(|| BackendError::Other(format!("{name} vanished")))?;
        if now.mac != Some(spec.mac) {
            return Err(BackendError::Other(format!(
                "{name}'s MAC address {:?} differs from the expected {} (check systemd MACAddressPolicy)",
                now.mac.map(|m| format_mac(&m)),
                format_mac(&spec.mac)
            )));
        }
        Ok(Box::new(VxlanNetwork {
            nl,
            lease,
            config: ctx.config.clone(),
            ext: ctx.ext.clone(),
            opts: self.opts.clone(),
            spec,
            index: now.index,
            mtu: now.mtu,
            applied: BTreeMap::new(),
        }))
    }
}

impl VxlanNetwork {
    /// Decides what to install for a remote lease, or why it is skipped.
    async fn desired(&self, l: &Lease) -> Result<Applied, String> {
        if l.attrs.backend_type != "vxlan" {
            return Err(format!(
                "ignoring non-vxlan subnet {}: type={:?}",
                l.key, l.attrs.backend_type
            ));
        }
        let data = parse_lease_data(l.attrs.backend_data.as_ref())
            .map_err(|e| format!("ignoring subnet {} with bad BackendData: {e}", l.key))?;
        if data.vni != self.spec.vni as i64 {
            tracing::debug!(
                "lease {} advertises VNI {} (ours {})",
                l.key,
                data.vni,
                self.spec.vni
            );
        }
        if self.opts.direct_routing {
            if let Ok(routes) = self.nl.route_get(IpAddr::V4(l.attrs.public_ip)).await {
                if routes.len() == 1 && routes[0].gateway.is_none() {
                    return Ok(Applied::Direct {
                        subnet: l.key.ipv4,
                        public_ip: l.attrs.public_ip,
                    });
                }
            }
        }
        Ok(Applied::Tunnel {
            subnet: l.key.ipv4,
            gateway: l.key.ipv4.network(),
            mac: data.mac,
            public_ip: l.attrs.public_ip,
        })
    }

    fn route_for(&self, a: &Applied) -> RouteSpec {
        match a {
            Applied::Tunnel {
                subnet, gateway, ..
            } => RouteSpec {
                dst: IpNet::V4(*subnet),
                gateway: Some(IpAddr::V4(*gateway)),
                oif: Some(self.index),
                onlink: true,
                blackhole: false,
            },
            Applied::Direct { subnet, public_ip } => RouteSpec {
                dst: IpNet::V4(*subnet),
                gateway: Some(IpAddr::V4(*public_ip)),
                oif: None,
                onlink: false,
                blackhole: false,
            },
        }
    }

    async fn install(&self, a: &Applied) -> Result<(), String> {
        match a {
            Applied::Tunnel {
                gateway,
                mac,
                public_ip,
                ..
            } => {
                self.nl
                    .replace_neighbour(self.index, IpAddr::V4(*gateway), *mac)
                    .await
                    .map_err(|e| e.to_string())?;
                if let Err(e) = self
                    .nl
                    .replace_fdb(self.index, *mac, IpAddr::V4(*public_ip))
                    .await
                {
                    let _ = self
                        .nl
                        .delete_neighbour(self.index, IpAddr::V4(*gateway))
                        .await;
                    return Err(e.to_string());
                }
                if let Err(e) = self.nl.replace_route(&self.route_for(a)).await {
                    let _ = self
                        .nl
                        .delete_fdb(self.index, *mac, Some(IpAddr::V4(*public_ip)))
                        .await;
                    let _ = self
                        .nl
                        .delete_neighbour(self.index, IpAddr::V4(*gateway))
                        .await;
                    return Err(e.to_string());
                }
                Ok(())
            }
            Applied::Direct { .. } => self
                .nl
                .replace_route(&self.route_for(a))
                .await
                .map_err(|e| e.to_string()),
        }
    }

    /// Removes what `old` installed, except parts `new` (if any) still needs.
    async fn uninstall(&self, old: &Applied, new: Option<&Applied>) {
        let mut errors = vec![];
        if new.map(|n| self.route_for(n)) != Some(self.route_for(old)) {
            let route = self.route_for(old);
            let keep_route = new.is_some_and(|n| self.route_for(n).dst == route.dst);
            if !keep_route {
                if let Err(e) = self.nl.delete_route(&route).await {
                    errors.push(e.to_string());
                }
            }
        }
        if let Applied::Tunnel {
            gateway,
            mac,
            public_ip,
            ..
        } = old
        {
            let (keep_neigh, keep_fdb) = match new {
                Some(Applied::Tunnel {
                    gateway: g, mac: m, ..
                }) => (g == gateway, m == mac),
                _ => (false, false),
            };
            if !keep_neigh {
                if let Err(e) = self
                    .nl
                    .delete_neighbour(self.index, IpAddr::V4(*gateway))
                    .await
                {
                    errors.push(e.to_string());
                }
            }
            if !keep_fdb {
                if let Err(e) = self
                    .nl
                    .delete_fdb(self.index, *mac, Some(IpAddr::V4(*public_ip)))
                    .await
                {
                    errors.push(e.to_string());
                }
            }
        }
        for e in errors {
            tracing::error!("{e}");
        }
    }

    async fn add(&mut self, l: &Lease) {
        let want = match self.desired(l).await {
            Ok(a) => a,
            Err(msg) => {
                tracing::warn!("{msg}");
                if let Some(old) = self.applied.remove(&l.key) {
                    self.uninstall(&old, None).await;
                }
                return;
            }
        };
        if let Some(old) = self.applied.get(&l.key).cloned() {
            if old != want {
                self.uninstall(&old, Some(&want)).await;
            }
        }
        match self.install(&want).await {
            Ok(()) => {
                tracing::info!("vxlan: {} reachable via {}", l.key, l.attrs.public_ip);
                self.applied.insert(l.key, want);
            }
            Err(e) => tracing::error!("failed to add vxlan entries for {}: {e}", l.key),
        }
    }

    async fn remove(&mut self, l: &Lease) {
        let old = match self.applied.remove(&l.key) {
            Some(a) => a,
            None => match self.desired(l).await {
                Ok(a) => a,
                Err(_) => return,
            },
        };
        self.uninstall(&old, None).await;
        tracing::info!("vxlan: removed entries of {}", l.key);
    }

    /// Deletes kernel entries on our device that belong to no current lease.
    async fn remove_stale(&mut self, current: &[Lease]) {
        let keys: BTreeSet<SubnetKey> = current.iter().map(|l| l.key).collect();
        let gone: Vec<SubnetKey> = self
            .applied
            .keys()
            .filter(|k| !keys.contains(k))
            .copied()
            .collect();
        for k in gone {
            if let Some(a) = self.applied.remove(&k) {
                self.uninstall(&a, None).await;
            }
        }
        let want_routes: Vec<RouteSpec> =
            self.applied.values().map(|a| self.route_for(a)).collect();
        let want_gws: BTreeSet<IpAddr> = self
            .applied
            .values()
            .filter_map(|a| match a {
                Applied::Tunnel { gateway, .. } => Some(IpAddr::V4(*gateway)),
                _ => None,
            })
            .collect();
        let want_macs: BTreeSet<[u8; 6]> = self
            .applied
            .values()
            .filter_map(|a| match a {
                Applied::Tunnel { mac, .. } => Some(*mac),
                _ => None,
            })
            .collect();
        let own = self.lease.key.ipv4;
        let network = self.config.network;
        let in_network = |dst: Option<IpNet>| match (dst, network) {
            (Some(IpNet::V4(d)), Some(n)) => n.contains(&d) && d != own,
            _ => false,
        };
        if let Ok(routes) = self.nl.routes(false).await {
            for r in routes {
                let ours = r.oif == Some(self.index)
                    || (self.opts.direct_routing
                        && r.oif == Some(self.ext.index)
                        && r.protocol == netlink_packet_route::route::RouteProtocol::Boot);
                if ours
                    && r.table == 254
                    && in_network(r.destination_net())
                    && r.gateway.is_some()
                    && !want_routes.iter().any(|w| w.matches(&r))
                {
                    tracing::info!(
                        "removing stale route {:?} via {:?}",
                        r.destination_net(),
                        r.gateway
                    );
                    if let Err(e) = self.nl.delete_kernel_route(&r).await {
                        tracing::error!("{e}");
                    }
                }
            }
        }
        if let Ok(neighs) = self.nl.neighbours(self.index, false).await {
            for n in neighs.into_iter().filter(|n| n.permanent) {
                if let Some(ip) = n.ip.filter(|ip| ip.is_ipv4() && !want_gws.contains(ip)) {
                    tracing::info!("removing stale neighbour {ip} on {}", self.spec.name);
                    if let Err(e) = self.nl.delete_neighbour(self.index, ip).await {
                        tracing::error!("{e}");
                    }
                }
            }
        }
        if let Ok(fdb) = self.nl.neighbours(self.index, true).await {
            for n in fdb.into_iter().filter(|n| n.permanent) {
                if let Some(mac) = n.mac.filter(|m| !want_macs.contains(m)) {
                    tracing::info!(
                        "removing stale FDB entry {} on {}",
                        format_mac(&mac),
                        self.spec.name
                    );
                    if let Err(e) = self.nl.delete_fdb(self.index, mac, n.dst).await {
                        tracing::error!("{e}");
                    }
                }
            }
        }
    }
}

#[async_trait]
impl Network for VxlanNetwork {
    fn lease(&self) -> &Lease {
        &self.lease
    }

    fn mtu(&self) -> u32 {
        self.mtu
    }

    async fn handle_events(&mut self, batch: Vec<LeaseEvent>) {
        for e in batch {
            match e {
                LeaseEvent::Added(l) => self.add(&l).await,
                LeaseEvent::Removed(l) => self.remove(&l).await,
            }
        }
    }

    async fn resync(&mut self, current: &[Lease]) {
        self.remove_stale(current).await;
    }

    fn check_interval(&self) -> Duration {
        Duration::from_secs(1)
    }

    /// Recreates the device if it was deleted, then replays every remote entry onto it.
    async fn check(&mut self, current: &[Lease]) {
        let present = match self.nl.link_details(&self.spec.name).await {
            Ok(d) => d,
            Err(e) => {
                tracing::error!("{e}");
                return;
            }
        };
        if present.as_ref().is_some_and(|d| d.index == self.index) {
            return;
        }
        tracing::warn!("{} was deleted or replaced; recreating it", self.spec.name);
        let dev = match ensure_device(&self.nl, &self.spec).await {
            Ok(d) => d,
            Err(e) => {
                tracing::error!("failed to recreate {}: {e}", self.spec.name);
                return;
            }
        };
        if let Err(e) = configure_device(
            &self.nl,
            dev.index,
            &self.spec.name,
            self.lease.key.ipv4,
            self.config.network,
        )
        .await
        {
            tracing::error!("failed to configure {}: {e}", self.spec.name);
            return;
        }
        self.index = dev.index;
        self.applied.clear();
        for l in current {
            self.add(l).await;
        }
        tracing::info!(
            "{} recreated and {} remote entries replayed",
            self.spec.name,
            self.applied.len()
        );
    }
}
