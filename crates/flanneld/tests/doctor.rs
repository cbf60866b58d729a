//! `flanneld doctor` end to end: on a healthy vxlan host it says so (exit 0); after hand-made
//! drift (a route deleted, a stale FDB entry, a route into nowhere, a wrong MTU, the masquerade
//! jump removed, garbage and a duplicate public IP in etcd) it names each problem with a fix
//! (exit 1), in text and JSON; it changes nothing in the kernel or the store; a flanneld restart
//! repairs the host's part and doctor agrees again. Kubernetes mode too.

use std::collections::BTreeSet;
use std::time::Duration;

use testbed::{wait_for, Cluster, NetNs};

const T: Duration = Duration::from_secs(30);
const CONFIG: &str = r#"{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}"#;

/// Everything doctor could conceivably touch on a host and in the store, as text (without what
/// the kernel changes by itself: IPv6 DAD states, bridge timers).
fn snapshot(c: &Cluster, ns: &NetNs) -> String {
    let mut s = String::new();
    for args in [
        &["-o", "link", "show"][..],
        &["-d", "link", "show", "flannel.1"],
        &["-4", "addr", "show"],
        &["-4", "route", "show", "table", "all"],
        &["neigh", "show", "nud", "permanent"],
    ] {
        s.push_str(&ns.ip(args));
    }
    s.push_str(&ns.run("bridge", &["fdb", "show"]));
    for table in ["nat", "filter"] {
        s.push_str(&ns.run("iptables", &["-w", "-t", table, "-S"]));
    }
    let kvs = c
        .etcd
        .ctl(&["get", "--prefix", "/coreos.com/network", "-w", "json"]);
    s.push_str(kvs.split("\"kvs\"").nth(1).unwrap_or_default());
    s
}

