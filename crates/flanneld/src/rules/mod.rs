//! Traffic rules: masquerade for traffic leaving the overlay, FORWARD accepts for it.
//!
//! One implementation per firewall (iptables, nftables) behind [`TrafficRules`]. Both replace
//! their whole rule set in one kernel transaction, so a restart never leaves a window without
//! masquerading (the reference flushes first, then refills).

pub mod iptables;
pub mod nftables;

use async_trait::async_trait;
use ipnet::{Ipv4Net, Ipv6Net};

/// A firewall command failed.
#[derive(Debug, thiserror::Error)]
#[error("{context}: {detail}")]
pub struct RulesError {
    /// What was being done.
    pub context: String,
    /// The tool's error output.
    pub detail: String,
}

/// Masquerade parameters for one address family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Masq<N> {
    /// The whole flannel network.
    pub cluster: N,
    /// This host's subnet.
    pub pod: N,
}

/// Everything flannel wants in the firewall.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RuleSet {
    /// IPv4 masquerade (with `--ip-masq`).
    pub masq_v4: Option<Masq<Ipv4Net>>,
    /// IPv6 masquerade.
    pub masq_v6: Option<Masq<Ipv6Net>>,
    /// IPv4 FORWARD accepts (with `--iptables-forward-rules`): the flannel network.
    pub forward_v4: Option<Ipv4Net>,
    /// IPv6 FORWARD accepts.
    pub forward_v6: Option<Ipv6Net>,
    /// Use `--random-fully` / `fully-random` when masquerading.
    pub random_fully: bool,
}

/// A firewall flannel manages its rules in.
#[async_trait]
pub trait TrafficRules: Send + Sync {
    /// Removes what the *other* implementation may have left (switching modes).
    async fn cleanup_other(&self);

    /// Installs `rules`, atomically replacing what flannel had before.
    async fn apply(&self, rules: &RuleSet) -> Result<(), RulesError>;

    /// Whether the firewall still holds exactly `rules`.
    async fn is_current(&self, rules: &RuleSet) -> Result<bool, RulesError>;
}

/// The implementation for the config's `EnableNFTables`.
pub fn for_config(enable_nftables: bool) -> Box<dyn TrafficRules> {
    if enable_nftables {
        Box::new(nftables::NfTables)
    } else {
        Box::new(iptables::IpTables)
    }
}

/// Runs a firewall tool with optional stdin; returns stdout or an error with its stderr.
pub(crate) async fn run_tool(
    program: &str,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<String, RulesError> {
    use tokio::io::AsyncWriteExt;
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .stdin(if stdin.is_some() {
            std::process::Stdio::piped()
        } else {
            std::process::Stdio::null()
        })
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let context = format!("{program} {}", args.join(" "));
    let mut child = cmd.spawn().map_err(|e| RulesError {
        context: context.clone(),
        detail: format!("cannot run it: {e}"),
    })?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes())
            .await
            .map_err(|e| RulesError {
                context: context.clone(),
                detail: e.to_string(),
            })?;
    }
    let out = child.wait_with_output().await.map_err(|e| RulesError {
        context: context.clone(),
        detail: e.to_string(),
    })?;
    if !out.status.success() {
        return Err(RulesError {
            context,
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
