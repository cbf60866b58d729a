//! vxlan backend end to end: pods on several namespace hosts reach each other over real kernel
//! VXLAN; peers leaving/joining, custom VNI/port, DirectRouting, device deletion, stale state.

use std::time::Duration;

use testbed::{wait_for, Cluster};

const T: Duration = Duration::from_secs(30);

fn vxlan_config(extra: &str) -> String {
    format!(r#"{{"Network":"10.5.0.0/16","Backend":{{"Type":"vxlan"{extra}}}}}"#)
}

#[test]
fn three_hosts_reach_each_other_and_track_leaves_and_joins() {
    let mut c = Cluster::new(3);
    c.put_config(None, &vxlan_config(""));
    c.start_all(&[]);
    for h in 0..3 {
        c.add_pod(h);
    }
    c.wait_full_mesh(T);

    // Kernel state on h1 is what Go flannel would build.
    let h1 = &c.hosts[0].ns;
    let link = h1.ip(&["-d", "link", "show", "flannel.1"]);
    assert!(
        link.contains("vxlan id 1 local 192.168.100.11 dev eth0"),
        "{link}"
    );
    assert!(
        link.contains("dstport 8472") && link.contains("nolearning"),
        "{link}"
    );
    assert!(link.contains("mtu 1450"), "{link}");
    assert_eq!(c.env_var(0, "FLANNEL_MTU"), "1450");
    let own = c.subnet(0).to_string();
    let own_addr = own.replace("/24", "/32");
    assert!(h1.ip(&["addr", "show", "flannel.1"]).contains(&own_addr));
    let h3_subnet = c.subnet(2).to_string();
    let h3_gw = h3_subnet.trim_end_matches("/24");
    let routes = h1.ip(&["route", "show", "dev", "flannel.1"]);
    assert!(
        routes.contains(&format!("{h3_subnet} via {h3_gw} onlink")),
        "{routes}"
    );
    let lease: serde_json::Value =
        serde_json::from_str(&c.etcd.get(&c.lease_key(2)).unwrap()).unwrap();
    let mac = lease["BackendData"]["VtepMAC"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(lease["BackendType"], "vxlan");
    assert_eq!(lease["BackendData"]["VNI"], 1);
    let neigh = h1.ip(&["neigh", "show", "dev", "flannel.1"]);
    assert!(
        neigh.contains(&format!("{h3_gw} lladdr {mac} PERMANENT")),
        "{neigh}"
    );
    let fdb = h1.run("bridge", &["fdb", "show", "dev", "flannel.1"]);
    assert!(
        fdb.contains(&format!("{mac} dst 192.168.100.13 self permanent")),
        "{fdb}"
    );

    // h3 leaves: its lease is deleted; h1 and h2 drop its route, neighbour and FDB entry.
    c.hosts[2].flanneld.as_mut().unwrap().kill();
    c.etcd.del(&c.lease_key(2));
    for h in 0..2 {
        let ns = &c.hosts[h].ns;
        wait_for(T, "h3's entries to disappear", || {
            let r = ns.ip(&["route", "show", "dev", "flannel.1"]);
            let n = ns.ip(&["neigh", "show", "dev", "flannel.1"]);
            let f = ns.run("bridge", &["fdb", "show", "dev", "flannel.1"]);
            (!r.contains(&h3_subnet) && !n.contains(h3_gw) && !f.contains(&mac)).then_some(())
        });
    }

    // h4 joins later and is reached by the others.
    let h4 = c.add_host();
    c.start_flanneld(h4, &[]);
    let p4 = c.add_pod(h4);
    let p4_ip = c.pods[p4].ip;
    c.wait_ping(0, p4_ip, T);
    c.wait_ping(1, p4_ip, T);
    c.wait_ping(p4, c.pods[0].ip, T);
}

#[test]
fn custom_vni_and_port() {
    let mut c = Cluster::new(2);
    c.put_config(None, &vxlan_config(r#","VNI":4242,"Port":4789"#));
    c.start_all(&[]);
    c.add_pod(0);
    c.add_pod(1);
    c.wait_full_mesh(T);
    let link = c.hosts[0].ns.ip(&["-d", "link", "show", "flannel.4242"]);
    assert!(
        link.contains("vxlan id 4242") && link.contains("dstport 4789"),
        "{link}"
    );
}

#[test]
fn direct_routing_uses_plain_routes_on_one_segment() {
    let mut c = Cluster::new(2);
    c.put_config(None, &vxlan_config(r#","DirectRouting":true"#));
    c.start_all(&[]);
    c.add_pod(0);
    c.add_pod(1);
    c.wait_full_mesh(T);
    let h2_subnet = c.subnet(1).to_string();
    let routes = c.hosts[0].ns.ip(&["route"]);
    assert!(
        routes.contains(&format!("{h2_subnet} via 192.168.100.12 dev eth0")),
        "{routes}"
    );
    let fdb = c.hosts[0]
        .ns
        .run("bridge", &["fdb", "show", "dev", "flannel.1"]);
    assert!(!fdb.contains("dst 192.168.100.12"), "{fdb}");
    // doctor knows a directly routed peer has no neighbour or FDB entry.
    let (code, report) = c.doctor(0, &[]);
    assert_eq!(code, 0, "{report}");
}

#[test]
fn deleted_device_is_recreated_with_all_entries() {
    let mut c = Cluster::new(2);
    c.put_config(None, &vxlan_config(""));
    c.start_all(&[]);
    c.add_pod(0);
    c.add_pod(1);
    c.wait_full_mesh(T);
    let mac_before = c.hosts[0].ns.ip(&["link", "show", "flannel.1"]);
    c.hosts[0].ns.ip(&["link", "del", "flannel.1"]);
    c.flanneld(0).wait_log("remote entries replayed", T);
    c.wait_full_mesh(T);
    let mac_after = c.hosts[0].ns.ip(&["link", "show", "flannel.1"]);
    let mac = |s: &str| s.split("link/ether ").nth(1).unwrap()[..17].to_string();
    assert_eq!(mac(&mac_before), mac(&mac_after), "VtepMAC must not change");
}

#[test]
fn stale_entries_of_peers_gone_while_down_are_removed_at_start() {
    let mut c = Cluster::new(3);
    c.put_config(None, &vxlan_config(""));
    c.start_all(&[]);
    c.add_pod(0);
    c.add_pod(2);
    c.wait_full_mesh(T);
    let h3_subnet = c.subnet(2).to_string();
    // h1's flanneld is down while h3 leaves.
    c.hosts[0].flanneld.as_mut().unwrap().kill();
    c.hosts[2].flanneld.as_mut().unwrap().kill();
    c.etcd.del(&c.lease_key(2));
    assert!(c.hosts[0]
        .ns
        .ip(&["route", "show", "dev", "flannel.1"])
        .contains(&h3_subnet));
    c.start_flanneld(0, &[]);
    let ns = &c.hosts[0].ns;
    wait_for(T, "stale route to be removed", || {
        (!ns.ip(&["route", "show", "dev", "flannel.1"])
            .contains(&h3_subnet))
        .then_some(())
    });
    let gw = h3_subnet.trim_end_matches("/24");
    assert!(!ns.ip(&["neigh", "show", "dev", "flannel.1"]).contains(gw));
    // And the remaining peer is still reachable.
    assert!(ns
        .ip(&["route", "show", "dev", "flannel.1"])
        .contains(&c.subnet(1).to_string()));
}

#[test]
fn malformed_peer_lease_is_skipped_and_others_keep_working() {
    let mut c = Cluster::new(2);
    // Our hosts lease below 10.5.200.0; the broken leases sit above.
    c.put_config(
        None,
        r#"{"Network":"10.5.0.0/16","SubnetMax":"10.5.200.0","Backend":{"Type":"vxlan"}}"#,
    );
    c.start_all(&[]);
    c.add_pod(0);
    c.add_pod(1);
    c.wait_full_mesh(T);
    // Someone writes vxlan leases with broken BackendData and a foreign backend type.
    c.etcd.put(
        &format!("{}/subnets/10.5.250.0-24", testbed::fixture::PREFIX),
        r#"{"PublicIP":"192.168.100.99","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"zz"}}"#,
    );
    c.etcd.put(
        &format!("{}/subnets/10.5.251.0-24", testbed::fixture::PREFIX),
        r#"{"PublicIP":"192.168.100.98","PublicIPv6":null,"BackendType":"host-gw"}"#,
    );
    c.flanneld(0)
        .wait_log("ignoring subnet 10.5.250.0-24 with bad BackendData", T);
    c.flanneld(0)
        .wait_log("ignoring non-vxlan subnet 10.5.251.0-24", T);
    assert!(c.flanneld(0).try_status().is_none());
    assert!(!c.hosts[0].ns.ip(&["route"]).contains("10.5.250.0"));
    c.wait_full_mesh(T);
}
