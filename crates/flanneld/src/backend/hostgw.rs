//! `host-gw`: a route `<subnet> via <PublicIP>` per peer; the fast path on one L2 segment.
//!
//! Routes are replaced in place (never deleted and re-added), checked every 10 s and recovered
//! if someone removed them, and routes of peers that no longer exist are removed on every
//! snapshot.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};

use std::time::Duration;

use async_trait::async_trait;
use flannel_types::{LeaseAttrs, NetworkConfig, SubnetKey};
use ipnet::IpNet;
use netlink_packet_route::route::RouteProtocol;

use super::{Backend, BackendContext, BackendError, Network};
use crate::iface::ExternalInterface;
use crate::lease::Lease;
use crate::netlink::{Netlink, RouteSpec};

/// The host-gw backend.
pub struct HostGwBackend;

impl HostGwBackend {
    /// Registry constructor.
    pub fn create(ctx: &BackendContext) -> Result<Box<dyn Backend>, BackendError> {
        if ctx.ext.ext_addr != ctx.ext.iface_addr {
            return Err(BackendError::Other(
                "your PublicIP differs from interface IP, meaning that probably you're on a NAT, which is not supported by host-gw backend".into(),
            ));
        }
        Ok(Box::new(HostGwBackend))
    }
}

struct HostGwNetwork {
    nl: Netlink,
    lease: Lease,
    config: NetworkConfig,
    ext: ExternalInterface,
    routes: BTreeMap<(SubnetKey, bool), RouteSpec>,
}

#[async_trait]
impl Backend for HostGwBackend {
    async fn register_network(
        &self,
        ctx: &BackendContext,
    ) -> Result<Box<dyn Network>, BackendError> {
        let nl = Netlink::open().map_err(|e| BackendError::Other(e.to_string()))?;
        let attrs = LeaseAttrs {
            public_ip: ctx.ext.ext_addr.unwrap_or(Ipv4Addr::UNSPECIFIED),
            public_ipv6: if ctx.config.enable_ipv6 {
                ctx.ext.ext_v6_addr
            } else {
                None
            },
            backend_type: "host-gw".into(),
            backend_data: None,
            backend_v6_data: None,
        };
        let lease = ctx.store.acquire_lease(&ctx.config, &attrs).await?;
        Ok(Box::new(HostGwNetwork {
            nl,
            lease,
            config: ctx.config.clone(),
            ext: ctx.ext.clone(),
            routes: BTreeMap::new(),
        }))
    }
}

impl HostGwNetwork {
    /// The route to a lease's subnet in one family (`None` if either side lacks that family).
    fn route_for(&self, l: &Lease, v6: bool) -> Option<RouteSpec> {
        let (dst, gateway) = if v6 {
            if !self.config.enable_ipv6 {
                return None;
            }
            (IpNet::V6(l.key.ipv6?), IpAddr::V6(l.attrs.public_ipv6?))
        } else {
            if !self.config.enable_ipv4 {
                return None;
            }
            (IpNet::V4(l.key.ipv4), IpAddr::V4(l.attrs.public_ip))
        };
        Some(RouteSpec {
            dst,
            gateway: Some(gateway),
            oif: Some(self.ext.index),
            onlink: false,
            blackhole: false,
        })
    }

    async fn add(&mut self, l: &Lease) {
        if l.attrs.backend_type != "host-gw" {
            tracing::warn!(
                "ignoring non-host-gw subnet {}: type={:?}",
                l.key,
                l.attrs.backend_type
            );
            return;
        }
        for v6 in [false, true] {
            let Some(route) = self.route_for(l, v6) else {
                continue;
            };
            match self.nl.replace_route(&route).await {
                Ok(()) => {
                    tracing::info!("host-gw: route {route} installed");
                    self.routes.insert((l.key, v6), route);
                }
                Err(e) => tracing::error!("{e}"),
            }
        }
    }

    async fn remove(&mut self, l: &Lease) {
        for v6 in [false, true] {
            let Some(route) = self
                .routes
                .remove(&(l.key, v6))
                .or_else(|| self.route_for(l, v6))
            else {
                continue;
            };
            match self.nl.delete_route(&route).await {
                Ok(()) => tracing::info!("host-gw: route {route} removed"),
                Err(e) => tracing::error!("{e}"),
            }
        }
    }
}

#[async_trait]
impl Network for HostGwNetwork {
    fn lease(&self) -> &Lease {
        &self.lease
    }

    fn mtu(&self) -> u32 {
        self.ext.mtu
    }

    async fn lease_added(&mut self, lease: &Lease) {
        self.add(lease).await
    }

    async fn lease_removed(&mut self, lease: &Lease) {
        self.remove(lease).await
    }

    async fn resync(&mut self, current: &[Lease]) {
        let keys: BTreeSet<SubnetKey> = current.iter().map(|l| l.key).collect();
        self.routes.retain(|(k, _), _| keys.contains(k));
        for v6 in [false, true] {
            let (network, own) = if v6 {
                (
                    self.config.ipv6_network.map(IpNet::V6),
                    self.lease.key.ipv6.map(IpNet::V6),
                )
            } else {
                (
                    self.config.network.map(IpNet::V4),
                    Some(IpNet::V4(self.lease.key.ipv4)),
                )
            };
            let (Some(network), Ok(routes)) = (network, self.nl.routes(v6).await) else {
                continue;
            };
            for r in routes {
                let Some(dst) = r.destination_net() else {
                    continue;
                };
                let flannel_route = r.oif == Some(self.ext.index)
                    && r.table == 254
                    && r.protocol == RouteProtocol::Boot
                    && r.gateway.is_some()
                    && network.contains(&dst)
                    && Some(dst) != own;
                if flannel_route && !self.routes.values().any(|w| w.matches(&r)) {
                    tracing::info!("removing stale route {dst} via {:?}", r.gateway);
                    if let Err(e) = self.nl.delete_kernel_route(&r).await {
                        tracing::error!("{e}");
                    }
                }
            }
        }
    }

    fn check_interval(&self) -> Duration {
        Duration::from_secs(10)
    }

    /// Re-adds remembered routes that someone removed.
    async fn check(&mut self, _current: &[Lease]) {
        let (Ok(mut routes), Ok(v6)) = (self.nl.routes(false).await, self.nl.routes(true).await)
        else {
            return;
        };
        routes.extend(v6);
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
