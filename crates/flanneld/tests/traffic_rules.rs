//! Masquerade/forward rules: exact reference text in iptables and nftables mode, kept correct
//! across restarts and after someone deletes a rule; the blackhole route option.

use std::time::Duration;

use testbed::{wait_for, EtcdHost};

const T: Duration = Duration::from_secs(30);

fn iptables_state(w: &EtcdHost) -> (Vec<String>, Vec<String>) {
    let ns = &w.host.ns;
    let mut nat: Vec<String> = ns
        .run("iptables", &["-t", "nat", "-S", "POSTROUTING"])
        .lines()
        .filter(|l| l.contains("FLANNEL"))
        .map(String::from)
        .collect();
    nat.extend(
        ns.run("iptables", &["-t", "nat", "-S", "FLANNEL-POSTRTG"])
            .lines()
            .map(String::from),
    );
    let mut filter: Vec<String> = ns
        .run("iptables", &["-t", "filter", "-S", "FORWARD"])
        .lines()
        .map(String::from)
        .collect();
    filter.extend(
        ns.run("iptables", &["-t", "filter", "-S", "FLANNEL-FWD"])
            .lines()
            .map(String::from),
    );
    (nat, filter)
}

fn iptables_golden(pod: &str, cluster: &str) -> (Vec<String>, Vec<String>) {
    let m = r#"-m comment --comment "flanneld masq""#;
    let f = r#"-m comment --comment "flanneld forward""#;
    let nat = vec![
        format!("-A POSTROUTING {m} -j FLANNEL-POSTRTG"),
        "-N FLANNEL-POSTRTG".to_string(),
        format!("-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 {m} -j RETURN"),
        format!("-A FLANNEL-POSTRTG -s {pod} -d {cluster} {m} -j RETURN"),
        format!("-A FLANNEL-POSTRTG -s {cluster} -d {pod} {m} -j RETURN"),
        format!("-A FLANNEL-POSTRTG ! -s {cluster} -d {pod} {m} -j RETURN"),
        format!(
            "-A FLANNEL-POSTRTG -s {cluster} ! -d 224.0.0.0/4 {m} -j MASQUERADE --random-fully"
        ),
        format!("-A FLANNEL-POSTRTG ! -s {cluster} -d {cluster} {m} -j MASQUERADE --random-fully"),
    ];
    let filter = vec![
        "-P FORWARD ACCEPT".to_string(),
        "-A FORWARD -j KUBE-FORWARD".to_string(),
        format!("-A FORWARD {f} -j FLANNEL-FWD"),
        "-N FLANNEL-FWD".to_string(),
        format!("-A FLANNEL-FWD -s {cluster} {f} -j ACCEPT"),
        format!("-A FLANNEL-FWD -d {cluster} {f} -j ACCEPT"),
    ];
    (nat, filter)
}

