//! iptables mode: the reference's exact rules, chains and append order.

use async_trait::async_trait;

use super::{run_tool, RuleSet, RulesError, TrafficRules};

const MASQ_CHAIN: &str = "FLANNEL-POSTRTG";
const FWD_CHAIN: &str = "FLANNEL-FWD";
const MASQ_COMMENT: &str = "-m comment --comment \"flanneld masq\"";
const FWD_COMMENT: &str = "-m comment --comment \"flanneld forward\"";

/// iptables / ip6tables through `iptables-restore --noflush`.
pub struct IpTables;

/// One table's worth of flannel rules for one family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableRules {
    /// `nat` or `filter`.
    pub table: &'static str,
    /// The built-in chain holding the jump (`POSTROUTING` / `FORWARD`).
    pub hook_chain: &'static str,
    /// flannel's own chain.
    pub chain: &'static str,
    /// The jump rule (without `-A <hook_chain>`).
    pub jump: String,
    /// The rules of flannel's chain (without `-A <chain>`), in order.
    pub rules: Vec<String>,
}

impl TableRules {
    /// The lines `iptables -S` prints for this set: the jump, then the chain.
    pub fn listing(&self) -> Vec<String> {
        let mut v = vec![format!("-A {} {}", self.hook_chain, self.jump)];
        v.push(format!("-N {}", self.chain));
        v.extend(self.rules.iter().map(|r| format!("-A {} {r}", self.chain)));
        v
    }
}

/// The reference's masquerade rules for a cluster network and pod subnet.
pub fn masq_rules(cluster: &str, pod: &str, multicast: &str, random_fully: bool) -> TableRules {
    let masq = if random_fully {
        "MASQUERADE --random-fully"
    } else {
        "MASQUERADE"
    };
    TableRules {
        table: "nat",
        hook_chain: "POSTROUTING",
        chain: MASQ_CHAIN,
        jump: format!("{MASQ_COMMENT} -j {MASQ_CHAIN}"),
        rules: vec![
            format!("-m mark --mark 0x4000/0x4000 {MASQ_COMMENT} -j RETURN"),
            format!("-s {pod} -d {cluster} {MASQ_COMMENT} -j RETURN"),
            format!("-s {cluster} -d {pod} {MASQ_COMMENT} -j RETURN"),
            format!("! -s {cluster} -d {pod} {MASQ_COMMENT} -j RETURN"),
            format!("-s {cluster} ! -d {multicast} {MASQ_COMMENT} -j {masq}"),
            format!("! -s {cluster} -d {cluster} {MASQ_COMMENT} -j {masq}"),
        ],
    }
}

/// The reference's forward rules for a cluster network.
pub fn forward_rules(cluster: &str) -> TableRules {
    TableRules {
        table: "filter",
        hook_chain: "FORWARD",
        chain: FWD_CHAIN,
        jump: format!("{FWD_COMMENT} -j {FWD_CHAIN}"),
        rules: vec![
            format!("-s {cluster} {FWD_COMMENT} -j ACCEPT"),
            format!("-d {cluster} {FWD_COMMENT} -j ACCEPT"),
        ],
    }
}

/// The (program, table rules) pairs a rule set needs.
pub fn plan(rules: &RuleSet) -> Vec<(&'static str, TableRules)> {
    let mut v = vec![];
    if let Some(m) = &rules.masq_v4 {
        v.push((
            "iptables",
            masq_rules(
                &m.cluster.to_string(),
                &m.pod.to_string(),
                "224.0.0.0/4",
                rules.random_fully,
            ),
        ));
    }
    if let Some(m) = &rules.masq_v6 {
        v.push((
            "ip6tables",
            masq_rules(
                &m.cluster.to_string(),
                &m.pod.to_string(),
                "ff00::/8",
                rules.random_fully,
            ),
        ));
    }
    if let Some(n) = &rules.forward_v4 {
        v.push(("iptables", forward_rules(&n.to_string())));
    }
    if let Some(n) = &rules.forward_v6 {
        v.push(("ip6tables", forward_rules(&n.to_string())));
    }
    v
}

/// The restore payload that atomically replaces flannel's chain and moves the jump to the end.
pub fn restore_payload(t: &TableRules, jump_exists: bool) -> String {
    let mut s = format!("*{}\n:{} - [0:0]\n", t.table, t.chain);
    if jump_exists {
        s.push_str(&format!("-D {} {}\n", t.hook_chain, t.jump));
    }
    s.push_str(&format!("-A {} {}\n", t.hook_chain, t.jump));
    for r in &t.rules {
        s.push_str(&format!("-A {} {r}\n", t.chain));
    }
    s.push_str("COMMIT\n");
    s
}

fn restore_program(program: &str) -> &'static str {
    if program == "ip6tables" {
        "ip6tables-restore"
    } else {
        "iptables-restore"
    }
}

async fn listing(program: &str, table: &str, chain: &str) -> Option<Vec<String>> {
    run_tool(program, &["-w", "-t", table, "-S", chain], None)
        .await
        .ok()
        .map(|out| out.lines().map(str::to_string).collect())
}

async fn jump_present(program: &str, t: &TableRules) -> bool {
    listing(program, t.table, t.hook_chain)
        .await
        .is_some_and(|lines| lines.contains(&format!("-A {} {}", t.hook_chain, t.jump)))
}

/// Whether `--random-fully` is available (iptables >= 1.6.2).
pub async fn supports_random_fully() -> bool {
    let Ok(out) = run_tool("iptables", &["--version"], None).await else {
        return false;
    };
    let version = out
        .split_whitespace()
        .find(|w| w.starts_with('v'))
        .unwrap_or("v0")
        .trim_start_matches('v')
        .to_string();
    let parts: Vec<u32> = version.split('.').filter_map(|p| p.parse().ok()).collect();
    parts >= vec![1, 6, 2]
}

#[async_trait]
impl TrafficRules for IpTables {
    async fn cleanup_other(&self) {
        for (family, table) in [("ip", "flannel-ipv4"), ("ip6", "flannel-ipv6")] {
            if let Err(e) = run_tool("nft", &["delete", "table", family, table], None).await {
                tracing::debug!("nftables: couldn't delete table: {e}");
            }
        }
    }

    async fn apply(&self, rules: &RuleSet) -> Result<(), RulesError> {
        for (program, t) in plan(rules) {
            let payload = restore_payload(&t, jump_present(program, &t).await);
            run_tool(
                restore_program(program),
                &["--noflush", "--wait"],
                Some(&payload),
            )
            .await?;
        }
        Ok(())
    }

    async fn is_current(&self, rules: &RuleSet) -> Result<bool, RulesError> {
        for (program, t) in plan(rules) {
            let Some(chain) = listing(program, t.table, t.chain).await else {
                return Ok(false);
            };
            let want: Vec<String> = t.listing()[1..].to_vec();
            if chain != want || !jump_present(program, &t).await {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restore_payload_format() {
        let t = forward_rules("10.5.0.0/16");
        assert_eq!(
            restore_payload(&t, true),
            "*filter\n:FLANNEL-FWD - [0:0]\n\
             -D FORWARD -m comment --comment \"flanneld forward\" -j FLANNEL-FWD\n\
             -A FORWARD -m comment --comment \"flanneld forward\" -j FLANNEL-FWD\n\
             -A FLANNEL-FWD -s 10.5.0.0/16 -m comment --comment \"flanneld forward\" -j ACCEPT\n\
             -A FLANNEL-FWD -d 10.5.0.0/16 -m comment --comment \"flanneld forward\" -j ACCEPT\n\
             COMMIT\n"
        );
    }
}
