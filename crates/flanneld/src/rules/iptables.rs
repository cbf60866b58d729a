//! iptables mode: the reference's exact rules, chains and append order.

use async_trait::async_trait;

use super::{is_subsequence, run_tool, with_retries, RuleSet, RulesError, TrafficRules};

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
    /// Rules shared by every flannel network on the host, kept at the top of the chain.
    pub head: Vec<String>,
    /// This network's rules of flannel's chain (without `-A <chain>`), in order.
    pub rules: Vec<String>,
}

impl TableRules {
    /// The lines `iptables -S` prints for this set: the jump, then the chain.
    pub fn listing(&self) -> Vec<String> {
        let mut v = vec![format!("-A {} {}", self.hook_chain, self.jump)];
        v.push(format!("-N {}", self.chain));
        v.extend(
            self.head
                .iter()
                .chain(&self.rules)
                .map(|r| format!("-A {} {r}", self.chain)),
        );
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
        head: vec![format!(
            "-m mark --mark 0x4000/0x4000 {MASQ_COMMENT} -j RETURN"
        )],
        rules: vec![
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
        head: vec![],
        rules: vec![
            format!("-s {cluster} {FWD_COMMENT} -j ACCEPT"),
            format!("-d {cluster} {FWD_COMMENT} -j ACCEPT"),
        ],
    }
}

/// The (program, table rules) pairs a rule set needs.
pub fn plan(rules: &RuleSet) -> Vec<(&'static str, TableRules)> {
    let mut v = vec![];
    for f in rules.families() {
        let program = if f.v6 { "ip6tables" } else { "iptables" };
        if let Some((cluster, pod)) = &f.masq {
            let t = masq_rules(cluster, pod, f.multicast(), rules.random_fully);
            v.push((program, t));
        }
        if let Some(cluster) = &f.forward {
            v.push((program, forward_rules(cluster)));
        }
    }
    v
}

/// The restore payload that puts our rules in place, touching only what is wrong.
///
/// `chain`: the lines `iptables -S <chain>` shows (`None`: the chain does not exist; declaring
/// an existing chain would flush it, taking other daemons' rules with it). `hook`: the lines of
/// the hook chain. `stale`: rules of a previous config to delete if present.
pub fn restore_payload(
    t: &TableRules,
    chain: Option<&[String]>,
    hook: &[String],
    stale: Option<&TableRules>,
) -> String {
    let mut s = format!("*{}\n", t.table);
    let lines: Vec<String> = chain.map(|c| c.to_vec()).unwrap_or_default();
    if chain.is_none() {
        s.push_str(&format!(":{} - [0:0]\n", t.chain));
    }
    let line = |r: &String| format!("-A {} {r}", t.chain);
    let count = |r: &String| lines.iter().filter(|l| **l == line(r)).count();
    if let Some(old) = stale {
        for r in &old.rules {
            if !t.rules.contains(r) && !t.head.contains(r) {
                for _ in 0..count(r) {
                    s.push_str(&format!("-D {} {r}\n", t.chain));
                }
            }
        }
    }
    let jump = format!("-A {} {}", t.hook_chain, t.jump);
    if !hook.contains(&jump) {
        s.push_str(&format!("{jump}\n"));
    }
    if !head_in_place(t, &lines) {
        for r in &t.head {
            for _ in 0..count(r) {
                s.push_str(&format!("-D {} {r}\n", t.chain));
            }
        }
        for r in t.head.iter().rev() {
            s.push_str(&format!("-I {} 1 {r}\n", t.chain));
        }
    }
    if !rules_in_place(t, &lines) {
        for r in &t.rules {
            for _ in 0..count(r) {
                s.push_str(&format!("-D {} {r}\n", t.chain));
            }
        }
        for r in &t.rules {
            s.push_str(&format!("{}\n", line(r)));
        }
    }
    s.push_str("COMMIT\n");
    s
}

/// The chain's first rules are the shared head rules.
fn head_in_place(t: &TableRules, chain: &[String]) -> bool {
    let rules: Vec<&String> = chain.iter().filter(|l| l.starts_with("-A ")).collect();
    t.head.len() <= rules.len()
        && t.head
            .iter()
            .zip(rules)
            .all(|(h, l)| *l == format!("-A {} {h}", t.chain))
}

/// This network's rules are all in the chain, in order.
fn rules_in_place(t: &TableRules, chain: &[String]) -> bool {
    let want: Vec<String> = t
        .rules
        .iter()
        .map(|r| format!("-A {} {r}", t.chain))
        .collect();
    is_subsequence(&want, chain)
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

/// Whether all of `t` is in place: the jump in the hook chain, our rules in order in the chain.
async fn in_place(program: &str, t: &TableRules) -> bool {
    let (Some(hook), Some(chain)) = (
        listing(program, t.table, t.hook_chain).await,
        listing(program, t.table, t.chain).await,
    ) else {
        return false;
    };
    let want: Vec<String> = t
        .rules
        .iter()
        .map(|r| format!("-A {} {r}", t.chain))
        .collect();
    hook.contains(&format!("-A {} {}", t.hook_chain, t.jump)) && is_subsequence(&want, &chain)
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

    async fn apply(&self, rules: &RuleSet, previous: Option<&RuleSet>) -> Result<(), RulesError> {
        let old_plan = previous.map(plan).unwrap_or_default();
        for (program, t) in plan(rules) {
            let stale = old_plan
                .iter()
                .find(|(p, o)| *p == program && o.chain == t.chain && o.rules != t.rules)
                .map(|(_, o)| o.clone());
            if stale.is_none() && in_place(program, &t).await {
                continue;
            }
            with_retries(
                &format!("{} {}", restore_program(program), t.table),
                || async {
                    let chain = listing(program, t.table, t.chain).await;
                    let hook = listing(program, t.table, t.hook_chain)
                        .await
                        .unwrap_or_default();
                    let payload = restore_payload(&t, chain.as_deref(), &hook, stale.as_ref());
                    run_tool(
                        restore_program(program),
                        &["--noflush", "--wait"],
                        Some(&payload),
                    )
                    .await
                    .map(|_| ())
                },
            )
            .await?;
        }
        Ok(())
    }

    async fn is_current(&self, rules: &RuleSet) -> Result<bool, RulesError> {
        for (program, t) in plan(rules) {
            if !in_place(program, &t).await {
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
            restore_payload(&t, None, &[], None),
            "*filter\n:FLANNEL-FWD - [0:0]\n\
             -A FORWARD -m comment --comment \"flanneld forward\" -j FLANNEL-FWD\n\
             -A FLANNEL-FWD -s 10.5.0.0/16 -m comment --comment \"flanneld forward\" -j ACCEPT\n\
             -A FLANNEL-FWD -d 10.5.0.0/16 -m comment --comment \"flanneld forward\" -j ACCEPT\n\
             COMMIT\n"
        );
    }

    #[test]
    fn shared_head_goes_first_and_own_rules_are_appended() {
        let a = masq_rules("10.11.0.0/16", "10.11.1.0/24", "224.0.0.0/4", true);
        let b = masq_rules("10.12.0.0/16", "10.12.1.0/24", "224.0.0.0/4", true);
        let chain: Vec<String> = a.listing()[1..].to_vec();
        let payload = restore_payload(&b, Some(&chain), &[], None);
        assert!(
            !payload.contains(":FLANNEL-POSTRTG"),
            "must not flush a's rules"
        );
        assert!(
            !payload.contains("-I FLANNEL-POSTRTG"),
            "head already in place"
        );
        assert_eq!(payload.matches("-A FLANNEL-POSTRTG").count(), 5);
        let mut both = chain.clone();
        both.extend(b.rules.iter().map(|r| format!("-A FLANNEL-POSTRTG {r}")));
        assert!(head_in_place(&a, &both) && rules_in_place(&a, &both));
        assert!(head_in_place(&b, &both) && rules_in_place(&b, &both));
    }
}
