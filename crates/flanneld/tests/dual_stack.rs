//! Dual-stack networks end to end: IPv6 leases, subnet.env, the `flannel-v6.<VNI>` vxlan device
//! and host-gw IPv6 routes, with pods reaching each other over IPv4 and IPv6.

use std::time::Duration;

use testbed::Cluster;

const T: Duration = Duration::from_secs(30);

fn config(backend: &str) -> String {
    format!(
        r#"{{"Network":"10.5.0.0/16","EnableIPv6":true,"IPv6Network":"fc00:5::/48","Backend":{{"Type":"{backend}"}}}}"#
    )
}

fn dual_cluster(backend: &str) -> Cluster {
    let mut c = Cluster::new(2);
    c.put_config(None, &config(backend));
    c.start_all(&["--ip-masq"]);
    c.add_pod(0);
    c.add_pod(1);
    c
}

#[test]
fn vxlan_dual_stack_pods_reach_each_other_over_v4_and_v6() {
    let c = dual_cluster("vxlan");
    c.wait_full_mesh(T);
    let p2v6 = c.pods[1].ip6.expect("pod has an IPv6 address");
    let p1v6 = c.pods[0].ip6.unwrap();
    c.wait_ping6(0, p2v6, T);
    c.wait_ping6(1, p1v6, T);
    // subnet.env carries both families in the reference order.
    let env = std::fs::read_to_string(&c.hosts[0].subnet_file).unwrap();
    let keys: Vec<&str> = env.lines().map(|l| l.split('=').next().unwrap()).collect();
    assert_eq!(
        keys,
        vec![
            "FLANNEL_NETWORK",
            "FLANNEL_SUBNET",
            "FLANNEL_IPV6_NETWORK",
            "FLANNEL_IPV6_SUBNET",
            "FLANNEL_MTU",
            "FLANNEL_IPMASQ"
        ]
    );
    assert!(env.contains("FLANNEL_IPV6_NETWORK=fc00:5::/48\n"));
    // The lease: v6 key part, PublicIPv6, BackendV6Data with the v6 device's MAC.
    let lease = c.lease(1);
    assert_eq!(lease["PublicIPv6"], "fd00:100::12");
    assert_eq!(lease["BackendV6Data"]["VNI"], 1);
    let ns = c.hosts[0].ns.clone();
    let link = ns.ip(&["-d", "link", "show", "flannel-v6.1"]);
    assert!(
        link.contains("vxlan id 1 local fd00:100::11 dev eth0"),
        "{link}"
    );
    let v6_mac = lease["BackendV6Data"]["VtepMAC"].as_str().unwrap();
    let fdb = ns.run("bridge", &["fdb", "show", "dev", "flannel-v6.1"]);
    assert!(
        fdb.contains(&format!("{v6_mac} dst fd00:100::12 self permanent")),
        "{fdb}"
    );
    let h2v6: ipnet::Ipv6Net = c.env_var(1, "FLANNEL_IPV6_SUBNET").parse().unwrap();
    let routes = ns.ip(&["-6", "route", "show", "dev", "flannel-v6.1"]);
    let line = routes
        .lines()
        .find(|l| l.starts_with(&format!("{} via {} ", h2v6.trunc(), h2v6.network())))
        .unwrap_or_else(|| panic!("no route to h2's v6 subnet: {routes}"));
    assert!(line.contains("onlink"), "{line}");
}

#[test]
fn host_gw_dual_stack_installs_v6_routes() {
    let c = dual_cluster("host-gw");
    c.wait_full_mesh(T);
    c.wait_ping6(0, c.pods[1].ip6.unwrap(), T);
    let lease = c.lease(1);
    assert_eq!(
        lease.to_string(),
        r#"{"BackendType":"host-gw","PublicIP":"192.168.100.12","PublicIPv6":"fd00:100::12"}"#
    );
    let h2v6: ipnet::Ipv6Net = c.env_var(1, "FLANNEL_IPV6_SUBNET").parse().unwrap();
    let routes = c.hosts[0].ns.ip(&["-6", "route"]);
    assert!(
        routes.contains(&format!("{} via fd00:100::12 dev eth0", h2v6.trunc())),
        "{routes}"
    );
}

#[test]
fn dual_stack_lease_json_is_exact_for_alloc() {
    let mut c = Cluster::new(1);
    c.put_config(None, &config("alloc"));
    c.start_all(&[]);
    let key = c.lease_key(0);
    // Go's alloc backend advertises only the IPv4 address.
    assert_eq!(
        c.etcd.get(&key).unwrap(),
        r#"{"PublicIP":"192.168.100.11","PublicIPv6":null}"#
    );
    assert!(key.contains("&fc00:5:"), "{key}");
}