#[test]
fn iptables_rules_match_the_reference_and_are_kept() {
    let w = EtcdHost::new("ipt");
    w.put_config(r#"{"Network":"10.5.0.0/16","Backend":{"Type":"alloc"}}"#);
    let ns = &w.host.ns;
    // kube-proxy's jump exists first: flannel's must be appended after it.
    ns.run("iptables", &["-N", "KUBE-FORWARD"]);
    ns.run("iptables", &["-A", "FORWARD", "-j", "KUBE-FORWARD"]);
    // A leftover nftables-mode table is removed in iptables mode.
    ns.run("nft", &["add", "table", "ip", "flannel-ipv4"]);
    let args = ["--ip-masq", "--iptables-resync=1"];
    let mut f = w.flanneld(&args);
    f.wait_subnet_env(&w.subnet_file(), T);
    let pod = w.subnet().to_string();
    let golden = iptables_golden(&pod, "10.5.0.0/16");
    assert_eq!(iptables_state(&w), golden);
    assert!(!ns.run("nft", &["list", "tables"]).contains("flannel-ipv4"));

    // Someone deletes a rule and the jump: restored exactly.
    ns.run("iptables", &["-t", "nat", "-D", "FLANNEL-POSTRTG", "3"]);
    ns.run("iptables", &["-t", "filter", "-D", "FORWARD", "2"]);
    wait_for(T, "rules to be restored", || {
        (iptables_state(&w) == golden).then_some(())
    });

    // Restart (even SIGKILL): identical rules, no duplicated jump.
    f.kill();
    let mut f = w.flanneld(&args);
    f.wait_log("traffic rules installed", T);
    f.wait_log("Wrote subnet file", T);
    assert_eq!(iptables_state(&w), golden);
}

fn nft_chain(w: &EtcdHost, family: &str, table: &str, chain: &str) -> String {
    w.host
        .ns
        .run("nft", &["list", "chain", family, table, chain])
}

#[test]
fn nftables_rules_match_the_reference_and_are_kept() {
    let w = EtcdHost::new("nft");
    w.put_config(r#"{"Network":"10.5.0.0/16","EnableNFTables":true,"Backend":{"Type":"alloc"}}"#);
    let ns = &w.host.ns;
    let args = ["--ip-masq", "--iptables-resync=1"];
    let mut f = w.flanneld(&args);
    f.wait_log("traffic rules installed", T);
    f.wait_log("Wrote subnet file", T);
    let pod = w.subnet().to_string();
    let c = "10.5.0.0/16";
    let postrtg = format!(
        "table ip flannel-ipv4 {{\n\
         \tchain postrtg {{\n\
         \t\tcomment \"chain to manage traffic masquerading by flannel\"\n\
         \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
         \t\tmeta mark 0x00004000 return\n\
         \t\tip saddr {pod} ip daddr {c} return\n\
         \t\tip saddr {c} ip daddr {pod} return\n\
         \t\tip saddr != {pod} ip daddr {c} return\n\
         \t\tip saddr {c} ip daddr != 224.0.0.0/4 masquerade fully-random\n\
         \t\tip saddr != {c} ip daddr {c} masquerade fully-random\n\
         \t}}\n\
         }}\n"
    );
    let forward = format!(
        "table ip flannel-ipv4 {{\n\
         \tchain forward {{\n\
         \t\tcomment \"chain to accept flannel traffic\"\n\
         \t\ttype filter hook forward priority filter; policy accept;\n\
         \t\tip saddr {c} accept\n\
         \t\tip daddr {c} accept\n\
         \t}}\n\
         }}\n"
    );
    assert_eq!(nft_chain(&w, "ip", "flannel-ipv4", "postrtg"), postrtg);
    assert_eq!(nft_chain(&w, "ip", "flannel-ipv4", "forward"), forward);
    assert!(ns
        .run("nft", &["list", "tables"])
        .contains("table ip6 flannel-ipv6"));
    // No iptables chains in nftables mode.
    assert!(!ns
        .run("iptables", &["-t", "nat", "-S"])
        .contains("FLANNEL-POSTRTG"));

    // A rule deleted behind our back comes back (the reference never re-checks).
    let handles = ns.run(
        "nft",
        &["-a", "list", "chain", "ip", "flannel-ipv4", "postrtg"],
    );
    let handle = handles
        .lines()
        .find(|l| l.contains("masquerade"))
        .and_then(|l| l.rsplit("handle ").next())
        .unwrap()
        .trim()
        .to_string();
    ns.run(
        "nft",
        &[
            "delete",
            "rule",
            "ip",
            "flannel-ipv4",
            "postrtg",
            "handle",
            &handle,
        ],
    );
    wait_for(T, "nft rules to be restored", || {
        (nft_chain(&w, "ip", "flannel-ipv4", "postrtg") == postrtg).then_some(())
    });

    f.kill();
    let mut f = w.flanneld(&args);
    f.wait_log("traffic rules installed", T);
    f.wait_log("Wrote subnet file", T);
    assert_eq!(nft_chain(&w, "ip", "flannel-ipv4", "postrtg"), postrtg);
    assert_eq!(nft_chain(&w, "ip", "flannel-ipv4", "forward"), forward);
}

