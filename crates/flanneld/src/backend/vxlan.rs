//! `vxlan`: kernel VXLAN, wire- and host-compatible with Go flannel.
//!
//! Per remote lease and address family: a permanent neighbour (remote subnet's network address
//! -> its VtepMAC), an FDB entry (VtepMAC -> remote public IP) and an onlink route `<subnet> via
//! <network address>`; with DirectRouting and a peer on the same L2, a plain route via its public
//! IP instead. IPv4 uses `flannel.<VNI>` and `BackendData`; IPv6 uses `flannel-v6.<VNI>` and
//! `BackendV6Data`.
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
use ipnet::IpNet;
use netlink_packet_route::route::RouteProtocol;
use rand::Rng;

use super::{Backend, BackendContext, BackendError, Network};
use crate::iface::ExternalInterface;
use crate::lease::Lease;
use crate::netlink::{format_mac, parse_mac, LinkDetails, Netlink, RouteSpec, VxlanSpec};

/// Bytes Go flannel subtracts for VXLAN encapsulation (for both families).
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
    let data = data.ok_or("no backend data")?;
    let v: serde_json::Value = data.parse().map_err(|e| e.to_string())?;
    let o = FoldedObject::from_value(v, "vxlan.vxlanLeaseAttrs")?;
    let vni = o.int_field("VNI", "int", i64::MIN, i64::MAX)?.unwrap_or(0);
    let mac_text = o.string_field("VtepMAC")?.ok_or("no VtepMAC")?;
    let mac = parse_mac(&mac_text).ok_or_else(|| format!("invalid VtepMAC {mac_text:?}"))?;
    Ok(VxlanLeaseData { vni, mac })
}

fn lease_data_json(vni: u32, mac: &[u8; 6]) -> Result<RawJson, BackendError> {
    RawJson::new(&format!(
        r#"{{"VNI":{vni},"VtepMAC":"{}"}}"#,
        format_mac(mac)
    ))
    .map_err(nl_err)
}

/// What was installed for one remote lease and family.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Applied {
    /// Neighbour + FDB + onlink route through the family's vxlan device.
    Tunnel {
        dev: u32,
        subnet: IpNet,
        gateway: IpAddr,
        mac: [u8; 6],
        public_ip: IpAddr,
    },
    /// A plain route to the peer's public IP (DirectRouting, same L2).
    Direct { subnet: IpNet, public_ip: IpAddr },
}

/// One family's vxlan device.
#[derive(Debug, Clone)]
struct Dev {
    spec: VxlanSpec,
    index: u32,
    v6: bool,
}

