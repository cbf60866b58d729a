//! Traffic rules: masquerade for traffic leaving the overlay, FORWARD accepts for it.
//!
//! One implementation per firewall (iptables, nftables) behind [`TrafficRules`]. Each daemon owns
//! only its own rules (several flannel networks on one host share the chains): when all of them
//! are present in order nothing is touched (a restart changes nothing), otherwise one kernel
//! transaction deletes ours and re-appends them, so there is never a window without
//! masquerading (the reference flushes the chain first, then refills it).

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

/// One address family's part of a rule set, as the text both firewalls write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FamilyRules {
    /// IPv6 (else IPv4).
    pub v6: bool,
    /// (cluster network, pod subnet) to masquerade for.
    pub masq: Option<(String, String)>,
    /// The cluster network to accept in FORWARD.
    pub forward: Option<String>,
}

impl FamilyRules {
    /// Multicast range never masqueraded.
    pub fn multicast(&self) -> &'static str {
        if self.v6 {
            "ff00::/8"
        } else {
            "224.0.0.0/4"
        }
    }
}

impl RuleSet {
    /// The IPv4 part, then the IPv6 part.
    pub fn families(&self) -> [FamilyRules; 2] {
        [
            FamilyRules {
                v6: false,
                masq: self
                    .masq_v4
                    .as_ref()
                    .map(|m| (m.cluster.to_string(), m.pod.to_string())),
                forward: self.forward_v4.map(|n| n.to_string()),
            },
            FamilyRules {
                v6: true,
                masq: self
                    .masq_v6
                    .as_ref()
                    .map(|m| (m.cluster.to_string(), m.pod.to_string())),
                forward: self.forward_v6.map(|n| n.to_string()),
            },
        ]
    }
}

/// A firewall flannel manages its rules in.
#[async_trait]
pub trait TrafficRules: Send + Sync {
    /// Removes what the *other* implementation may have left (switching modes).
    async fn cleanup_other(&self);

    /// Installs `rules` atomically; `previous` (the rules of the last run's config, from the old
    /// subnet.env) are removed in the same transaction when they differ.
    async fn apply(&self, rules: &RuleSet, previous: Option<&RuleSet>) -> Result<(), RulesError>;

    /// Whether the firewall holds all of `rules`, in order.
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

/// Whether `want` appears in `have` in the same relative order (other lines may interleave).
pub(crate) fn is_subsequence(want: &[String], have: &[String]) -> bool {
    let mut it = have.iter();
    want.iter().all(|w| it.any(|h| h == w))
}

/// Retries a transaction a few times: another daemon may change the chain between our read and
/// our write, which makes a delete in the transaction fail.
pub(crate) async fn with_retries<F, Fut>(what: &str, mut f: F) -> Result<(), RulesError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), RulesError>>,
{
    let mut last = None;
    for attempt in 0..5u64 {
        match f().await {
            Ok(()) => return Ok(()),
            Err(e) => {
                tracing::debug!("{what} attempt {} failed: {e}", attempt + 1);
                last = Some(e);
                tokio::time::sleep(std::time::Duration::from_millis(50 * (attempt + 1))).await;
            }
        }
    }
    Err(last.unwrap_or(RulesError {
        context: what.to_string(),
        detail: "failed".into(),
    }))
}
