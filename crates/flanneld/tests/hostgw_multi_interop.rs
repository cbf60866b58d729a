//! host-gw end to end, the reference "multi" scenario (two networks per host), interop with a
//! host configured exactly as Go flannel configures it, and restarts that drop no packet.

use std::time::Duration;

use testbed::fixture::PREFIX;
use testbed::{wait_for, Cluster};

const T: Duration = Duration::from_secs(30);

#[test]
fn host_gw_three_hosts_with_route_recovery_and_removal() {
    let mut c = Cluster::new(3);
    c.put_config(
        None,
        r#"{"Network":"10.6.0.0/16","Backend":{"Type":"host-gw"}}"#,
    );
    c.start_all(&[]);
    for h in 0..3 {
        c.add_pod(h);
    }
    c.wait_full_mesh(T);
    let h2 = c.subnet(1).to_string();
    let ns = c.hosts[0].ns.clone();
    let route = format!("{h2} via 192.168.100.12 dev eth0");
    assert!(ns.ip(&["route"]).contains(&route));
    assert_eq!(c.env_var(0, "FLANNEL_MTU"), "1500");
    let lease = c
        .etcd
        .get(&format!("{PREFIX}/subnets/{}", h2.replace('/', "-")))
        .unwrap();
    assert_eq!(
        lease,
        r#"{"PublicIP":"192.168.100.12","PublicIPv6":null,"BackendType":"host-gw"}"#
    );
    // Someone deletes the route: it is recovered by the periodic check.
    ns.ip(&["route", "del", &h2]);
    c.flanneld(0)
        .wait_log("Route recovered", Duration::from_secs(25));
    assert!(ns.ip(&["route"]).contains(&route));
    // h2 leaves: the route goes away.
    c.hosts[1].flanneld.as_mut().unwrap().kill();
    c.etcd
        .del(&format!("{PREFIX}/subnets/{}", h2.replace('/', "-")));
    wait_for(T, "h2's route to be removed", || {
        (!ns.ip(&["route"]).contains(&h2)).then_some(())
    });
}

#[test]
fn host_gw_refuses_a_nated_public_ip() {
    let mut c = Cluster::new(1);
    c.put_config(
        None,
        r#"{"Network":"10.6.0.0/16","Backend":{"Type":"host-gw"}}"#,
    );
    let mut f = testbed::Flanneld::start(
        &c.hosts[0].ns,
        c.dir.path(),
        &[
            format!("--etcd-endpoints={}", c.etcd.url()),
            "--iface=eth0".into(),
            "--public-ip=203.0.113.9".into(),
            format!("--subnet-file={}", c.dir.join("x.env").display()),
        ],
    );
    assert_eq!(f.wait_exit(T).code(), Some(1));
    assert!(f.log().contains("your PublicIP differs from interface IP, meaning that probably you're on a NAT, which is not supported by host-gw backend"));
    c.hosts.clear();
}

#[test]
fn two_networks_per_host_each_reachable_only_through_its_own_path() {
    let mut c = Cluster::new(2);
    c.put_config(
        Some("/vxlan/network"),
        r#"{"Network": "10.11.0.0/16", "Backend": {"Type": "vxlan"}}"#,
    );
    c.put_config(
        Some("/hostgw/network"),
        r#"{"Network": "10.12.0.0/16", "Backend": {"Type": "host-gw"}}"#,
    );
    let url = format!("-etcd-endpoints={}", c.etcd.url());
    let mut daemons = vec![];
    let mut files = vec![];
    for h in 0..2 {
        for (net, prefix) in [("vxlan", "/vxlan/network"), ("hostgw", "/hostgw/network")] {
            let file = c.dir.join(&format!("h{h}-{net}.env"));
            let mut f = testbed::Flanneld::start(
                &c.hosts[h].ns,
                c.dir.path(),
                &[
                    "-subnet-file",
                    file.to_str().unwrap(),
                    &format!("-etcd-prefix={prefix}"),
                    &url,
                ],
            );
            f.wait_subnet_env(&file, T);
            daemons.push(f);
            files.push(file);
        }
    }
    // Host 1 gets one pod per network, on separate bridges; as in the reference test the
    // destinations are host 1's own FLANNEL_SUBNET addresses (the bridges' addresses).
    c.add_pod_on(0, &files[0], "cni-vx");
    c.add_pod_on(0, &files[1], "cni-gw");
    let addr = |f: &std::path::Path| {
        let text = std::fs::read_to_string(f).unwrap();
        let line = text
            .lines()
            .find(|l| l.starts_with("FLANNEL_SUBNET="))
            .unwrap();
        line["FLANNEL_SUBNET=".len()..]
            .split('/')
            .next()
            .unwrap()
            .to_string()
    };
    let vx_dest = addr(&files[0]);
    let gw_dest = addr(&files[1]);
    let h2 = c.hosts[1].ns.clone();
    let ping = |args: &[&str]| {
        let mut a = vec!["-c", "1", "-W", "1"];
        a.extend_from_slice(args);
        h2.exec("ping", &a).status.success()
    };
    wait_for(T, "vxlan network reachable from host 2", || {
        ping(&[&vx_dest]).then_some(())
    });
    wait_for(T, "host-gw network reachable from host 2", || {
        ping(&[&gw_dest]).then_some(())
    });
    assert!(
        !ping(&["-I", "flannel.1", &gw_dest]),
        "host-gw pod reached through vxlan"
    );
    assert!(
        !ping(&["-I", "eth0", &vx_dest]),
        "vxlan pod reached through the underlay"
    );
}