struct VxlanNetwork {
    nl: Netlink,
    lease: Lease,
    config: NetworkConfig,
    ext: ExternalInterface,
    opts: VxlanOptions,
    devs: Vec<Dev>,
    mtu: u32,
    applied: BTreeMap<(SubnetKey, bool), Applied>,
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

/// Puts `<subnet network>/32` (`/128` for IPv6) on the device, removes other addresses of the
/// flannel network from it, and sets it up; leaves an already-correct device untouched.
pub(super) async fn configure_device(
    nl: &Netlink,
    index: u32,
    name: &str,
    subnet: IpNet,
    network: Option<IpNet>,
) -> Result<(), BackendError> {
    let want = subnet.network();
    let host_len = subnet.max_prefix_len();
    let addrs = nl.addresses().await.map_err(nl_err)?;
    for a in addrs.iter().filter(|a| a.index == index) {
        let stale = a.ip != want && network.is_some_and(|n| n.contains(&a.ip));
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
        .any(|a| a.index == index && a.ip == want && a.prefix_len == host_len)
    {
        nl.add_address(index, want, host_len, name)
            .await
            .map_err(nl_err)?;
    }
    if subnet.addr().is_ipv6() {
        // As Go flannel: no router advertisements on the vxlan device.
        let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/accept_ra"), "0");
    }
    nl.set_up(index, name).await.map_err(nl_err)
}

impl VxlanNetwork {
    fn own_subnet(&self, v6: bool) -> Option<IpNet> {
        if v6 {
            self.lease.key.ipv6.map(IpNet::V6)
        } else {
            Some(IpNet::V4(self.lease.key.ipv4))
        }
    }

    fn network(&self, v6: bool) -> Option<IpNet> {
        if v6 {
            self.config.ipv6_network.map(IpNet::V6)
        } else {
            self.config.network.map(IpNet::V4)
        }
    }

    fn dev(&self, v6: bool) -> Option<&Dev> {
        self.devs.iter().find(|d| d.v6 == v6)
    }

    /// What to install for a remote lease in one family: `None` when the lease or this host has
    /// nothing in that family, `Err` (logged) when the lease is unusable.
    async fn desired(&self, l: &Lease, v6: bool) -> Option<Result<Applied, String>> {
        let dev = self.dev(v6)?;
        let (subnet, public_ip, data) = if v6 {
            (
                IpNet::V6(l.key.ipv6?),
                IpAddr::V6(l.attrs.public_ipv6?),
                l.attrs.backend_v6_data.as_ref(),
            )
        } else {
            (
                IpNet::V4(l.key.ipv4),
                IpAddr::V4(l.attrs.public_ip),
                l.attrs.backend_data.as_ref(),
            )
        };
        if l.attrs.backend_type != "vxlan" {
            return Some(Err(format!(
                "ignoring non-vxlan subnet {}: type={:?}",
                l.key, l.attrs.backend_type
            )));
        }
        let data = match parse_lease_data(data) {
            Ok(d) => d,
            Err(e) => {
                return Some(Err(format!(
                    "ignoring subnet {} with bad {}: {e}",
                    l.key,
                    if v6 { "BackendV6Data" } else { "BackendData" }
                )))
            }
        };
        if data.vni != dev.spec.vni as i64 {
            tracing::debug!(
                "lease {} advertises VNI {} (ours {})",
                l.key,
                data.vni,
                dev.spec.vni
            );
        }
        if self.opts.direct_routing {
            if let Ok(routes) = self.nl.route_get(public_ip).await {
                if routes.len() == 1 && routes[0].gateway.is_none() {
                    return Some(Ok(Applied::Direct { subnet, public_ip }));
                }
            }
        }
        Some(Ok(Applied::Tunnel {
            dev: dev.index,
            subnet,
            gateway: subnet.network(),
            mac: data.mac,
            public_ip,
        }))
    }

    fn route_for(a: &Applied) -> RouteSpec {
        match a {
            Applied::Tunnel {
                dev,
                subnet,
                gateway,
                ..
            } => RouteSpec {
                dst: *subnet,
                gateway: Some(*gateway),
                oif: Some(*dev),
                onlink: true,
                blackhole: false,
            },
            Applied::Direct { subnet, public_ip } => RouteSpec {
                dst: *subnet,
                gateway: Some(*public_ip),
                oif: None,
                onlink: false,
                blackhole: false,
            },
        }
    }

    async fn install(&self, a: &Applied) -> Result<(), String> {
        match a {
            Applied::Tunnel {
                dev,
                gateway,
                mac,
                public_ip,
                ..
            } => {
                self.nl
                    .replace_neighbour(*dev, *gateway, *mac)
                    .await
                    .map_err(|e| e.to_string())?;
                if let Err(e) = self.nl.replace_fdb(*dev, *mac, *public_ip).await {
                    let _ = self.nl.delete_neighbour(*dev, *gateway).await;
                    return Err(e.to_string());
                }
                if let Err(e) = self.nl.replace_route(&Self::route_for(a)).await {
                    let _ = self.nl.delete_fdb(*dev, *mac, Some(*public_ip)).await;
                    let _ = self.nl.delete_neighbour(*dev, *gateway).await;
                    return Err(e.to_string());
                }
                Ok(())
            }
            Applied::Direct { .. } => self
                .nl
                .replace_route(&Self::route_for(a))
                .await
                .map_err(|e| e.to_string()),
        }
    }

    /// Removes what `old` installed, except parts `new` (if any) still needs.
    async fn uninstall(&self, old: &Applied, new: Option<&Applied>) {
        let mut errors = vec![];
        let route = Self::route_for(old);
        let keep_route = new.is_some_and(|n| Self::route_for(n).dst == route.dst);
        if !keep_route {
            if let Err(e) = self.nl.delete_route(&route).await {
                errors.push(e.to_string());
            }
        }
        if let Applied::Tunnel {
            dev,
            gateway,
            mac,
            public_ip,
            ..
        } = old
        {
            let (keep_neigh, keep_fdb) = match new {
                Some(Applied::Tunnel {
                    dev: d,
                    gateway: g,
                    mac: m,
                    ..
                }) => (d == dev && g == gateway, d == dev && m == mac),
                _ => (false, false),
            };
            if !keep_neigh {
                if let Err(e) = self.nl.delete_neighbour(*dev, *gateway).await {
                    errors.push(e.to_string());
                }
            }
            if !keep_fdb {
                if let Err(e) = self.nl.delete_fdb(*dev, *mac, Some(*public_ip)).await {
                    errors.push(e.to_string());
                }
            }
        }
        for e in errors {
            tracing::error!("{e}");
        }
    }

    async fn add(&mut self, l: &Lease) {
        for v6 in [false, true] {
            let slot = (l.key, v6);
            let want = match self.desired(l, v6).await {
                None => None,
                Some(Ok(a)) => Some(a),
                Some(Err(msg)) => {
                    tracing::warn!("{msg}");
                    None
                }
            };
            let Some(want) = want else {
                if let Some(old) = self.applied.remove(&slot) {
                    self.uninstall(&old, None).await;
                }
                continue;
            };
            if let Some(old) = self.applied.get(&slot).cloned() {
                if old != want {
                    self.uninstall(&old, Some(&want)).await;
                }
            }
            match self.install(&want).await {
                Ok(()) => {
                    let via = match &want {
                        Applied::Tunnel { public_ip, .. } | Applied::Direct { public_ip, .. } => {
                            *public_ip
                        }
                    };
                    tracing::info!("vxlan: {} reachable via {via}", Self::route_for(&want).dst);
                    self.applied.insert(slot, want);
                }
                Err(e) => tracing::error!("failed to add vxlan entries for {}: {e}", l.key),
            }
        }
    }

    async fn remove(&mut self, l: &Lease) {
        for v6 in [false, true] {
            let old = match self.applied.remove(&(l.key, v6)) {
                Some(a) => a,
                None => match self.desired(l, v6).await {
                    Some(Ok(a)) => a,
                    _ => continue,
                },
            };
            self.uninstall(&old, None).await;
        }
        tracing::info!("vxlan: removed entries of {}", l.key);
    }

    /// Deletes kernel entries on our devices that belong to no current lease.
    async fn remove_stale(&mut self, current: &[Lease]) {
        let keys: BTreeSet<SubnetKey> = current.iter().map(|l| l.key).collect();
        let gone: Vec<(SubnetKey, bool)> = self
            .applied
            .keys()
            .filter(|(k, _)| !keys.contains(k))
            .copied()
            .collect();
        for slot in gone {
            if let Some(a) = self.applied.remove(&slot) {
                self.uninstall(&a, None).await;
            }
        }
        let want_routes: Vec<RouteSpec> = self.applied.values().map(Self::route_for).collect();
        let want_gws: BTreeSet<IpAddr> = self
            .applied
            .values()
            .filter_map(|a| match a {
                Applied::Tunnel { gateway, .. } => Some(*gateway),
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
        for dev in self.devs.clone() {
            let own = self.own_subnet(dev.v6);
            let network = self.network(dev.v6);
            let in_network = |dst: Option<IpNet>| match (dst, network) {
                (Some(d), Some(n)) => n.contains(&d) && Some(d) != own,
                _ => false,
            };
            if let Ok(routes) = self.nl.routes(dev.v6).await {
                for r in routes {
                    let ours = r.oif == Some(dev.index)
                        || (self.opts.direct_routing
                            && r.oif == Some(self.ext.index)
                            && r.protocol == RouteProtocol::Boot);
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
            if let Ok(neighs) = self.nl.neighbours(dev.index, false).await {
                for n in neighs.into_iter().filter(|n| n.permanent) {
                    if let Some(ip) = n.ip.filter(|ip| !want_gws.contains(ip)) {
                        tracing::info!("removing stale neighbour {ip} on {}", dev.spec.name);
                        if let Err(e) = self.nl.delete_neighbour(dev.index, ip).await {
                            tracing::error!("{e}");
                        }
                    }
                }
            }
            if let Ok(fdb) = self.nl.neighbours(dev.index, true).await {
                for n in fdb.into_iter().filter(|n| n.permanent) {
                    if let Some(mac) = n.mac.filter(|m| !want_macs.contains(m)) {
                        tracing::info!(
                            "removing stale FDB entry {} on {}",
                            format_mac(&mac),
                            dev.spec.name
                        );
                        if let Err(e) = self.nl.delete_fdb(dev.index, mac, n.dst).await {
                            tracing::error!("{e}");
                        }
                    }
                }
            }
        }
    }
}

#[async_trait]
impl Backend for VxlanBackend {
    async fn register_network(
        &self,
        ctx: &BackendContext,
    ) -> Result<Box<dyn Network>, BackendError> {
        let nl = Netlink::open().map_err(nl_err)?;
        let vni = self.opts.vni as u32;
        let base_mtu = if self.opts.mtu > 0 {
            self.opts.mtu as u32
        } else {
            ctx.ext.mtu
        };
        let public_ip = ctx.ext.ext_addr.unwrap_or(Ipv4Addr::UNSPECIFIED);
        // Stable VtepMACs: the existing devices', else those in our previous lease.
        let previous = ctx
            .store
            .lease_by_public_ip(public_ip)
            .await
            .ok()
            .flatten()
            .filter(|l| l.attrs.backend_type == "vxlan");
        let mut families = vec![];
        if ctx.config.enable_ipv4 {
            families.push((
                false,
                format!("flannel.{vni}"),
                ctx.ext.iface_addr.map(IpAddr::V4),
            ));
        }
        if ctx.config.enable_ipv6 {
            families.push((
                true,
                format!("flannel-v6.{vni}"),
                ctx.ext.iface_v6_addr.map(IpAddr::V6),
            ));
        }
        let mut devs = vec![];
        for (v6, name, local) in families {
            let existing_mac = nl
                .link_details(&name)
                .await
                .map_err(nl_err)?
                .and_then(|d| d.mac);
            let previous_mac = previous.as_ref().and_then(|l| {
                let data = if v6 {
                    l.attrs.backend_v6_data.as_ref()
                } else {
                    l.attrs.backend_data.as_ref()
                };
                parse_lease_data(data).ok().map(|d| d.mac)
            });
            let mut spec = VxlanSpec {
                name,
                vni,
                dev: ctx.ext.index,
                local,
                port: self.opts.port as u16,
                learning: self.opts.learning,
                gbp: self.opts.gbp,
                mtu: base_mtu.saturating_sub(OVERHEAD),
                mac: existing_mac.or(previous_mac).unwrap_or_else(random_mac),
            };
            let d = ensure_device(&nl, &spec).await?;
            if let Some(mac) = d.mac {
                spec.mac = mac;
            }
            devs.push(Dev {
                spec,
                index: d.index,
                v6,
            });
        }
        let v4dev = devs.iter().find(|d| !d.v6);
        let v6dev = devs.iter().find(|d| d.v6);
        let attrs = LeaseAttrs {
            public_ip,
            public_ipv6: v6dev.and(ctx.ext.ext_v6_addr),
            backend_type: "vxlan".into(),
            backend_data: v4dev
                .map(|d| lease_data_json(vni, &d.spec.mac))
                .transpose()?,
            backend_v6_data: match (v6dev, ctx.ext.ext_v6_addr) {
                (Some(d), Some(_)) => Some(lease_data_json(vni, &d.spec.mac)?),
                _ => None,
            },
        };
        let lease = ctx.store.acquire_lease(&ctx.config, &attrs).await?;
        let mut mtu = 0;
        for d in &devs {
            let (subnet, network) = if d.v6 {
                let sn = lease.key.ipv6.ok_or_else(|| {
                    BackendError::Other(format!(
                        "failed to configure interface {}: IPv6 is enabled but the lease has no IPv6",
                        d.spec.name
                    ))
                })?;
                (IpNet::V6(sn), ctx.config.ipv6_network.map(IpNet::V6))
            } else {
                (IpNet::V4(lease.key.ipv4), ctx.config.network.map(IpNet::V4))
            };
            configure_device(&nl, d.index, &d.spec.name, subnet, network).await?;
            let now = nl
                .link_details(&d.spec.name)
                .await
                .map_err(nl_err)?
                .ok_or_else(|| BackendError::Other(format!("{} vanished", d.spec.name)))?;
            if now.mac != Some(d.spec.mac) {
                return Err(BackendError::Other(format!(
                    "{}'s MAC address {:?} differs from the expected {} (check systemd MACAddressPolicy)",
                    d.spec.name,
                    now.mac.map(|m| format_mac(&m)),
                    format_mac(&d.spec.mac)
                )));
            }
            if mtu == 0 || !d.v6 {
                mtu = now.mtu;
            }
        }
        Ok(Box::new(VxlanNetwork {
            nl,
            lease,
            config: ctx.config.clone(),
            ext: ctx.ext.clone(),
            opts: self.opts.clone(),
            devs,
            mtu,
            applied: BTreeMap::new(),
        }))
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

    async fn lease_added(&mut self, lease: &Lease) {
        self.add(lease).await
    }

    async fn lease_removed(&mut self, lease: &Lease) {
        self.remove(lease).await
    }

    async fn resync(&mut self, current: &[Lease]) {
        self.remove_stale(current).await;
    }

    fn check_interval(&self) -> Duration {
        Duration::from_secs(1)
    }

    /// Recreates a device that was deleted, then replays every remote entry onto it.
    async fn check(&mut self, current: &[Lease]) {
        let mut recreated = false;
        for i in 0..self.devs.len() {
            let dev = self.devs[i].clone();
            let present = match self.nl.link_details(&dev.spec.name).await {
                Ok(d) => d,
                Err(e) => {
                    tracing::error!("{e}");
                    continue;
                }
            };
            if present.as_ref().is_some_and(|d| d.index == dev.index) {
                continue;
            }
            tracing::warn!("{} was deleted or replaced; recreating it", dev.spec.name);
            let d = match ensure_device(&self.nl, &dev.spec).await {
                Ok(d) => d,
                Err(e) => {
                    tracing::error!("failed to recreate {}: {e}", dev.spec.name);
                    continue;
                }
            };
            let (Some(subnet), network) = (self.own_subnet(dev.v6), self.network(dev.v6)) else {
                continue;
            };
            if let Err(e) =
                configure_device(&self.nl, d.index, &dev.spec.name, subnet, network).await
            {
                tracing::error!("failed to configure {}: {e}", dev.spec.name);
                continue;
            }
            self.devs[i].index = d.index;
            recreated = true;
        }
        if recreated {
            self.applied.clear();
            for l in current {
                self.add(l).await;
            }
            tracing::info!(
                "vxlan devices recreated and {} remote entries replayed",
                self.applied.len()
            );
        }
    }
}
