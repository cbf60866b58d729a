//! Formats shared by `flanneld` and the `flannel` CNI plugin.
//!
//! Kept small and synchronous (serde, ipnet, thiserror only) so the CNI plugin, which runs once
//! per pod, links nothing heavy.

pub mod backend_options;
pub mod config;
pub mod gojson;
pub mod lease;
pub mod subnet_env;

pub use config::{ConfigError, NetworkConfig};
pub use lease::{LeaseAttrs, LeaseError, SubnetKey};
pub use subnet_env::SubnetEnv;
