//! Kubernetes mode (`--kube-subnet-mgr`) end to end: flanneld against the test API server
//! (`testbed::kubeapi`, which speaks the real wire protocol and is checked with kubectl), on
//! namespace hosts with pods wired through the CNI plugin.

use std::time::Duration;

use testbed::kube_cluster::node_name;
use testbed::kubeapi::KubeApiServer;
use testbed::{wait_for, Cluster};

const T: Duration = Duration::from_secs(30);
const P: &str = "flannel.alpha.coreos.com";

fn vxlan_conf() -> &'static str {
    r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#
}

/// The MAC address of a device in a host namespace.
fn mac_of(c: &Cluster, host: usize, dev: &str) -> String {
    let out = c.hosts[host].ns.ip(&["-o", "link", "show", dev]);
    let pos = out.find("link/ether ").expect("ether address");
    out[pos + 11..pos + 28].to_string()
}

/// The flannel annotations of a node (a kubelet's own annotations left out).
fn annotations(c: &Cluster, node: &str) -> serde_json::Map<String, serde_json::Value> {
    let mut all = c.kube().node(node).expect("node exists")["metadata"]["annotations"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    all.retain(|k, _| k.starts_with(&format!("{P}/")));
    all
}

fn ann(c: &Cluster, node: &str, name: &str) -> Option<String> {
    annotations(c, node)
        .get(&format!("{P}/{name}"))
        .and_then(|v| v.as_str())
        .map(String::from)
}

fn network_condition(c: &Cluster, node: &str) -> Option<serde_json::Value> {
    c.kube().node(node)?["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|x| x["type"] == "NetworkUnavailable")
        .cloned()
}

fn patches(c: &Cluster) -> Vec<String> {
    c.kube()
        .requests()
        .into_iter()
        .filter(|r| r.method == "PATCH")
        .map(|r| {
            format!(
                "{} {} {}",
                r.method,
                r.path,
                r.content_type.unwrap_or_default()
            )
        })
        .collect()
}

/// A Node annotated exactly the way Go flannel's vxlan backend annotates it.
fn go_vxlan_annotations(mac: &str, public_ip: &str) -> Vec<(String, String)> {
    vec![
        (
            format!("{P}/backend-data"),
            format!(r#"{{"VNI":1,"VtepMAC":"{mac}"}}"#),
        ),
        (format!("{P}/backend-type"), "vxlan".into()),
        (format!("{P}/kube-subnet-manager"), "true".into()),
        (format!("{P}/public-ip"), public_ip.into()),
    ]
}

fn create_go_node(c: &Cluster, name: &str, cidr: &str, mac: &str, public_ip: &str) {
    let a = go_vxlan_annotations(mac, public_ip);
    let refs: Vec<(&str, &str)> = a.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    c.kube().create_node(name, &[cidr], &refs);
}

#[test]
fn three_hosts_vxlan_annotations_readiness_and_restart_without_writes() {
    let mut c = Cluster::with_kube_api(3);
    c.create_nodes("10.244");
    c.write_net_conf(vxlan_conf());
    for i in 0..3 {
        c.start_flanneld_kube(i, &["--ip-masq"]);
    }
    for i in 0..3 {
        assert_eq!(
            c.env_var(i, "FLANNEL_SUBNET"),
            format!("10.244.{}.1/24", i + 1)
        );
        assert_eq!(c.env_var(i, "FLANNEL_NETWORK"), "10.244.0.0/16");
        assert_eq!(c.env_var(i, "FLANNEL_MTU"), "1450");
        c.add_pod(i);
    }
    c.wait_full_mesh(T);

    // Annotations are exactly Go flannel's: names, string values, backend-data field order,
    // the MAC of the real device, and nothing for IPv6.
    for i in 0..3 {
        let node = node_name(i);
        let mac = mac_of(&c, i, "flannel.1");
        let mut want = serde_json::Map::new();
        for (k, v) in go_vxlan_annotations(&mac, &format!("192.168.100.{}", 11 + i)) {
            want.insert(k, serde_json::Value::String(v));
        }
        wait_for(T, "node annotations", || {
            (annotations(&c, &node) == want).then_some(())
        });
        let cond = wait_for(T, "NetworkUnavailable condition", || {
            network_condition(&c, &node)
        });
        assert_eq!(cond["status"], "False");
        assert_eq!(cond["reason"], "FlannelIsUp");
        assert_eq!(cond["message"], "Flannel is running on this node");
    }
    // Everything went through the status subresource with a strategic-merge patch.
    let all = patches(&c);
    assert!(!all.is_empty());
    for p in &all {
        assert!(
            p.contains("/status application/strategic-merge-patch+json"),
            "{p}"
        );
    }
    // h1's kernel state towards h3 is what Go flannel builds.
    let h3_mac = mac_of(&c, 2, "flannel.1");
    let h1 = c.hosts[0].ns.clone();
    assert!(h1
        .ip(&["route", "show", "dev", "flannel.1"])
        .contains("10.244.3.0/24 via 10.244.3.0 onlink"));
    assert!(h1
        .ip(&["neigh", "show", "dev", "flannel.1"])
        .contains(&format!("10.244.3.0 lladdr {h3_mac} PERMANENT")));
    assert!(h1
        .run("bridge", &["fdb", "show", "dev", "flannel.1"])
        .contains(&format!("{h3_mac} dst 192.168.100.13 self permanent")));

    // Restart h1: same subnet, same VtepMAC, and not a single write to the API.
    let mac_before = mac_of(&c, 0, "flannel.1");
    c.hosts[0].flanneld.as_mut().unwrap().kill();
    c.kube().clear_requests();
    c.start_flanneld_kube(0, &["--ip-masq"]);
    c.flanneld(0)
        .wait_log("already has NetworkUnavailable=False", T);
    assert_eq!(c.env_var(0, "FLANNEL_SUBNET"), "10.244.1.1/24");
    assert_eq!(mac_of(&c, 0, "flannel.1"), mac_before);
    assert!(
        ann(&c, "h1", "backend-data").unwrap().contains(&mac_before),
        "annotation keeps the MAC"
    );
    assert_eq!(
        patches(&c),
        Vec::<String>::new(),
        "restart wrote to the API"
    );
    // Even with the device gone (reboot), the MAC comes back from the annotation.
    c.hosts[0].flanneld.as_mut().unwrap().kill();
    c.hosts[0].ns.ip(&["link", "del", "flannel.1"]);
    c.start_flanneld_kube(0, &["--ip-masq"]);
    assert_eq!(mac_of(&c, 0, "flannel.1"), mac_before);
    c.wait_full_mesh(T);

    // Heartbeats change nothing flannel reads: no event, no log line about leases.
    let log_before = c.flanneld(1).log().matches("lease added").count();
    for _ in 0..20 {
        c.kube().heartbeat("h1");
        c.kube().heartbeat("h3");
    }
    // A later real change is seen, proving the heartbeats went through the same watch.
    create_go_node(
        &c,
        "late",
        "10.244.77.0/24",
        "0e:2a:00:00:00:77",
        "192.168.100.77",
    );
    let h2 = c.hosts[1].ns.clone();
    wait_for(T, "route to the late node", || {
        h2.ip(&["route"]).contains("10.244.77.0/24").then_some(())
    });
    assert_eq!(
        c.flanneld(1).log().matches("lease added").count(),
        log_before + 1,
        "heartbeats produced lease events"
    );

    // Node deleted: its route, neighbour and FDB entry go away everywhere.
    c.kube().delete_node("h3");
    for h in 0..2 {
        let ns = c.hosts[h].ns.clone();
        wait_for(T, "h3's entries to disappear", || {
            let r = ns.ip(&["route", "show", "dev", "flannel.1"]);
            let n = ns.ip(&["neigh", "show", "dev", "flannel.1"]);
            let f = ns.run("bridge", &["fdb", "show", "dev", "flannel.1"]);
            (!r.contains("10.244.3.0") && !n.contains("10.244.3.0") && !f.contains(&h3_mac))
                .then_some(())
        });
    }
}

#[test]
fn watch_drop_and_expiry_relist_loses_nothing_and_duplicates_nothing() {
    let mut c = Cluster::with_kube_api(2);
    c.create_nodes("10.244");
    c.write_net_conf(vxlan_conf());
    c.start_flanneld_kube(0, &[]);
    c.start_flanneld_kube(1, &[]);
    let h1 = c.hosts[0].ns.clone();
    let has_route = |cidr: &str| h1.ip(&["route"]).contains(cidr);

    // A dropped watch is re-opened from the last resourceVersion: a node added meanwhile is seen.
    c.kube().drop_watches();
    create_go_node(
        &c,
        "g1",
        "10.244.51.0/24",
        "0e:2a:00:00:00:51",
        "192.168.100.51",
    );
    wait_for(T, "route to g1", || {
        has_route("10.244.51.0/24").then_some(())
    });

    // Nodes that flannel must ignore or skip: unmanaged, and managed with garbage.
    c.kube().create_node("plain", &["10.244.60.0/24"], &[]);
    c.kube().create_node(
        "garbage",
        &["10.244.61.0/24"],
        &[
            (&format!("{P}/kube-subnet-manager"), "true"),
            (&format!("{P}/public-ip"), "not-an-ip"),
        ],
    );
    c.flanneld(0)
        .wait_log("Ignoring node \"garbage\": annotation flannel.alpha.coreos.com/public-ip is not an IPv4 address", T);

    // The API server goes away; meanwhile g1 is deleted, g2 is added and history is
    // compacted, so the watch cannot resume: 410 Expired, relist, and the difference is applied.
    c.kube().set_down(true);
    c.kube().delete_node("g1");
    create_go_node(
        &c,
        "g2",
        "10.244.52.0/24",
        "0e:2a:00:00:00:52",
        "192.168.100.52",
    );
    c.kube().compact();
    c.kube().set_down(false);
    wait_for(T, "g1 gone and g2 routed after the relist", || {
        (!has_route("10.244.51.0/24") && has_route("10.244.52.0/24")).then_some(())
    });
    let log = c.flanneld(0).log();
    assert!(log.contains("expired (410); relisting"), "{log}");
    assert!(!h1.ip(&["route"]).contains("10.244.60.0"));
    assert!(!h1.ip(&["route"]).contains("10.244.61.0"));

    // A 410 delivered as an ERROR event inside the stream (the usual case) also relists.
    c.kube().compact();
    c.kube().drop_watches();
    create_go_node(
        &c,
        "g3",
        "10.244.53.0/24",
        "0e:2a:00:00:00:53",
        "192.168.100.53",
    );
    wait_for(T, "route to g3", || {
        has_route("10.244.53.0/24").then_some(())
    });

    // Exactly one route, neighbour and FDB entry per peer: nothing duplicated by the resyncs.
    let routes = h1.ip(&["route", "show", "dev", "flannel.1"]);
    for cidr in ["10.244.2.0/24", "10.244.52.0/24", "10.244.53.0/24"] {
        assert_eq!(routes.matches(cidr).count(), 1, "{routes}");
    }
    assert_eq!(routes.lines().count(), 3, "{routes}");
    let fdb = h1.run("bridge", &["fdb", "show", "dev", "flannel.1"]);
    assert_eq!(
        fdb.lines().filter(|l| l.contains("self permanent")).count(),
        3,
        "{fdb}"
    );
    // Still connected: a pod on h1 reaches one on h2.
    let a = c.add_pod(0);
    let b = c.add_pod(1);
    c.wait_ping(a, c.pods[b].ip, T);
}

#[test]
fn interop_with_a_node_annotated_and_configured_like_go_flannel() {
    let mut c = Cluster::with_kube_api(3);
    c.create_node(0, &["10.244.1.0/24"]);
    c.create_node(1, &["10.244.2.0/24"]);
    c.write_net_conf(vxlan_conf());
    c.start_flanneld_kube(0, &[]);
    c.start_flanneld_kube(1, &[]);
    let p1 = c.add_pod(0);
    let p2 = c.add_pod(1);
    // Host 3 is "Go flannel": flannel.1 made with ip, annotations in Go's exact strings.
    let go = c.hosts[2].ns.clone();
    let go_mac = "0e:2a:01:02:03:05";
    testbed::golike::go_vxlan_device(&go, "192.168.100.13", go_mac, "10.244.3.0");
    create_go_node(&c, "h3", "10.244.3.0/24", go_mac, "192.168.100.13");
    // Go's entries towards our hosts, from our annotations.
    for i in 0..2 {
        let node = node_name(i);
        let data: serde_json::Value = serde_json::from_str(&wait_for(T, "annotation", || {
            ann(&c, &node, "backend-data")
        }))
        .unwrap();
        let mac = data["VtepMAC"].as_str().unwrap().to_string();
        let public = ann(&c, &node, "public-ip").unwrap();
        let subnet = format!("10.244.{}.0/24", i + 1);
        testbed::golike::go_vxlan_peer(&go, &subnet, &mac, &public);
    }
    c.wait_ping(p1, "10.244.3.1".parse().unwrap(), T);
    c.wait_ping(p2, "10.244.3.1".parse().unwrap(), T);
    for p in [p1, p2] {
        let ip = c.pods[p].ip.to_string();
        wait_for(T, "Go host to reach our pod", || {
            go.exec("ping", &["-c", "1", "-W", "1", "-I", "10.244.3.1", &ip])
                .status
                .success()
                .then_some(())
        });
    }
}

#[test]
fn public_ip_overwrite_and_node_public_ip() {
    let mut c = Cluster::with_kube_api(2);
    // h1: the operator says other hosts must use 172.18.0.2 (e.g. a NAT address).
    c.kube().create_node(
        "h1",
        &["10.244.1.0/24"],
        &[(&format!("{P}/public-ip-overwrite"), "172.18.0.2")],
    );
    // h2: the operator pins the address flannel uses (a second address on eth0).
    c.hosts[1]
        .ns
        .ip(&["addr", "add", "192.168.100.112/24", "dev", "eth0"]);
    c.kube().create_node(
        "h2",
        &["10.244.2.0/24"],
        &[(&format!("{P}/node-public-ip"), "192.168.100.112")],
    );
    c.write_net_conf(vxlan_conf());
    c.start_flanneld_kube(0, &[]);
    c.start_flanneld_kube(1, &[]);
    assert_eq!(ann(&c, "h1", "public-ip").as_deref(), Some("172.18.0.2"));
    assert_eq!(
        ann(&c, "h2", "public-ip").as_deref(),
        Some("192.168.100.112")
    );
    assert!(c
        .flanneld(0)
        .log()
        .contains("Overriding public ip with '172.18.0.2' from node annotation 'flannel.alpha.coreos.com/public-ip-overwrite'"));
    // Others send to the announced addresses.
    let h1_mac = mac_of(&c, 0, "flannel.1");
    let h2_mac = mac_of(&c, 1, "flannel.1");
    let (n1, n2) = (c.hosts[0].ns.clone(), c.hosts[1].ns.clone());
    wait_for(T, "h2's FDB entry for h1 to use the overwrite", || {
        n2.run("bridge", &["fdb", "show", "dev", "flannel.1"])
            .contains(&format!("{h1_mac} dst 172.18.0.2 self permanent"))
            .then_some(())
    });
    wait_for(T, "h1's FDB entry for h2 to use node-public-ip", || {
        n1.run("bridge", &["fdb", "show", "dev", "flannel.1"])
            .contains(&format!("{h2_mac} dst 192.168.100.112 self permanent"))
            .then_some(())
    });
}

#[test]
fn host_gw_udp_and_dual_stack_in_kube_mode() {
    for backend in ["host-gw", "udp"] {
        let mut c = Cluster::with_kube_api(2);
        c.create_nodes("10.244");
        c.write_net_conf(&format!(
            r#"{{"Network":"10.244.0.0/16","Backend":{{"Type":"{backend}"}}}}"#
        ));
        c.start_flanneld_kube(0, &[]);
        c.start_flanneld_kube(1, &[]);
        c.add_pod(0);
        c.add_pod(1);
        c.wait_full_mesh(T);
        let (ty, data) = match backend {
            "host-gw" => ("host-gw", "null"),
            _ => ("", "null"),
        };
        assert_eq!(
            ann(&c, "h2", "backend-type").as_deref(),
            Some(ty),
            "{backend}"
        );
        assert_eq!(
            ann(&c, "h2", "backend-data").as_deref(),
            Some(data),
            "{backend}"
        );
    }
    for backend in ["vxlan", "host-gw"] {
        let mut c = Cluster::with_kube_api(2);
        for i in 0..2 {
            c.create_node(
                i,
                &[
                    &format!("10.244.{}.0/24", i + 1),
                    &format!("fd00:10:244:{}::/64", i + 1),
                ],
            );
        }
        c.write_net_conf(&format!(
            r#"{{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{{"Type":"{backend}"}}}}"#
        ));
        c.start_flanneld_kube(0, &[]);
        c.start_flanneld_kube(1, &[]);
        assert_eq!(c.env_var(1, "FLANNEL_IPV6_SUBNET"), "fd00:10:244:2::1/64");
        c.add_pod(0);
        c.add_pod(1);
        c.wait_full_mesh(T);
        let v6 = c.pods[1].ip6.expect("pod has IPv6");
        c.wait_ping6(0, v6, T);
        let v6 = c.pods[0].ip6.unwrap();
        c.wait_ping6(1, v6, T);
        assert_eq!(
            ann(&c, "h2", "public-ipv6").as_deref(),
            Some("fd00:100::12"),
            "{backend}"
        );
        if backend == "vxlan" {
            let mac6 = mac_of(&c, 1, "flannel-v6.1");
            assert_eq!(
                ann(&c, "h2", "backend-v6-data"),
                Some(format!(r#"{{"VNI":1,"VtepMAC":"{mac6}"}}"#))
            );
        }
    }
}

#[test]
fn pod_cidr_assigned_later_is_picked_up() {
    let c = Cluster::with_kube_api(1);
    c.create_node(0, &[]);
    c.write_net_conf(vxlan_conf());
    let mut f = c.spawn_flanneld_kube(0, &[], &[]);
    f.wait_log(
        "Waiting for node \"h1\" to be assigned spec.podCIDR (node \"h1\" pod cidr not assigned)",
        T,
    );
    c.kube().update_node("h1", |n| {
        n["spec"]["podCIDR"] = "10.244.9.0/24".into();
        n["spec"]["podCIDRs"] = serde_json::json!(["10.244.9.0/24"]);
    });
    let path = c.hosts[0].subnet_file.clone();
    f.wait_subnet_env(&path, T);
    assert_eq!(c.env_var(0, "FLANNEL_SUBNET"), "10.244.9.1/24");
}

#[test]
fn startup_errors_are_clear() {
    let c = Cluster::with_kube_api(1);
    c.write_net_conf(vxlan_conf());
    // podCIDR outside Network: the reference's message, exit 1.
    c.create_node(0, &["10.99.1.0/24"]);
    let mut f = c.spawn_flanneld_kube(0, &[], &[]);
    assert_eq!(f.wait_exit(T).code(), Some(1));
    assert!(f.log().contains(
        "subnet \"10.244.0.0/16\" specified in the flannel net config doesn't contain \"10.99.1.0/24\" PodCIDR of the \"h1\" node"
    ), "{}", f.log());
    // Neither NODE_NAME nor POD_NAME/POD_NAMESPACE.
    let mut f = c.spawn_flanneld_kube(0, &[], &[("NODE_NAME", "")]);
    assert_eq!(f.wait_exit(T).code(), Some(1));
    assert!(f
        .log()
        .contains("env variables POD_NAME and POD_NAMESPACE must be set"));
    // A bad annotation prefix.
    let mut f = c.spawn_flanneld_kube(0, &["--kube-annotation-prefix=Bad/Prefix"], &[]);
    assert_eq!(f.wait_exit(T).code(), Some(1));
    assert!(f
        .log()
        .contains("subnet/kube: prefix must be in a format: fqdn/[0-9a-z-_]*"));
    // A queue depth that is not a number.
    let mut f = c.spawn_flanneld_kube(0, &[], &[("EVENT_QUEUE_DEPTH", "lots")]);
    assert_eq!(f.wait_exit(T).code(), Some(1));
    assert!(f
        .log()
        .contains("EVENT_QUEUE_DEPTH=\"lots\" is not a positive integer"));
    // A missing net-conf.json.
    let mut f = c.spawn_flanneld_kube(0, &["--net-config-path=/nonexistent/net-conf.json"], &[]);
    assert_eq!(f.wait_exit(T).code(), Some(1));
    assert!(f
        .log()
        .contains("failed to read net conf: open /nonexistent/net-conf.json"));
}

#[test]
fn node_name_from_pod_bad_token_and_api_server_down_at_start() {
    let mut c = Cluster::with_kube_api(1);
    c.write_net_conf(vxlan_conf());
    c.create_node(0, &["10.244.1.0/24"]);
    c.kube()
        .create_pod("kube-flannel", "kube-flannel-ds-x1", "h1");

    // A rejected token: a clear, rate-limited error, and the daemon keeps trying.
    let kc = c.kubeconfig("not-a-valid-token");
    let mut args = c.kube_args(0, KubeApiServer::FLANNEL_TOKEN);
    args[1] = format!("--kubeconfig-file={}", kc.display());
    let mut f =
        testbed::Flanneld::start_env(&c.hosts[0].ns, c.dir.path(), &args, &[("NODE_NAME", "h1")]);
    f.wait_log("401", T);
    let log = f.log();
    assert!(log.contains("Unauthorized"), "{log}");
    assert!(
        log.contains("check the service-account token or kubeconfig"),
        "{log}"
    );
    // Backoff 1, 2, 4 s: at most 4 attempts in the next 6 s (a tight loop makes hundreds).
    std::thread::sleep(Duration::from_secs(6));
    let lines = f.log().lines().filter(|l| l.contains("401")).count();
    assert!(lines <= 5, "401 logged {lines} times in ~6 s: no backoff");
    assert!(f.try_status().is_none(), "flanneld must keep retrying");
    f.kill();

    // The API server is down when flanneld starts (node name from POD_NAME/POD_NAMESPACE).
    c.kube().set_down(true);
    let f = testbed::Flanneld::start_env(
        &c.hosts[0].ns,
        c.dir.path(),
        &c.kube_args(0, KubeApiServer::FLANNEL_TOKEN),
        &[
            ("NODE_NAME", ""),
            ("POD_NAME", "kube-flannel-ds-x1"),
            ("POD_NAMESPACE", "kube-flannel"),
        ],
    );
    c.hosts[0].flanneld = Some(f);
    c.flanneld(0)
        .wait_log("failed to get pod kube-flannel/kube-flannel-ds-x1", T);
    c.kube().set_down(false);
    let path = c.hosts[0].subnet_file.clone();
    c.flanneld(0)
        .wait_subnet_env(&path, Duration::from_secs(60));
    assert!(c
        .flanneld(0)
        .log()
        .contains("Kubernetes subnet manager for node \"h1\""));
}

#[test]
fn forbidden_identity_gets_a_clear_error_and_no_tight_loop() {
    let c = Cluster::with_kube_api(1);
    c.write_net_conf(vxlan_conf());
    c.create_node(0, &["10.244.1.0/24"]);
    // A client certificate the server trusts, for a user without flannel's ClusterRole.
    let kc = c.kubeconfig_cert(testbed::kubeapi::NOBODY_USER);
    let mut args = c.kube_args(0, KubeApiServer::FLANNEL_TOKEN);
    args[1] = format!("--kubeconfig-file={}", kc.display());
    let mut f =
        testbed::Flanneld::start_env(&c.hosts[0].ns, c.dir.path(), &args, &[("NODE_NAME", "h1")]);
    f.wait_log("403", T);
    let log = f.log();
    assert!(log.contains("Forbidden"), "{log}");
    assert!(log.contains("system:node:nobody"), "{log}");
    assert!(
        log.contains("it needs the ClusterRole of packaging/kube-flannel.yml"),
        "{log}"
    );
    // Backoff 1, 2, 4 s: at most 4 attempts in the next 6 s (a tight loop makes hundreds).
    std::thread::sleep(Duration::from_secs(6));
    let lines = f.log().lines().filter(|l| l.contains("403")).count();
    assert!(lines <= 5, "403 logged {lines} times in ~6 s: no backoff");
    assert!(f.try_status().is_none(), "flanneld must keep retrying");
}
