//! nftables mode (`EnableNFTables`): tables `ip flannel-ipv4` / `ip6 flannel-ipv6` with the
//! reference's chains, written in one `nft -f -` transaction.

use async_trait::async_trait;

use super::{iptables, run_tool, RuleSet, RulesError, TrafficRules};

/// nftables through the `nft` command.
pub struct NfTables;

const POSTRTG_COMMENT: &str = "chain to manage traffic masquerading by flannel";
const FORWARD_COMMENT: &str = "chain to accept flannel traffic";

struct Family {
    nft: &'static str,
    table: &'static str,
    multicast: &'static str,
}

const V4: Family = Family {
    nft: "ip",
    table: "flannel-ipv4",
    multicast: "224.0.0.0/4",
};
const V6: Family = Family {
    nft: "ip6",
    table: "flannel-ipv6",
    multicast: "ff00::/8",
};

fn masq_rules(f: &Family, cluster: &str, pod: &str, random_fully: bool) -> Vec<String> {
    let masq = if random_fully {
        "masquerade fully-random"
    } else {
        "masquerade"
    };
    let fam = f.nft;
    vec![
        "meta mark 0x4000 return".to_string(),
        format!("{fam} saddr {pod} {fam} daddr {cluster} return"),
        format!("{fam} saddr {cluster} {fam} daddr {pod} return"),
        format!("{fam} saddr != {pod} {fam} daddr {cluster} return"),
        format!(
            "{fam} saddr {cluster} {fam} daddr != {} {masq}",
            f.multicast
        ),
        format!("{fam} saddr != {cluster} {fam} daddr {cluster} {masq}"),
    ]
}

fn forward_rules(f: &Family, cluster: &str) -> Vec<String> {
    vec![
        format!("{} saddr {cluster} accept", f.nft),
        format!("{} daddr {cluster} accept", f.nft),
    ]
}

/// The chains a rule set needs, per family: (family, chain, rules).
fn chains(rules: &RuleSet) -> Vec<(&'static Family, &'static str, Vec<String>)> {
    let mut v = vec![];
    if let Some(m) = &rules.masq_v4 {
        v.push((
            &V4,
            "postrtg",
            masq_rules(
                &V4,
                &m.cluster.to_string(),
                &m.pod.to_string(),
                rules.random_fully,
            ),
        ));
    }
    if let Some(n) = &rules.forward_v4 {
        v.push((&V4, "forward", forward_rules(&V4, &n.to_string())));
    }
    if let Some(m) = &rules.masq_v6 {
        v.push((
            &V6,
            "postrtg",
            masq_rules(
                &V6,
                &m.cluster.to_string(),
                &m.pod.to_string(),
                rules.random_fully,
            ),
        ));
    }
    if let Some(n) = &rules.forward_v6 {
        v.push((&V6, "forward", forward_rules(&V6, &n.to_string())));
    }
    v
}

/// The `nft -f` script: tables, chains declared, flushed and refilled in one transaction.
pub fn script(rules: &RuleSet) -> String {
    let mut s = String::new();
    for f in [&V4, &V6] {
        s.push_str(&format!(
            "add table {} {} {{ comment \"rules for {}\" ; }}\n",
            f.nft, f.table, f.table
        ));
    }
    for (f, chain, body) in chains(rules) {
        let (hook, comment) = if chain == "postrtg" {
            ("type nat hook postrouting priority srcnat", POSTRTG_COMMENT)
        } else {
            ("type filter hook forward priority filter", FORWARD_COMMENT)
        };
        s.push_str(&format!(
            "add chain {} {} {chain} {{ {hook} ; comment \"{comment}\" ; }}\n",
            f.nft, f.table
        ));
        s.push_str(&format!("flush chain {} {} {chain}\n", f.nft, f.table));
        for r in body {
            s.push_str(&format!("add rule {} {} {chain} {r}\n", f.nft, f.table));
        }
    }
    s
}

/// How `nft` prints a rule we wrote (it pads marks to 8 hex digits).
fn as_listed(rule: &str) -> String {
    rule.replace("meta mark 0x4000 ", "meta mark 0x00004000 ")
}

#[async_trait]
impl TrafficRules for NfTables {
    async fn cleanup_other(&self) {
        // Remove iptables jumps first, then flannel's chains (the reference forgets the jumps).
        let everything = RuleSet {
            masq_v4: Some(super::Masq {
                cluster: "0.0.0.0/0".parse().expect("static"),
                pod: "0.0.0.0/0".parse().expect("static"),
            }),
            forward_v4: Some("0.0.0.0/0".parse().expect("static")),
            masq_v6: Some(super::Masq {
                cluster: "::/0".parse().expect("static"),
                pod: "::/0".parse().expect("static"),
            }),
            forward_v6: Some("::/0".parse().expect("static")),
            random_fully: false,
        };
        for (program, t) in iptables::plan(&everything) {
            let _ = run_tool(
                program,
                &[
                    "-w",
                    "-t",
                    t.table,
                    "-D",
                    t.hook_chain,
                    "-m",
                    "comment",
                    "--comment",
                    if t.table == "nat" {
                        "flanneld masq"
                    } else {
                        "flanneld forward"
                    },
                    "-j",
                    t.chain,
                ],
                None,
            )
            .await;
            let _ = run_tool(program, &["-w", "-t", t.table, "-F", t.chain], None).await;
            let _ = run_tool(program, &["-w", "-t", t.table, "-X", t.chain], None).await;
        }
    }

    async fn apply(&self, rules: &RuleSet) -> Result<(), RulesError> {
        run_tool("nft", &["-f", "-"], Some(&script(rules))).await?;
        Ok(())
    }

    async fn is_current(&self, rules: &RuleSet) -> Result<bool, RulesError> {
        for (f, chain, body) in chains(rules) {
            let Ok(out) = run_tool("nft", &["list", "chain", f.nft, f.table, chain], None).await
            else {
                return Ok(false);
            };
            let listed: Vec<String> = out
                .lines()
                .map(str::trim)
                .filter(|l| {
                    !l.is_empty()
                        && !l.starts_with("table ")
                        && !l.starts_with("chain ")
                        && !l.starts_with("comment ")
                        && !l.starts_with("type ")
                        && *l != "}"
                })
                .map(str::to_string)
                .collect();
            let want: Vec<String> = body.iter().map(|r| as_listed(r)).collect();
            if listed != want {
                return Ok(false);
            }
        }
        Ok(true)
    }
}