#[test]
fn doctor_reports_each_drift_changes_nothing_and_agrees_after_repair() {
    let mut c = Cluster::new(3);
    c.put_config(None, CONFIG);
    c.start_all(&["--ip-masq"]);
    for h in 0..3 {
        c.add_pod(h);
    }
    c.wait_full_mesh(T);

    let (code, out) = c.doctor(0, &["--ip-masq"]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("OK: the store, subnet.env and the kernel agree."),
        "{out}"
    );
    assert!(out.contains("2 remote lease(s)"), "{out}");

    // Drift, with h1's daemon stopped so that nothing repairs it behind doctor's back.
    c.flanneld(0).stop();
    let h1 = c.hosts[0].ns.clone();
    let h3_subnet = c.subnet(2).to_string();
    h1.ip(&["route", "del", &h3_subnet]);
    h1.run(
        "bridge",
        &[
            "fdb",
            "append",
            "0a:0b:0c:0d:0e:0f",
            "dev",
            "flannel.1",
            "dst",
            "192.168.100.99",
            "self",
            "permanent",
        ],
    );
    h1.ip(&[
        "route",
        "add",
        "10.5.200.0/24",
        "via",
        "10.5.200.0",
        "dev",
        "flannel.1",
        "onlink",
    ]);
    h1.ip(&["link", "set", "flannel.1", "mtu", "1400"]);
    h1.run(
        "iptables",
        &[
            "-w",
            "-t",
            "nat",
            "-D",
            "POSTROUTING",
            "-m",
            "comment",
            "--comment",
            "flanneld masq",
            "-j",
            "FLANNEL-POSTRTG",
        ],
    );
    let dup_key = "/coreos.com/network/subnets/10.5.250.0-24";
    let h2_ip = c.hosts[1].ip.to_string();
    c.etcd.put(
        dup_key,
        &format!(r#"{{"PublicIP":"{h2_ip}","PublicIPv6":null,"BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"0e:00:00:00:00:01"}}}}"#),
    );
    let junk_key = "/coreos.com/network/subnets/10.5.251.0-24";
    c.etcd.put(junk_key, "this is not json");

    let before = snapshot(&c, &h1);
    let (code, out) = c.doctor(0, &["--ip-masq"]);
    assert_eq!(code, 1, "{out}");
    for needle in [
        format!("PROBLEM route-missing [{h3_subnet}]: no route to {h3_subnet}"),
        "PROBLEM stale-fdb [0a:0b:0c:0d:0e:0f]".to_string(),
        "PROBLEM extra-route [10.5.200.0/24]".to_string(),
        "PROBLEM mtu [flannel.1]: flannel.1 has MTU 1400 but subnet.env gives pods FLANNEL_MTU=1450".to_string(),
        "fix: ip link set dev flannel.1 mtu 1450".to_string(),
        "PROBLEM rules-missing [iptables]".to_string(),
        format!("PROBLEM duplicate-public-ip [{h2_ip}]"),
        format!("PROBLEM bad-lease [{junk_key}]"),
        format!("fix: delete or rewrite the key: etcdctl del {junk_key}"),
    ] {
        assert!(out.contains(&needle), "missing {needle:?} in:\n{out}");
    }

    let (code, json) = c.doctor(0, &["--ip-masq", "--json"]);
    assert_eq!(code, 1, "{json}");
    let stdout = json.split("\n--- stderr ---").next().unwrap_or_default();
    let doc: serde_json::Value = serde_json::from_str(stdout).expect("doctor --json is JSON");
    assert_eq!(doc["consistent"], false);
    assert_eq!(doc["backend"], "vxlan");
    assert_eq!(doc["ownSubnet"], c.subnet(0).to_string());
    let checks: BTreeSet<&str> = doc["findings"]
        .as_array()
        .expect("findings")
        .iter()
        .map(|f| f["check"].as_str().expect("check"))
        .collect();
    let expected: BTreeSet<&str> = [
        "route-missing",
        "stale-fdb",
        "extra-route",
        "mtu",
        "rules-missing",
        "duplicate-public-ip",
        "bad-lease",
        // the duplicate lease is a vxlan peer this host has no state for
        "neighbour-missing",
        "fdb-missing",
    ]
    .into_iter()
    .collect();
    assert_eq!(checks, expected, "{json}");
    for f in doc["findings"].as_array().expect("findings") {
        assert!(!f["fix"].as_str().unwrap_or_default().is_empty(), "{f}");
    }

    // Read-only: the kernel and the store are exactly as before both runs.
    assert_eq!(before, snapshot(&c, &h1), "doctor changed something");

    // The operator removes the bad keys and restarts flanneld: doctor agrees again.
    c.etcd.del(dup_key);
    c.etcd.del(junk_key);
    c.start_flanneld(0, &["--ip-masq"]);
    let mut last = String::new();
    let agreed = testbed::poll_until(T, || {
        let (code, out) = c.doctor(0, &["--ip-masq"]);
        last = out;
        code == 0
    });
    assert!(agreed, "doctor still disagrees after the restart:\n{last}");
    let out = last;
    assert!(out.contains("OK"), "{out}");
    c.wait_full_mesh(T);
}

#[test]
fn doctor_cannot_reach_the_store_exits_2_with_the_reason() {
    let mut c = Cluster::new(1);
    c.put_config(None, CONFIG);
    c.start_all(&[]);
    c.etcd.stop();
    let (code, out) = c.doctor(0, &[]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("flanneld doctor: "), "{out}");
    assert!(!out.contains("PROBLEM"), "{out}");
}

#[test]
fn doctor_in_kubernetes_mode_reads_the_nodes() {
    let mut c = Cluster::with_kube_api(2);
    c.create_nodes("10.244");
    c.write_net_conf(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#);
    c.start_flanneld_kube(0, &[]);
    c.start_flanneld_kube(1, &[]);
    let h2_subnet = c.subnet(1).to_string();
    wait_for(T, "h1 to route h2's subnet", || {
        c.hosts[0]
            .ns
            .ip(&["route"])
            .contains(&h2_subnet)
            .then_some(())
    });
    let (code, out) = c.doctor_kube(0, &[]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("Kubernetes API (node "), "{out}");
    assert!(out.contains("1 remote lease(s)"), "{out}");

    c.flanneld(0).stop();
    c.hosts[0].ns.ip(&["route", "del", &h2_subnet]);
    let (code, out) = c.doctor_kube(0, &[]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!("PROBLEM route-missing [{h2_subnet}]")),
        "{out}"
    );
}
