//! Subnet stores: where leases live (etcd, or the Kubernetes API).
//!
//! The daemon talks to one `SubnetStore`; each store is one module behind this trait.

pub mod allocate;
pub mod etcd;
pub mod kube;

use async_trait::async_trait;
use flannel_types::{ConfigError, LeaseAttrs, NetworkConfig};
use tokio::sync::mpsc;

use crate::lease::{Lease, StoreUpdate};

/// A store failure, worded for the operator.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No network config under the prefix.
    #[error(
        "flannel config not found in etcd store. Did you create your config using etcdv3 API?"
    )]
    ConfigNotFound,
    /// The network config exists but is invalid.
    #[error("{0}")]
    BadConfig(#[from] ConfigError),
    /// Every subnet of the configured range is leased.
    #[error("out of subnets")]
    OutOfSubnets,
    /// Collisions kept happening.
    #[error("max retries reached trying to acquire a subnet")]
    MaxRetries,
    /// The store could not be reached or refused the request.
    #[error("{context}: {source}")]
    Unavailable {
        /// What was being done.
        context: String,
        /// The underlying failure.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The store's data or the local configuration makes a lease impossible (fatal).
    #[error("{0}")]
    Invalid(String),
    /// A local file (TLS material) could not be read.
    #[error("{context}: {source}")]
    Io {
        /// What was being read.
        context: String,
        /// The underlying failure.
        #[source]
        source: std::io::Error,
    },
}

/// What happened to this host's own lease.
#[derive(Debug, Clone, PartialEq)]
pub enum OwnLeaseEvent {
    /// The lease was written again (renewed, by us or someone else).
    Updated(Lease),
    /// The lease is gone: the daemon must stop.
    Revoked,
}

/// What `flanneld doctor` reads from a store, without changing anything.
#[derive(Debug, Default)]
pub struct StoreInspection {
    /// Every usable lease, this host's included.
    pub leases: Vec<Lease>,
    /// This host's lease, when the store itself can tell (kube: the own node's).
    pub own: Option<Lease>,
    /// Entries that are not usable leases: (key or node, why).
    pub rejected: Vec<(String, String)>,
}

/// The seam between the daemon and where leases are stored.
#[async_trait]
pub trait SubnetStore: Send + Sync {
    /// A short description for logs.
    fn name(&self) -> String;

    /// Reads (and for etcd, validates) the network configuration.
    async fn network_config(&self) -> Result<NetworkConfig, StoreError>;

    /// Gets this host a lease: its existing one, its previous subnet, or a free one.
    async fn acquire_lease(
        &self,
        config: &NetworkConfig,
        attrs: &LeaseAttrs,
    ) -> Result<Lease, StoreError>;

    /// The lease currently held for `public_ip`, if any (used to keep the VtepMAC stable).
    async fn lease_by_public_ip(
        &self,
        _public_ip: std::net::Ipv4Addr,
    ) -> Result<Option<Lease>, StoreError> {
        Ok(None)
    }

    /// Gets the lease back after it vanished while running (deleted or expired): the same
    /// subnet when it is still free, else whatever [`SubnetStore::acquire_lease`] finds.
    async fn reacquire_lease(
        &self,
        config: &NetworkConfig,
        lost: &Lease,
    ) -> Result<Lease, StoreError> {
        self.acquire_lease(config, &lost.attrs).await
    }

    /// Capacity of the lease-update queue between the store and the backend.
    fn event_queue_depth(&self) -> usize {
        16
    }

    /// Public addresses an operator stored for this host (kube: `node-public-ip(v6)`), which
    /// replace `--public-ip(v6)`.
    async fn stored_public_ips(&self) -> (Option<std::net::Ipv4Addr>, Option<std::net::Ipv6Addr>) {
        (None, None)
    }

    /// Called once subnet.env is written and the backend runs (kube: clears the node's
    /// NetworkUnavailable condition).
    async fn complete_lease(&self, _lease: &Lease) -> Result<(), StoreError> {
        Ok(())
    }

    /// Extends the lease before it expires; returns the lease with its new expiry.
    async fn renew_lease(&self, lease: &Lease) -> Result<Lease, StoreError>;

    /// Streams every lease: a snapshot, then events; resyncs itself after errors. Returns when
    /// the receiver is dropped.
    async fn watch_leases(&self, tx: mpsc::Sender<StoreUpdate>) -> Result<(), StoreError>;

    /// Reads every lease once, for diagnosis; writes nothing.
    async fn inspect(&self) -> Result<StoreInspection, StoreError>;

    /// Streams changes to this host's own lease. Returns when the receiver is dropped.
    async fn watch_own_lease(
        &self,
        lease: &Lease,
        tx: mpsc::Sender<OwnLeaseEvent>,
    ) -> Result<(), StoreError>;
}