#[test]
fn blackhole_route_is_kept() {
    let w = EtcdHost::new("blackhole");
    w.put_config(r#"{"Network":"10.5.0.0/16","Backend":{"Type":"alloc"}}"#);
    let mut f = w.flanneld(&["--ip-blackhole-route", "--iptables-resync=1"]);
    f.wait_subnet_env(&w.subnet_file(), T);
    let pod = w.subnet().to_string();
    let ns = &w.host.ns;
    let want = format!("blackhole {pod}");
    wait_for(T, "blackhole route", || {
        ns.ip(&["route"]).contains(&want).then_some(())
    });
    ns.ip(&["route", "del", "blackhole", &pod]);
    wait_for(T, "blackhole route to come back", || {
        ns.ip(&["route"]).contains(&want).then_some(())
    });
}

/// One flanneld per network at `/a/network` and `/b/network`, with masquerading.
fn start_two_networks(w: &EtcdHost) -> Vec<testbed::Flanneld> {
    [("/a/network", "a.env"), ("/b/network", "b.env")]
        .into_iter()
        .map(|(prefix, file)| {
            let mut f = w.flanneld_for(prefix, file, &["--ip-masq", "--iptables-resync=1"]);
            f.wait_log("traffic rules installed", T);
            f.wait_log("Wrote subnet file", T);
            f
        })
        .collect()
}

fn chain_lines(w: &EtcdHost, table: &str, chain: &str) -> Vec<String> {
    w.host
        .ns
        .run("iptables", &["-t", table, "-S", chain])
        .lines()
        .map(String::from)
        .collect()
}

#[test]
fn two_networks_on_one_host_keep_both_rule_sets() {
    let w = EtcdHost::new("iptmulti");
    w.etcd.put(
        "/a/network/config",
        r#"{"Network":"10.11.0.0/16","Backend":{"Type":"alloc"}}"#,
    );
    w.etcd.put(
        "/b/network/config",
        r#"{"Network":"10.12.0.0/16","Backend":{"Type":"alloc"}}"#,
    );
    let daemons = start_two_networks(&w);
    let has_both = |lines: &[String]| {
        lines.iter().any(|l| l.contains("10.11.0.0/16"))
            && lines.iter().any(|l| l.contains("10.12.0.0/16"))
    };
    let before = chain_lines(&w, "nat", "FLANNEL-POSTRTG");
    assert!(has_both(&before), "{before:?}");
    assert!(has_both(&chain_lines(&w, "filter", "FLANNEL-FWD")));
    // Several resync periods later nothing has moved: the daemons do not fight.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(chain_lines(&w, "nat", "FLANNEL-POSTRTG"), before);
    for f in &daemons {
        assert!(!f.log().contains("were changed; restoring"), "{}", f.log());
    }
}

#[test]
fn changed_network_replaces_the_previous_rules() {
    let w = EtcdHost::new("iptchange");
    w.put_config(r#"{"Network":"10.5.0.0/16","Backend":{"Type":"alloc"}}"#);
    let mut f = w.flanneld(&["--ip-masq"]);
    f.wait_log("traffic rules installed", T);
    f.wait_log("Wrote subnet file", T);
    f.kill();
    // The operator moves the cluster to another network; the old lease is gone.
    for k in w.lease_keys() {
        w.etcd.del(&k);
    }
    w.put_config(r#"{"Network":"10.6.0.0/16","Backend":{"Type":"alloc"}}"#);
    let mut f = w.flanneld(&["--ip-masq"]);
    f.wait_log("traffic rules installed", T);
    f.wait_log("Wrote subnet file", T);
    let pod = w.subnet().to_string();
    let (nat, _) = iptables_state(&w);
    assert_eq!(nat, iptables_golden(&pod, "10.6.0.0/16").0);
    assert!(!chain_lines(&w, "filter", "FLANNEL-FWD")
        .iter()
        .any(|l| l.contains("10.5.0.0/16")));
}

#[test]
fn two_networks_on_one_host_keep_both_nft_rule_sets() {
    let w = EtcdHost::new("nftmulti");
    for (prefix, net) in [
        ("/a/network", "10.11.0.0/16"),
        ("/b/network", "10.12.0.0/16"),
    ] {
        w.etcd.put(
            &format!("{prefix}/config"),
            &format!(r#"{{"Network":"{net}","EnableNFTables":true,"Backend":{{"Type":"alloc"}}}}"#),
        );
    }
    let daemons = start_two_networks(&w);
    let before = nft_chain(&w, "ip", "flannel-ipv4", "postrtg");
    assert!(
        before.contains("10.11.0.0/16") && before.contains("10.12.0.0/16"),
        "{before}"
    );
    assert_eq!(
        before.matches("meta mark 0x00004000 return").count(),
        1,
        "{before}"
    );
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(nft_chain(&w, "ip", "flannel-ipv4", "postrtg"), before);
    for f in &daemons {
        assert!(!f.log().contains("were changed; restoring"), "{}", f.log());
    }
}
