//! nftables mode (`EnableNFTables`): tables `ip flannel-ipv4` / `ip6 flannel-ipv6` with the
//! reference's chains, written in one `nft -f -` transaction.

use async_trait::async_trait;

use super::{iptables, is_subsequence, run_tool, with_retries, RuleSet, RulesError, TrafficRules};

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

/// The rule shared by every flannel network on the host, kept first in `postrtg`.
const MARK_RULE: &str = "meta mark 0x4000 return";

fn masq_rules(f: &Family, cluster: &str, pod: &str, random_fully: bool) -> Vec<String> {
    let masq = if random_fully {
        "masquerade fully-random"
    } else {
        "masquerade"
    };
    let fam = f.nft;
    vec![
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

/// A chain's worth of rules: (family, chain, shared head rules, this network's rules).
type ChainRules = (&'static Family, &'static str, Vec<String>, Vec<String>);

/// The chains a rule set needs.
fn chains(rules: &RuleSet) -> Vec<ChainRules> {
    let mut v = vec![];
    for fr in rules.families() {
        let f = if fr.v6 { &V6 } else { &V4 };
        if let Some((cluster, pod)) = &fr.masq {
            let body = masq_rules(f, cluster, pod, rules.random_fully);
            v.push((f, "postrtg", vec![MARK_RULE.to_string()], body));
        }
        if let Some(cluster) = &fr.forward {
            v.push((f, "forward", vec![], forward_rules(f, cluster)));
        }
    }
    v
}

/// The table and chain declarations (idempotent `add`s) for a rule set.
fn declarations(rules: &RuleSet) -> String {
    let mut s = String::new();
    for f in [&V4, &V6] {
        s.push_str(&format!(
            "add table {} {} {{ comment \"rules for {}\" ; }}\n",
            f.nft, f.table, f.table
        ));
    }
    for (f, chain, _, _) in chains(rules) {
        let (hook, comment) = if chain == "postrtg" {
            ("type nat hook postrouting priority srcnat", POSTRTG_COMMENT)
        } else {
            ("type filter hook forward priority filter", FORWARD_COMMENT)
        };
        s.push_str(&format!(
            "add chain {} {} {chain} {{ {hook} ; comment \"{comment}\" ; }}\n",
            f.nft, f.table
        ));
    }
    s
}

/// The `nft -f` script for a fresh host: tables, chains, rules in order.
pub fn script(rules: &RuleSet) -> String {
    let mut s = declarations(rules);
    for (f, chain, head, body) in chains(rules) {
        for r in head.iter().chain(&body) {
            s.push_str(&format!("add rule {} {} {chain} {r}\n", f.nft, f.table));
        }
    }
    s
}

/// How `nft` prints a rule we wrote (it pads marks to 8 hex digits).
fn as_listed(rule: &str) -> String {
    rule.replace("meta mark 0x4000 ", "meta mark 0x00004000 ")
}

/// The rules of a chain as (listed text, handle); `None` if the chain does not exist.
async fn listed_rules(f: &Family, chain: &str) -> Option<Vec<(String, u64)>> {
    let out = run_tool("nft", &["-a", "list", "chain", f.nft, f.table, chain], None)
        .await
        .ok()?;
    Some(
        out.lines()
            .filter_map(|l| {
                let (text, handle) = l.trim().rsplit_once(" # handle ")?;
                if text.starts_with("chain ") || text.starts_with("table ") {
                    return None;
                }
                Some((text.trim().to_string(), handle.trim().parse().ok()?))
            })
            .collect(),
    )
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
            let comment = if t.table == "nat" {
                "flanneld masq"
            } else {
                "flanneld forward"
            };
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
                    comment,
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

    async fn apply(&self, rules: &RuleSet, previous: Option<&RuleSet>) -> Result<(), RulesError> {
        let old = previous.map(chains).unwrap_or_default();
        with_retries("nft -f -", || async {
            let mut s = declarations(rules);
            let mut changes = false;
            for (f, chain, head, body) in chains(rules) {
                let head: Vec<String> = head.iter().map(|r| as_listed(r)).collect();
                let want: Vec<String> = body.iter().map(|r| as_listed(r)).collect();
                let stale: Vec<String> = old
                    .iter()
                    .filter(|(of, oc, _, ob)| of.table == f.table && *oc == chain && *ob != body)
                    .flat_map(|(_, _, _, ob)| ob.iter().map(|r| as_listed(r)))
                    .filter(|r| !want.contains(r) && !head.contains(r))
                    .collect();
                let present = listed_rules(f, chain).await.unwrap_or_default();
                let texts: Vec<String> = present.iter().map(|(t, _)| t.clone()).collect();
                let head_ok = texts.len() >= head.len() && texts[..head.len()] == head[..];
                let body_ok = is_subsequence(&want, &texts);
                let doomed = |t: &String| {
                    stale.contains(t)
                        || (!head_ok && head.contains(t))
                        || (!body_ok && want.contains(t))
                };
                for (text, handle) in &present {
                    if doomed(text) {
                        changes = true;
                        s.push_str(&format!(
                            "delete rule {} {} {chain} handle {handle}\n",
                            f.nft, f.table
                        ));
                    }
                }
                if !head_ok {
                    changes = true;
                    for r in head.iter().rev() {
                        s.push_str(&format!("insert rule {} {} {chain} {r}\n", f.nft, f.table));
                    }
                }
                if !body_ok {
                    changes = true;
                    for r in &body {
                        s.push_str(&format!("add rule {} {} {chain} {r}\n", f.nft, f.table));
                    }
                }
            }
            if !changes {
                let tables = run_tool("nft", &["list", "tables"], None)
                    .await
                    .unwrap_or_default();
                if tables.contains("flannel-ipv4") && tables.contains("flannel-ipv6") {
                    return Ok(());
                }
            }
            run_tool("nft", &["-f", "-"], Some(&s)).await.map(|_| ())
        })
        .await
    }

    async fn is_current(&self, rules: &RuleSet) -> Result<bool, RulesError> {
        for (f, chain, head, body) in chains(rules) {
            let Some(present) = listed_rules(f, chain).await else {
                return Ok(false);
            };
            let texts: Vec<String> = present.into_iter().map(|(t, _)| t).collect();
            let head: Vec<String> = head.iter().map(|r| as_listed(r)).collect();
            let want: Vec<String> = body.iter().map(|r| as_listed(r)).collect();
            let head_ok = texts.len() >= head.len() && texts[..head.len()] == head[..];
            if !head_ok || !is_subsequence(&want, &texts) {
                return Ok(false);
            }
        }
        Ok(true)
    }
}
