//! The README's main job: a local 3-host flannel-rs cluster in network namespaces.
//!
//! Brings up an underlay, etcd and one flanneld per host (vxlan by default, `--backend NAME` to
//! choose), attaches two pods per host through the reference CNI plugins, prints every host's
//! lease and a pod-to-pod ping matrix, then tears it all down. With `--kube` the hosts run in
//! Kubernetes mode instead: the test API server on host 1, one Node per host with its podCIDR,
//! flanneld started as the DaemonSet starts it, and `kubectl` showing the nodes and annotations.

use std::time::Duration;

use testbed::fixture::PREFIX;
use testbed::Cluster;

fn main() {
    testbed::require_root();
    let mut backend = "vxlan".to_string();
    let mut hosts = 3usize;
    let mut kube = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--backend" => backend = args.next().expect("--backend NAME"),
            "--hosts" => hosts = args.next().and_then(|n| n.parse().ok()).expect("--hosts N"),
            "--kube" => kube = true,
            "-h" | "--help" => {
                println!(
                    "usage: frs-demo [--kube] [--backend vxlan|host-gw|udp|alloc] [--hosts N]"
                );
                return;
            }
            other => {
                eprintln!("unknown argument {other:?}; try --help");
                std::process::exit(2);
            }
        }
    }
    if kube {
        kube_demo(&backend, hosts);
        return;
    }
    let mut c = Cluster::new(hosts);
    let config = format!(r#"{{"Network":"10.5.0.0/16","Backend":{{"Type":"{backend}"}}}}"#);
    c.put_config(None, &config);
    println!(
        "== {hosts} hosts on underlay 192.168.100.0/24, etcd at {}",
        c.etcd.url()
    );
    println!("== {PREFIX}/config = {config}");
    c.start_all(&["--ip-masq"]);
    for h in 0..hosts {
        c.add_pod(h);
        c.add_pod(h);
    }

    println!("\n== leases");
    println!(
        "{:<6} {:<16} {:<16} {:<6} {:<9} etcd value",
        "host", "public ip", "subnet", "mtu", "RSS"
    );
    for (i, h) in c.hosts.iter().enumerate() {
        let value = c.etcd.get(&c.lease_key(i)).unwrap_or_default();
        let rss = rss_text(h);
        println!(
            "{:<6} {:<16} {:<16} {:<6} {:<9} {}",
            format!("h{}", i + 1),
            h.ip.to_string(),
            c.subnet(i).to_string(),
            c.env_var(i, "FLANNEL_MTU"),
            rss,
            value
        );
    }

    // What an operator runs when a packet does not arrive: read-only, exit 0 when all agree.
    let (code, report) = c.doctor(0, &["--ip-masq"]);
    println!("\n== flanneld doctor on h1 (exit {code})");
    for line in report.lines().take_while(|l| !l.starts_with("--- stderr")) {
        println!("{line}");
    }

    finish(c, &backend);
}

/// Kubernetes mode: API server, Nodes with podCIDRs, flanneld with `--kube-subnet-mgr`.
fn kube_demo(backend: &str, hosts: usize) {
    let mut c = Cluster::with_kube_api(hosts);
    c.create_nodes("10.244");
    let conf = format!(r#"{{"Network":"10.244.0.0/16","Backend":{{"Type":"{backend}"}}}}"#);
    c.write_net_conf(&conf);
    println!(
        "== {hosts} hosts on underlay 192.168.100.0/24, Kubernetes API (test server) at {}",
        c.kube().url()
    );
    println!("== net-conf.json = {conf}");
    for i in 0..hosts {
        c.start_flanneld_kube(i, &["--ip-masq"]);
    }
    for h in 0..hosts {
        c.add_pod(h);
        c.add_pod(h);
    }
    // The NetworkUnavailable condition is written right after start; wait for every node.
    for i in 0..hosts {
        let name = testbed::kube_cluster::node_name(i);
        testbed::wait_for(Duration::from_secs(20), "NetworkUnavailable=False", || {
            let n = c.kube().node(&name)?;
            n["status"]["conditions"]
                .as_array()?
                .iter()
                .any(|x| x["type"] == "NetworkUnavailable" && x["status"] == "False")
                .then_some(())
        });
    }
    println!("\n== kubectl get nodes -o wide");
    print!("{}", c.kubectl(&["get", "nodes", "-o", "wide"]));
    println!("\n== kubectl get nodes -o custom-columns=... (flannel's annotations)");
    let a = "metadata.annotations.flannel\\.alpha\\.coreos\\.com/";
    let columns = format!(
        "NODE:.metadata.name,PODCIDR:.spec.podCIDR,BACKEND:.{a}backend-type,PUBLIC-IP:.{a}public-ip,BACKEND-DATA:.{a}backend-data,NETWORK-UNAVAILABLE:.status.conditions[?(@.type==\"NetworkUnavailable\")].reason"
    );
    print!(
        "{}",
        c.kubectl(&["get", "nodes", "-o", &format!("custom-columns={columns}")])
    );
    println!("\n== subnet.env and flanneld memory per host");
    for (i, h) in c.hosts.iter().enumerate() {
        let rss = rss_text(h);
        println!(
            "h{}  FLANNEL_SUBNET={}  FLANNEL_MTU={}  RSS {rss}",
            i + 1,
            c.env_var(i, "FLANNEL_SUBNET"),
            c.env_var(i, "FLANNEL_MTU")
        );
    }
    finish(c, backend);
}

/// Prints the pod-to-pod ping matrix, tears everything down, and fails if a pair is unreachable.
fn finish(c: Cluster, backend: &str) {
    // Give the overlay a moment to converge, then show reachability (no waiting per cell).
    if backend != "alloc" {
        c.wait_full_mesh(Duration::from_secs(20));
    }
    println!("\n== pod-to-pod ping (ok = answered)");
    print!("{:<22}", "from \\ to");
    for p in &c.pods {
        print!("{:<12}", p.label);
    }
    println!();
    let mut failures = 0;
    for a in 0..c.pods.len() {
        print!("{:<22}", format!("{} {}", c.pods[a].label, c.pods[a].ip));
        for b in 0..c.pods.len() {
            let cell = if a == b {
                "-"
            } else if c.ping(a, c.pods[b].ip) {
                "ok"
            } else {
                failures += 1;
                "FAIL"
            };
            print!("{cell:<12}");
        }
        println!();
    }
    println!(
        "\n== {} of {} pairs reachable; tearing everything down",
        c.pods.len() * (c.pods.len() - 1) - failures,
        c.pods.len() * (c.pods.len() - 1)
    );
    drop(c);
    if failures > 0 && backend != "alloc" {
        std::process::exit(1);
    }
}

/// The resident size of a host's flanneld, for the tables ("" when it is not running).
fn rss_text(h: &testbed::cluster::ClusterHost) -> String {
    h.flanneld
        .as_ref()
        .and_then(|f| f.rss_kib())
        .map(|k| format!("{:.1} MiB", k as f64 / 1024.0))
        .unwrap_or_default()
}
