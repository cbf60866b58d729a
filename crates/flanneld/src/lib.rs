//! flanneld: leases this host a subnet of the flannel network and keeps the data plane in sync
//! with every other host's lease.

pub mod backend;
pub mod bpf;
pub mod cli;
pub mod daemon;
pub mod doctor;
pub mod health;
pub mod iface;
pub mod lease;
pub mod metrics;
pub mod netlink;
pub mod rules;
pub mod store;
pub mod utc;

/// The version printed by `--version`.
pub const VERSION: &str = concat!("v", env!("CARGO_PKG_VERSION"), "-rs");
