//! `ipip`: IPv4-in-IPv4 through the kernel's ipip tunnel, wire- and host-compatible with Go
//! flannel.
//!
//! One device `flannel.ipip` (`local <interface IP>`, remote any, MTU E−20, address
//! `<subnet network>/32`); per remote lease a route `<subnet> via <PublicIP> dev flannel.ipip
//! onlink` (the kernel takes the tunnel's remote from the route's gateway); with DirectRouting and
//! a peer the kernel reaches without a gateway, `<subnet> via <PublicIP> dev <iface> onlink`
//! instead. Lease: `{"PublicIP":..,"PublicIPv6":null,"BackendType":"ipip"}` (no BackendData).
//!
//! Better than the reference: an existing correct device is reused untouched and routes are
//! replaced in place (a restart drops no packet); a device deleted behind our back is recreated
//! with all routes; routes of peers that left while we were down are removed on every snapshot.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use async_trait::async_trait;
use flannel_types::backend_options::IpipOptions;
use flannel_types::{LeaseAttrs, NetworkConfig, SubnetKey};
use ipnet::IpNet;
use netlink_packet_route::route::RouteProtocol;

use super::vxlan::configure_device;
use super::{Backend, BackendContext, BackendError, Network};
use crate::iface::ExternalInterface;
use crate::lease::Lease;
use crate::netlink::{IpipSpec, Netlink, RouteSpec};

/// The tunnel device's name, as Go flannel's.
pub const DEVICE: &str = "flannel.ipip";

/// Bytes of the outer IPv4 header.
const OVERHEAD: u32 = 20;

/// The backend type written into leases.
const BACKEND_TYPE: &str = "ipip";

/// The ipip backend.
pub struct IpipBackend {
    opts: IpipOptions,
}

impl IpipBackend {
    /// Registry constructor: validates the options.
    pub fn create(ctx: &BackendContext) -> Result<Box<dyn Backend>, BackendError> {
        let opts = IpipOptions::from_backend(&ctx.config.backend)?;
        Ok(Box::new(IpipBackend { opts }))
    }
}

fn nl_err(e: impl std::fmt::Display) -> BackendError {
    BackendError::Other(e.to_string())
}

/// Makes `flannel.ipip` exist as `spec` says; returns its index. A device of another kind is the
/// operator's, never deleted (the reference's error); a wrong local/remote means re-creation.
async fn ensure_device(nl: &Netlink, spec: &IpipSpec) -> Result<u32, BackendError> {
    if let Some(d) = nl.link_details(&spec.name).await.map_err(nl_err)? {
        if d.kind.as_deref() != Some("ipip") {
            return Err(BackendError::Other(format!(
                "{} isn't an ipip mode device, please remove device and try again",
                spec.name
            )));
        }
        let t = d.iptun.clone().unwrap_or_default();
        let remote_any = t.remote.is_none_or(|r| r.is_unspecified());
        if t.local == Some(IpAddr::V4(spec.local)) && remote_any {
            if d.mtu != spec.mtu {
                tracing::info!(
                    "current MTU of {} is {}, setting it to {}",
                    spec.name,
                    d.mtu,
                    spec.mtu
                );
                nl.set_mtu(d.index, spec.mtu, &spec.name)
                    .await
                    .map_err(nl_err)?;
            }
            tracing::info!("reusing existing ipip device {}", spec.name);
            return Ok(d.index);
        }
        tracing::warn!(
            "{:?} already exists with incompatible attributes: local={:?} remote={:?}; recreating device",
            spec.name,
            t.local,
            t.remote
        );
        nl.delete_link(d.index, &spec.name)
            .await
            .map_err(|e| BackendError::Other(format!("failed to delete interface: {e}")))?;
    }
    nl.create_ipip(spec)
        .await
        .map_err(|e| BackendError::Other(format!("failed to create ipip interface: {e}")))?;
    let d = nl
        .link_details(&spec.name)
        .await
        .map_err(nl_err)?
        .ok_or_else(|| {
            BackendError::Other(format!("{} vanished right after creation", spec.name))
        })?;
    Ok(d.index)
}

#[async_trait]
impl Backend for IpipBackend {
    async fn register_network(
        &self,
        ctx: &BackendContext,
    ) -> Result<Box<dyn Network>, BackendError> {
        tracing::info!("IPIP config: DirectRouting={}", self.opts.direct_routing);
        let local = ctx.ext.iface_addr.ok_or_else(|| {
            BackendError::Other(format!(
                "interface {} has no IPv4 address, which the ipip backend needs",
                ctx.ext.name
            ))
        })?;
        if ctx.ext.mtu <= OVERHEAD {
            return Err(BackendError::Other(format!(
                "MTU {} of iface {} is too small for ipip mode to work",
                ctx.ext.mtu, ctx.ext.name
            )));
        }
        let spec = IpipSpec {
            name: DEVICE.into(),
            local,
            mtu: ctx.ext.mtu - OVERHEAD,
        };
        let nl = Netlink::open().map_err(nl_err)?;
        let index = ensure_device(&nl, &spec).await?;
        let attrs = LeaseAttrs {
            public_ip: ctx.ext.ext_addr.unwrap_or(Ipv4Addr::UNSPECIFIED),
            public_ipv6: None,
            backend_type: BACKEND_TYPE.into(),
            backend_data: None,
            backend_v6_data: None,
        };
        let lease = ctx.store.acquire_lease(&ctx.config, &attrs).await?;
        configure_device(
            &nl,
            index,
            DEVICE,
            IpNet::V4(lease.key.ipv4),
            ctx.config.network.map(IpNet::V4),
        )
        .await
        .map_err(|e| {
            BackendError::Other(format!(
                "failed to ensure address of interface {DEVICE}: {e}"
            ))
        })?;
        Ok(Box::new(IpipNetwork {
            nl,
            lease,
            config: ctx.config.clone(),
            ext: ctx.ext.clone(),
            direct_routing: self.opts.direct_routing,
            spec,
            index,
            routes: BTreeMap::new(),
        }))
    }
}

