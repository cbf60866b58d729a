//! `extension`: the operator's own commands at the points of the lease life cycle, as Go
//! flannel runs them.
//!
//! - `PreStartupCommand` before the lease; its trimmed stdout becomes BackendData as a JSON
//!   string (Go's encoding);
//! - `PostStartupCommand` after it, env `NETWORK`, `SUBNET`, `IPV6SUBNET`, `PUBLIC_IP`,
//!   `PUBLIC_IPV6` (Go's values, `::/0` and `<nil>` without IPv6);
//! - `SubnetAddCommand` / `SubnetRemoveCommand` per remote extension lease, env `SUBNET`,
//!   `PUBLIC_IP` (and the documented `IPV6SUBNET`, `PUBLIC_IPV6`, empty without IPv6), stdin =
//!   the remote BackendData string + `\n`.
//!
//! Commands are exec'd without a shell ([`command`]). A failing pre/post command stops
//! start-up with an error naming the command, its exit status and stderr; a failing add/remove
//! is logged the same way and the next lease is handled. Command output is never logged: it
//! may hold keys.

pub mod command;

use std::net::Ipv4Addr;

use async_trait::async_trait;
use flannel_types::backend_options::ExtensionOptions;
use flannel_types::lease::{go_string, RawJson};
use flannel_types::LeaseAttrs;

use super::{Backend, BackendContext, BackendError, Network};
use crate::lease::Lease;

/// The backend type written into leases.
const BACKEND_TYPE: &str = "extension";

/// The extension backend.
pub struct ExtensionBackend {
    opts: ExtensionOptions,
}

impl ExtensionBackend {
    /// Registry constructor.
    pub fn create(ctx: &BackendContext) -> Result<Box<dyn Backend>, BackendError> {
        let opts = ExtensionOptions::from_backend(&ctx.config.backend)?;
        Ok(Box::new(ExtensionBackend { opts }))
    }
}

/// Runs a command off the async runtime.
async fn run(
    which: &'static str,
    text: String,
    vars: Vec<(&'static str, String)>,
    stdin: String,
) -> Result<String, command::CommandError> {
    tokio::task::spawn_blocking(move || command::run(which, &text, &vars, &stdin))
        .await
        .unwrap_or_else(|e| {
            Err(command::CommandError::Spawn {
                which,
                program: String::new(),
                source: std::io::Error::other(e.to_string()),
            })
        })
}

#[async_trait]
impl Backend for ExtensionBackend {
    async fn register_network(
        &self,
        ctx: &BackendContext,
    ) -> Result<Box<dyn Network>, BackendError> {
        let mut backend_data = None;
        if self.opts.pre_startup_command.trim().is_empty() {
            tracing::info!("No pre startup command configured - skipping");
        } else {
            let out = run(
                "PreStartupCommand",
                self.opts.pre_startup_command.clone(),
                vec![],
                String::new(),
            )
            .await
            .map_err(|e| BackendError::Other(e.to_string()))?;
            tracing::info!("Ran PreStartupCommand (output not logged)");
            backend_data = Some(
                RawJson::new(&go_string(&out)).map_err(|e| BackendError::Other(e.to_string()))?,
            );
        }
        // As Go: the interface's own addresses, not --public-ip.
        let attrs = LeaseAttrs {
            public_ip: ctx.ext.iface_addr.unwrap_or(Ipv4Addr::UNSPECIFIED),
            public_ipv6: ctx.ext.iface_v6_addr,
            backend_type: BACKEND_TYPE.into(),
            backend_data,
            backend_v6_data: None,
        };
        let lease = ctx.store.acquire_lease(&ctx.config, &attrs).await?;
        if self.opts.post_startup_command.trim().is_empty() {
            tracing::info!("No post startup command configured - skipping");
        } else {
            let vars = vec![
                (
                    "NETWORK",
                    ctx.config
                        .network
                        .map(|n| n.to_string())
                        .unwrap_or_default(),
                ),
                ("SUBNET", lease.key.ipv4.to_string()),
                (
                    "IPV6SUBNET",
                    lease
                        .key
                        .ipv6
                        .map(|n| n.to_string())
                        .unwrap_or_else(|| "::/0".into()),
                ),
                ("PUBLIC_IP", attrs.public_ip.to_string()),
                (
                    "PUBLIC_IPV6",
                    attrs
                        .public_ipv6
                        .map(|a| a.to_string())
                        .unwrap_or_else(|| "<nil>".into()),
                ),
            ];
            run(
                "PostStartupCommand",
                self.opts.post_startup_command.clone(),
                vars,
                String::new(),
            )
            .await
            .map_err(|e| BackendError::Other(e.to_string()))?;
            tracing::info!("Ran PostStartupCommand (output not logged)");
        }
        Ok(Box::new(ExtensionNetwork {
            lease,
            mtu: ctx.ext.mtu,
            opts: self.opts.clone(),
        }))
    }
}

struct ExtensionNetwork {
    lease: Lease,
    mtu: u32,
    opts: ExtensionOptions,
}

impl ExtensionNetwork {
    async fn run_for(&self, which: &'static str, text: &str, l: &Lease) {
        if l.attrs.backend_type != BACKEND_TYPE {
            tracing::warn!(
                "Ignoring non-extension subnet: type={:?}",
                l.attrs.backend_type
            );
            return;
        }
        if text.trim().is_empty() {
            return;
        }
        let data = match &l.attrs.backend_data {
            None => String::new(),
            Some(raw) => match raw.parse::<String>() {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!("failed to unmarshal BackendData of {}: {e}", l.key);
                    return;
                }
            },
        };
        let vars = vec![
            ("SUBNET", l.key.ipv4.to_string()),
            ("PUBLIC_IP", l.attrs.public_ip.to_string()),
            (
                "IPV6SUBNET",
                l.key.ipv6.map(|n| n.to_string()).unwrap_or_default(),
            ),
            (
                "PUBLIC_IPV6",
                l.attrs
                    .public_ipv6
                    .map(|a| a.to_string())
                    .unwrap_or_default(),
            ),
        ];
        match run(which, text.to_string(), vars, data).await {
            Ok(_) => tracing::info!("Ran {which} for {} (output not logged)", l.key),
            Err(e) => tracing::error!("{e}"),
        }
    }
}

#[async_trait]
impl Network for ExtensionNetwork {
    fn lease(&self) -> &Lease {
        &self.lease
    }

    fn mtu(&self) -> u32 {
        self.mtu
    }

    async fn lease_added(&mut self, lease: &Lease) {
        tracing::info!("Subnet added: {} via {}", lease.key, lease.attrs.public_ip);
        let cmd = self.opts.subnet_add_command.clone();
        self.run_for("SubnetAddCommand", &cmd, lease).await
    }

    async fn lease_removed(&mut self, lease: &Lease) {
        tracing::info!("Subnet removed: {}", lease.key);
        let cmd = self.opts.subnet_remove_command.clone();
        self.run_for("SubnetRemoveCommand", &cmd, lease).await
    }
}
