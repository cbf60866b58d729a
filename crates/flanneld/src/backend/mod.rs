//! Backends: how packets reach other hosts' subnets.
//!
//! A backend sets up its devices, acquires the lease with its own attributes, then only ever
//! handles batches of lease events. Adding a backend = one module + one line in [`lookup`].

pub mod alivpc;
pub mod alloc;
pub mod awsvpc;
pub mod cloud;
pub mod engine;
pub mod extension;
pub mod gce;
pub mod hostgw;
pub mod ipip;
pub mod ipsec;
pub mod tencentvpc;
pub mod udp;
pub mod vxlan;
pub mod wireguard;

use std::sync::Arc;

use async_trait::async_trait;
use flannel_types::NetworkConfig;

use crate::iface::ExternalInterface;
use crate::lease::{Lease, LeaseEvent};
use crate::store::{StoreError, SubnetStore};

/// A backend failure, with what was being done.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// `Backend.Type` names no known backend.
    #[error("unknown backend type: {0}")]
    UnknownType(String),
    /// The backend's options are invalid.
    #[error("{0}")]
    Config(#[from] flannel_types::ConfigError),
    /// The lease could not be acquired.
    #[error("failed to acquire lease: {0}")]
    Lease(#[from] StoreError),
    /// Anything else, with context.
    #[error("{0}")]
    Other(String),
}

/// What a backend gets to work with.
pub struct BackendContext {
    /// Where leases live.
    pub store: Arc<dyn SubnetStore>,
    /// The chosen external interface.
    pub ext: ExternalInterface,
    /// The validated network config.
    pub config: NetworkConfig,
}

impl BackendContext {
    /// Acquires a lease that announces only the public IP (no BackendType, no BackendData), as
    /// Go writes it for alloc and the cloud-route backends.
    pub async fn acquire_public_only_lease(&self) -> Result<Lease, BackendError> {
        let ip = self.ext.ext_addr.unwrap_or(std::net::Ipv4Addr::UNSPECIFIED);
        let attrs = flannel_types::LeaseAttrs::public_only(ip);
        Ok(self.store.acquire_lease(&self.config, &attrs).await?)
    }
}

/// A backend type, ready to register its network.
#[async_trait]
pub trait Backend: Send + Sync {
    /// Creates devices as needed and acquires this host's lease.
    async fn register_network(
        &self,
        ctx: &BackendContext,
    ) -> Result<Box<dyn Network>, BackendError>;
}

/// A registered network: the lease plus whatever keeps the data plane in sync.
#[async_trait]
pub trait Network: Send {
    /// This host's lease.
    fn lease(&self) -> &Lease;

    /// The MTU pods must use (written to subnet.env).
    fn mtu(&self) -> u32;

    /// Brings the data plane in line with a batch of remote lease changes. Errors are logged
    /// per lease inside; one bad peer never stops the others. By default each event goes to
    /// [`Network::lease_added`] / [`Network::lease_removed`].
    async fn handle_events(&mut self, batch: Vec<LeaseEvent>) {
        for e in batch {
            match e {
                LeaseEvent::Added(l) => self.lease_added(&l).await,
                LeaseEvent::Removed(l) => self.lease_removed(&l).await,
            }
        }
    }

    /// A remote lease appeared or changed.
    async fn lease_added(&mut self, _lease: &Lease) {}

    /// A remote lease is gone.
    async fn lease_removed(&mut self, _lease: &Lease) {}

    /// Called after every full snapshot with all current remote leases: removes kernel state of
    /// peers that no longer exist (e.g. hosts that left while flanneld was down).
    async fn resync(&mut self, _current: &[Lease]) {}

    /// How often [`Network::check`] runs.
    fn check_interval(&self) -> std::time::Duration {
        std::time::Duration::from_secs(3600)
    }

    /// Periodic repair (device deleted behind our back, route removed by someone).
    async fn check(&mut self, _current: &[Lease]) {}
}

/// Creates a backend from the raw `Backend` config object.
pub type Constructor = fn(&BackendContext) -> Result<Box<dyn Backend>, BackendError>;

/// The registry: backend type name -> constructor.
pub fn lookup(backend_type: &str) -> Result<Constructor, BackendError> {
    match backend_type {
        "ali-vpc" => Ok(alivpc::AliVpcBackend::create),
        "alloc" => Ok(alloc::AllocBackend::create),
        "aws-vpc" => Ok(awsvpc::AwsVpcBackend::create),
        "extension" => Ok(extension::ExtensionBackend::create),
        "gce" => Ok(gce::GceBackend::create),
        "host-gw" => Ok(hostgw::HostGwBackend::create),
        "ipip" => Ok(ipip::IpipBackend::create),
        "ipsec" => Ok(ipsec::IpsecBackend::create),
        "tencent-vpc" => Ok(tencentvpc::TencentVpcBackend::create),
        "udp" => Ok(udp::UdpBackend::create),
        "vxlan" => Ok(vxlan::VxlanBackend::create),
        "wireguard" => Ok(wireguard::WireguardBackend::create),
        other => Err(BackendError::UnknownType(other.to_string())),
    }
}