struct IpipNetwork {
    nl: Netlink,
    lease: Lease,
    config: NetworkConfig,
    ext: ExternalInterface,
    direct_routing: bool,
    spec: IpipSpec,
    index: u32,
    routes: BTreeMap<SubnetKey, RouteSpec>,
}

impl IpipNetwork {
    /// The route to a peer: through the tunnel, or (DirectRouting, same L2) the interface.
    async fn route_for(&self, l: &Lease) -> RouteSpec {
        let gateway = IpAddr::V4(l.attrs.public_ip);
        let mut oif = self.index;
        if self.direct_routing {
            match self.nl.route_get(gateway).await {
                Ok(r) if r.len() == 1 && r[0].gateway.is_none() => {
                    tracing::debug!("configure route to {gateway} via direct routing");
                    oif = self.ext.index;
                }
                Ok(_) => {}
                Err(e) => tracing::error!("{e}"),
            }
        }
        RouteSpec {
            dst: IpNet::V4(l.key.ipv4),
            gateway: Some(gateway),
            oif: Some(oif),
            onlink: true,
            blackhole: false,
        }
    }

    async fn add(&mut self, l: &Lease) {
        if l.attrs.backend_type != BACKEND_TYPE {
            tracing::warn!(
                "ignoring non-ipip subnet {}: type={:?}",
                l.key,
                l.attrs.backend_type
            );
            return;
        }
        let route = self.route_for(l).await;
        if let Some(old) = self.routes.get(&l.key) {
            if old.oif != route.oif {
                let _ = self.nl.delete_route(old).await;
            }
        }
        match self.nl.replace_route(&route).await {
            Ok(()) => {
                tracing::info!("ipip: route {route} installed");
                self.routes.insert(l.key, route);
            }
            Err(e) => tracing::error!("{e}"),
        }
    }

    async fn remove(&mut self, l: &Lease) {
        let route = match self.routes.remove(&l.key) {
            Some(r) => r,
            None => self.route_for(l).await,
        };
        match self.nl.delete_route(&route).await {
            Ok(()) => tracing::info!("ipip: route {route} removed"),
            Err(e) => tracing::error!("{e}"),
        }
    }

    /// Recreates the device (deleted behind our back) and replays every route.
    async fn recreate_device(&mut self) -> Result<(), BackendError> {
        tracing::warn!("{DEVICE} is gone, recreating it");
        self.index = ensure_device(&self.nl, &self.spec).await?;
        configure_device(
            &self.nl,
            self.index,
            DEVICE,
            IpNet::V4(self.lease.key.ipv4),
            self.config.network.map(IpNet::V4),
        )
        .await?;
        let tunnel_index = self.index;
        for r in self.routes.values_mut() {
            if r.oif != Some(self.ext.index) {
                r.oif = Some(tunnel_index);
            }
        }
        Ok(())
    }
}

#[async_trait]
impl Network for IpipNetwork {
    fn lease(&self) -> &Lease {
        &self.lease
    }

    fn mtu(&self) -> u32 {
        self.spec.mtu
    }

    async fn lease_added(&mut self, lease: &Lease) {
        self.add(lease).await
    }

    async fn lease_removed(&mut self, lease: &Lease) {
        self.remove(lease).await
    }

    /// Removes flannel routes (on the tunnel, or DirectRouting ones on the interface) to subnets
    /// of the network that no current lease has.
    async fn resync(&mut self, current: &[Lease]) {
        let keys: BTreeSet<SubnetKey> = current.iter().map(|l| l.key).collect();
        self.routes.retain(|k, _| keys.contains(k));
        let (Some(network), Ok(routes)) = (self.config.network, self.nl.routes(false).await) else {
            return;
        };
        let own = IpNet::V4(self.lease.key.ipv4);
        for r in routes {
            let Some(dst) = r.destination_net() else {
                continue;
            };
            let ours = (r.oif == Some(self.index) || r.oif == Some(self.ext.index))
                && r.table == 254
                && r.protocol == RouteProtocol::Boot
                && r.gateway.is_some()
                && IpNet::V4(network).contains(&dst)
                && dst != own;
            if ours && !self.routes.values().any(|w| w.matches(&r)) {
                tracing::info!("removing stale route {dst} via {:?}", r.gateway);
                if let Err(e) = self.nl.delete_kernel_route(&r).await {
                    tracing::error!("{e}");
                }
            }
        }
    }

    fn check_interval(&self) -> Duration {
        Duration::from_secs(10)
    }

    /// Recreates a deleted device and re-adds remembered routes that someone removed.
    async fn check(&mut self, _current: &[Lease]) {
        match self.nl.link_details(DEVICE).await {
            Ok(None) => {
                if let Err(e) = self.recreate_device().await {
                    tracing::error!("{e}");
                    return;
                }
            }
            Ok(Some(_)) => {}
            Err(e) => {
                tracing::error!("{e}");
                return;
            }
        }
        let Ok(routes) = self.nl.routes(false).await else {
            return;
        };
        for want in self.routes.values() {
            if !routes.iter().any(|r| want.matches(r)) {
                match self.nl.replace_route(want).await {
                    Ok(()) => tracing::info!("Route recovered {want}"),
                    Err(e) => tracing::error!("{e}"),
                }
            }
        }
    }
}
