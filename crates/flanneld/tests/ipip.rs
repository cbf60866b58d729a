//! ipip backend end to end, on a kernel that has ipip: each `*_in_uml` test boots a
//! user-mode-linux guest (testbed::uml) and runs its `guest_*` half there, with the iptables rules
//! mode (the guest kernel has no nf_tables for ip). The `guest_*` tests return at once elsewhere.

use std::time::Duration;

use testbed::{uml, wait_for, Cluster};

const T: Duration = Duration::from_secs(60);
const GUEST_TIMEOUT: Duration = Duration::from_secs(400);

fn ipip_config(extra: &str) -> String {
    format!(r#"{{"Network":"10.5.0.0/16","Backend":{{"Type":"ipip"{extra}}}}}"#)
}

testbed::uml_guest_tests!(GUEST_TIMEOUT;
    three_hosts_in_uml => "guest_three_hosts",
    direct_routing_in_uml => "guest_direct_routing",
    go_configured_host_interop_in_uml => "guest_go_configured_host_interop",
    restart_loses_no_ping_in_uml => "guest_restart_loses_no_ping",
    existing_devices_in_uml => "guest_existing_devices",
);

/// 3 hosts: all pod pairs reachable; device, MTU, address, routes and lease as Go flannel's; a
/// departed host's route removed.
#[test]
fn guest_three_hosts() {
    if !uml::in_guest() {
        return;
    }
    let mut c = Cluster::new(3);
    c.put_config(None, &ipip_config(""));
    c.start_all(&[]);
    for h in 0..3 {
        c.add_pod(h);
    }
    c.wait_full_mesh(T);

    let h1 = &c.hosts[0].ns;
    let link = h1.ip(&["-d", "link", "show", "flannel.ipip"]);
    assert!(
        link.contains("ipip remote any local 192.168.100.11"),
        "{link}"
    );
    assert!(link.contains("mtu 1480") && link.contains("UP"), "{link}");
    assert_eq!(c.env_var(0, "FLANNEL_MTU"), "1480");
    let own_addr = c.subnet(0).to_string().replace("/24", "/32");
    assert!(h1
        .ip(&["addr", "show", "flannel.ipip"])
        .contains(&format!("inet {own_addr} scope global flannel.ipip")));
    let h3_subnet = c.subnet(2).to_string();
    let routes = h1.ip(&["route", "show", "dev", "flannel.ipip"]);
    assert!(
        routes.contains(&format!("{h3_subnet} via 192.168.100.13 onlink")),
        "{routes}"
    );
    assert_eq!(
        c.etcd.get(&c.lease_key(2)).unwrap(),
        r#"{"PublicIP":"192.168.100.13","PublicIPv6":null,"BackendType":"ipip"}"#
    );

    // h3 leaves: its lease is deleted; h1 and h2 drop its route.
    c.hosts[2].flanneld.as_mut().unwrap().kill();
    c.etcd.del(&c.lease_key(2));
    for h in 0..2 {
        let ns = &c.hosts[h].ns;
        wait_for(T, "h3's route to disappear", || {
            (!ns.ip(&["route", "show"]).contains(&h3_subnet)).then_some(())
        });
    }
    assert!(c.ping(0, c.pods[1].ip));
}

/// DirectRouting: same-segment peers are routed over the underlay interface, not the tunnel.
#[test]
fn guest_direct_routing() {
    if !uml::in_guest() {
        return;
    }
    let mut c = Cluster::new(2);
    c.put_config(None, &ipip_config(r#","DirectRouting":true"#));
    c.start_all(&[]);
    c.add_pod(0);
    c.add_pod(1);
    c.wait_full_mesh(T);
    let h2_subnet = c.subnet(1).to_string();
    let routes = c.hosts[0].ns.ip(&["route", "show", &h2_subnet]);
    assert!(
        routes.contains("via 192.168.100.12 dev eth0 onlink"),
        "{routes}"
    );
    assert!(c.hosts[0]
        .ns
        .ip(&["route", "show", "dev", "flannel.ipip"])
        .is_empty());
}

/// A host configured by hand exactly as Go flannel's ipip backend configures it (device, address,
/// routes, lease JSON) and flanneld hosts reach each other's pods both ways.
#[test]
fn guest_go_configured_host_interop() {
    if !uml::in_guest() {
        return;
    }
    let mut c = Cluster::new(3);
    c.put_config(None, &ipip_config(""));
    c.start_flanneld(0, &[]);
    c.start_flanneld(1, &[]);
    c.add_pod(0);
    c.add_pod(1);

    // h3, "Go flannel": lease 10.5.77.0/24 in Go's JSON, flannel.ipip, routes, subnet.env.
    let go_subnet = "10.5.77.0/24";
    c.etcd.put(
        "/coreos.com/network/subnets/10.5.77.0-24",
        r#"{"PublicIP":"192.168.100.13","PublicIPv6":null,"BackendType":"ipip"}"#,
    );
    let h3 = &c.hosts[2].ns;
    h3.ip(&[
        "link",
        "add",
        "flannel.ipip",
        "type",
        "ipip",
        "local",
        "192.168.100.13",
    ]);
    h3.ip(&["link", "set", "flannel.ipip", "mtu", "1480"]);
    h3.ip(&["addr", "add", "10.5.77.0/32", "dev", "flannel.ipip"]);
    h3.ip(&["link", "set", "flannel.ipip", "up"]);
    for i in 0..2 {
        let s = c.subnet(i).to_string();
        let gw = c.hosts[i].ip.to_string();
        h3.ip(&[
            "route",
            "add",
            &s,
            "via",
            &gw,
            "dev",
            "flannel.ipip",
            "onlink",
        ]);
    }
    let env = c.dir.join("go-h3-subnet.env");
    std::fs::write(
        &env,
        "FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.5.77.1/24\nFLANNEL_MTU=1480\nFLANNEL_IPMASQ=false\n",
    )
    .unwrap();
    let go_pod = c.add_pod_on(2, &env, "cni0");
    let go_ip = c.pods[go_pod].ip;
    for p in 0..2 {
        c.wait_ping(p, go_ip, T);
        c.wait_ping(go_pod, c.pods[p].ip, T);
    }
    let routes = c.hosts[0].ns.ip(&["route", "show", go_subnet]);
    assert!(
        routes.contains("via 192.168.100.13 dev flannel.ipip onlink"),
        "{routes}"
    );
}

/// flanneld restarts on a host while a pod pings across at 5 pings/s: not one ping is lost.
#[test]
fn guest_restart_loses_no_ping() {
    if !uml::in_guest() {
        return;
    }
    let mut c = Cluster::new(2);
    c.put_config(None, &ipip_config(""));
    c.start_all(&[]);
    c.add_pod(0);
    c.add_pod(1);
    c.wait_full_mesh(T);
    let target = c.pods[1].ip.to_string();
    let mut ping = c.pods[0].ns.command("ping");
    ping.args(["-i", "0.2", &target])
        .stdout(std::process::Stdio::piped());
    let pinger = c.pods[0].ns.spawn(ping);
    c.flanneld(0).wait_log("Running backend", T);
    c.flanneld(0).stop();
    c.start_flanneld(0, &[]);
    c.flanneld(1).stop();
    c.start_flanneld(1, &[]);
    // Let a few pings cross the restarted pair, then stop ping (SIGINT: it prints its summary).
    std::thread::sleep(Duration::from_secs(2));
    // SAFETY: signalling our own child has no memory-safety preconditions.
    unsafe {
        libc::kill(pinger.id() as i32, libc::SIGINT);
    }
    let out = pinger.wait_with_output().expect("ping output");
    let text = String::from_utf8_lossy(&out.stdout);
    let sent: u32 = text
        .lines()
        .find_map(transmitted)
        .unwrap_or_else(|| panic!("no ping summary: {text}"));
    let answered: std::collections::BTreeSet<u32> = text
        .lines()
        .filter_map(|l| l.split("icmp_seq=").nth(1)?.split(' ').next()?.parse().ok())
        .collect();
    // Every ping sent up to the last second (the last few may still be in flight at SIGINT) was
    // answered, across both restarts.
    assert!(sent >= 10, "too few pings to judge: {text}");
    let lost: Vec<u32> = (1..=sent - 5).filter(|s| !answered.contains(s)).collect();
    assert!(lost.is_empty(), "lost pings {lost:?}\n{text}");
}

/// `N` of ping's `N packets transmitted, ...` summary line.
fn transmitted(line: &str) -> Option<u32> {
    line.split_once(" packets transmitted")?
        .0
        .trim()
        .parse()
        .ok()
}

/// An existing `flannel.ipip` of another kind is refused with the reference's error; one with a
/// wrong local address is recreated.
#[test]
fn guest_existing_devices() {
    if !uml::in_guest() {
        return;
    }
    let mut c = Cluster::new(1);
    c.put_config(None, &ipip_config(""));
    let h = c.hosts[0].ns.clone();
    h.ip(&["link", "add", "flannel.ipip", "type", "dummy"]);
    let mut f = testbed::Flanneld::start(
        &h,
        c.dir.path(),
        &[
            format!("--etcd-endpoints={}", c.etcd.url()),
            format!("--subnet-file={}", c.hosts[0].subnet_file.display()),
        ],
    );
    f.wait_log(
        "flannel.ipip isn't an ipip mode device, please remove device and try again",
        T,
    );
    f.kill();
    h.ip(&["link", "del", "flannel.ipip"]);
    h.ip(&[
        "link",
        "add",
        "flannel.ipip",
        "type",
        "ipip",
        "local",
        "192.168.100.99",
    ]);
    c.start_flanneld(0, &[]);
    let link = h.ip(&["-d", "link", "show", "flannel.ipip"]);
    assert!(
        link.contains("ipip remote any local 192.168.100.11"),
        "{link}"
    );
    c.flanneld(0)
        .wait_log("already exists with incompatible attributes", T);
}