#[test]
fn interop_with_a_host_configured_like_go_flannel() {
    let mut c = Cluster::new(3);
    // Our hosts lease below 10.5.200.0; the hand-made Go host holds 10.5.250.0/24.
    c.put_config(
        None,
        r#"{"Network":"10.5.0.0/16","SubnetMax":"10.5.200.0","Backend":{"Type":"vxlan"}}"#,
    );
    c.start_flanneld(0, &[]);
    c.start_flanneld(1, &[]);
    let p1 = c.add_pod(0);
    let p2 = c.add_pod(1);
    // Host 3 is "Go flannel": device made with ip, lease in Go's exact JSON.
    let go = c.hosts[2].ns.clone();
    let go_mac = "0e:2a:01:02:03:04";
    testbed::golike::go_vxlan_device(&go, "192.168.100.13", go_mac, "10.5.250.0");
    c.etcd.put(
        &format!("{PREFIX}/subnets/10.5.250.0-24"),
        &format!(r#"{{"PublicIP":"192.168.100.13","PublicIPv6":null,"BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{go_mac}"}}}}"#),
    );
    // Go flannel's entries towards our two hosts, from their leases.
    for h in 0..2 {
        let subnet = c.subnet(h).to_string();
        let key = format!("{PREFIX}/subnets/{}", subnet.replace('/', "-"));
        let v: serde_json::Value = serde_json::from_str(&c.etcd.get(&key).unwrap()).unwrap();
        let mac = v["BackendData"]["VtepMAC"].as_str().unwrap();
        let public = v["PublicIP"].as_str().unwrap();
        testbed::golike::go_vxlan_peer(&go, &subnet, mac, public);
    }
    // Our pods reach the Go host's bridge address, and the Go host reaches our pods.
    c.wait_ping(p1, "10.5.250.1".parse().unwrap(), T);
    c.wait_ping(p2, "10.5.250.1".parse().unwrap(), T);
    for p in [p1, p2] {
        let ip = c.pods[p].ip.to_string();
        wait_for(T, "Go host to reach our pod", || {
            go.exec("ping", &["-c", "1", "-W", "1", "-I", "10.5.250.1", &ip])
                .status
                .success()
                .then_some(())
        });
    }
}

#[test]
fn sigkill_restart_of_both_hosts_drops_no_packet() {
    for backend in ["vxlan", "host-gw"] {
        let mut c = Cluster::new(2);
        c.put_config(
            None,
            &format!(r#"{{"Network":"10.7.0.0/16","Backend":{{"Type":"{backend}"}}}}"#),
        );
        c.start_all(&["--ip-masq"]);
        let a = c.add_pod(0);
        let b = c.add_pod(1);
        c.wait_full_mesh(T);
        // 400 pings at 10 ms intervals (~4 s) while both daemons are killed and restarted.
        let dest = c.pods[b].ip.to_string();
        let pinger = c.pods[a]
            .ns
            .command("ping")
            .args(["-i", "0.01", "-c", "400", "-W", "1", &dest])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(300));
        for h in 0..2 {
            c.hosts[h].flanneld.as_mut().unwrap().kill();
        }
        for h in 0..2 {
            c.start_flanneld(h, &["--ip-masq"]);
        }
        for h in 0..2 {
            c.flanneld(h).wait_log("Running backend", T);
        }
        let out = pinger.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let summary = text
            .lines()
            .find(|l| l.contains("packets transmitted"))
            .unwrap_or("")
            .to_string();
        eprintln!("{backend}: {summary}");
        assert!(
            summary.contains("400 packets transmitted, 400 received"),
            "{backend} lost packets during restart: {summary}"
        );
    }
}
