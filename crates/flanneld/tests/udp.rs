//! udp backend end to end across namespace hosts, on both data paths: the kernel (BPF) one,
//! the default where the kernel allows it, and the TUN + user-space engine: the wire
//! format, Go-style datagrams received, TTL and ICMP behaviour, lease changes, and restarts
//! that keep TCP flows alive.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::process::Stdio;
use std::time::Duration;

use testbed::{wait_for, Cluster};

const T: Duration = Duration::from_secs(30);
const SEED: &str = r#"{"Network":"10.0.0.0/8","SubnetLen":20,"SubnetMin":"10.10.0.0","SubnetMax":"10.99.0.0","Backend":{"Type":"udp","Port":7890}}"#;

/// `n` hosts with the default data path (the kernel one, where BPF is available as here).
fn udp_cluster(n: usize) -> Cluster {
    udp_cluster_env(n, &[])
}

/// `n` hosts with the TUN + user-space engine.
fn tun_cluster(n: usize) -> Cluster {
    udp_cluster_env(n, &TUN)
}

const TUN: [(&str, &str); 1] = [("FLANNEL_UDP_DATAPATH", "offload")];
const KERNEL: [(&str, &str); 1] = [("FLANNEL_UDP_DATAPATH", "kernel")];

fn udp_cluster_env(n: usize, env: &[(&str, &str)]) -> Cluster {
    let mut c = Cluster::new(n);
    c.put_config(None, SEED);
    // As deployed: flanneld masquerades, so the bridge does not (pod sources stay visible).
    for h in 0..n {
        c.start_flanneld_env(h, &["--ip-masq"], env);
    }
    c
}

/// Captures one packet with tcpdump in `ns` on `dev` matching `filter`, as raw bytes (from the
/// link layer for eth0, from IP for flannel0). `trigger` runs once tcpdump listens.
fn capture(ns: &testbed::NetNs, dev: &str, filter: &str, trigger: impl FnOnce()) -> Vec<u8> {
    let child = ns
        .command("tcpdump")
        .args(["-i", dev, "-n", "-c", "1", "-x", "-l", "-Q", "in", filter])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("tcpdump (apt-get install tcpdump)");
    std::thread::sleep(Duration::from_millis(700));
    trigger();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let mut bytes = vec![];
    for line in text.lines().filter(|l| l.trim_start().starts_with("0x")) {
        for word in line.split(':').nth(1).unwrap_or("").split_whitespace() {
            for i in (0..word.len()).step_by(2) {
                bytes.push(u8::from_str_radix(&word[i..i + 2], 16).unwrap());
            }
        }
    }
    bytes
}

#[test]
fn seed_config_three_hosts_ping_and_tcp() {
    let mut c = udp_cluster(2);
    for h in 0..2 {
        c.add_pod(h);
    }
    c.wait_full_mesh(T);
    // Lease: PublicIP only (Go writes no BackendType for udp).
    assert_eq!(
        c.etcd.get(&c.lease_key(0)).unwrap(),
        r#"{"PublicIP":"192.168.100.11","PublicIPv6":null}"#
    );
    assert_eq!(c.subnet(0).prefix_len(), 20);
    let ns = c.hosts[0].ns.clone();
    let link = ns.ip(&["link", "show", "flannel0"]);
    assert!(link.contains("mtu 1472"), "{link}");
    assert_eq!(c.env_var(0, "FLANNEL_MTU"), "1472");
    assert!(ns.ip(&["route"]).contains("10.0.0.0/8 dev flannel0"));
    assert!(ns
        .ip(&["addr", "show", "flannel0"])
        .contains(&format!("{}/32", c.subnet(0).network())));
    // A third host joins later: the running data paths learn its route.
    let h3 = c.add_host();
    c.start_flanneld(h3, &["--ip-masq"]);
    c.add_pod(h3);
    c.wait_full_mesh(T);
    // TCP across hosts.
    let server = c.pods[2]
        .ns
        .command("iperf3")
        .args(["-s", "-1"])
        .stdout(Stdio::null())
        .spawn();
    let mut server = server.unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let ip = c.pods[2].ip.to_string();
    let out = c.pods[0].ns.exec("iperf3", &["-c", &ip, "-t", "1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let _ = server.wait();
}

#[test]
fn wire_format_is_the_raw_ipv4_packet_in_udp() {
    let mut c = tun_cluster(2);
    let a = c.add_pod(0);
    let b = c.add_pod(1);
    c.wait_full_mesh(T);
    // TTL 64 from the pod, -1 by the host's forwarding, -1 by our sender (as Go's proxy).
    assert_wire_format(&c, a, b, 62);
}

/// Pings pod `b` from pod `a` and checks the datagram host 2 receives: UDP 7890 -> 7890
/// between the hosts' addresses, its length, and the bare IPv4 packet as payload with
/// `inner_ttl`.
fn assert_wire_format(c: &Cluster, a: usize, b: usize, inner_ttl: u8) {
    let (pa, pb) = (c.pods[a].ip, c.pods[b].ip);
    let frame = capture(&c.hosts[1].ns, "eth0", "udp dst port 7890", || {
        c.ping(a, pb);
    });
    // tcpdump -x starts at the IP header: IPv4 (20) + UDP (8) + inner IPv4.
    assert!(frame.len() > 28 + 20, "{frame:?}");
    assert_eq!(frame[9], 17, "outer packet is UDP");
    assert_eq!(&frame[12..16], &c.hosts[0].ip.octets());
    assert_eq!(&frame[16..20], &c.hosts[1].ip.octets());
    let udp = &frame[20..];
    assert_eq!(
        u16::from_be_bytes([udp[0], udp[1]]),
        7890,
        "sent from the udp port"
    );
    assert_eq!(u16::from_be_bytes([udp[2], udp[3]]), 7890);
    assert_eq!(
        u16::from_be_bytes([udp[4], udp[5]]) as usize,
        udp.len(),
        "UDP length"
    );
    let inner = &udp[8..];
    assert_eq!(inner[0], 0x45, "payload is a bare IPv4 header");
    assert_eq!(inner[9], 1, "ICMP");
    assert_eq!(&inner[12..16], &pa.octets());
    assert_eq!(&inner[16..20], &pb.octets());
    assert_eq!(inner[8], inner_ttl);
}

fn echo_request(src: Ipv4Addr, dst: Ipv4Addr, ttl: u8) -> Vec<u8> {
    let mut p = vec![0u8; 28];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&28u16.to_be_bytes());
    p[8] = ttl;
    p[9] = 1;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    let csum = |d: &[u8]| {
        let mut s: u32 = d
            .chunks(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]) as u32)
            .sum();
        while s >> 16 != 0 {
            s = (s & 0xffff) + (s >> 16);
        }
        !(s as u16)
    };
    let h = csum(&p[..20]);
    p[10..12].copy_from_slice(&h.to_be_bytes());
    p[20] = 8; // echo request
    p[24..26].copy_from_slice(&0x4242u16.to_be_bytes());
    let i = csum(&p[20..]);
    p[22..24].copy_from_slice(&i.to_be_bytes());
    p
}

#[test]
fn hand_made_datagram_comes_out_of_flannel0_with_ttl_decremented() {
    let mut c = tun_cluster(2);
    let a = c.add_pod(0);
    c.add_pod(1);
    c.wait_full_mesh(T);
    let pod = c.pods[a].ip;
    let src = Ipv4Addr::from(u32::from(c.subnet(1).network()) + 77);
    let h1 = c.hosts[0].ns.clone();
    let h2 = c.hosts[1].ns.clone();
    let to = SocketAddrV4::new(c.hosts[0].ip, 7890);
    let pkt = capture(
        &h1,
        "flannel0",
        "icmp and net 10.0.0.0/8 and icmp[4:2] == 0x4242",
        || {
            h2.udp_send(to, &echo_request(src, pod, 10));
        },
    );
    assert!(pkt.len() >= 28, "nothing came out of flannel0");
    assert_eq!(&pkt[12..16], &src.octets());
    assert_eq!(&pkt[16..20], &pod.octets());
    assert_eq!(pkt[8], 9, "TTL decremented on receive");
    // TTL 1 is dropped: only the TTL-5 probe sent right after comes out.
    let pkt = capture(&h1, "flannel0", "icmp and icmp[4:2] == 0x4242", || {
        h2.udp_send(to, &echo_request(src, pod, 1));
        std::thread::sleep(Duration::from_millis(200));
        h2.udp_send(to, &echo_request(src, pod, 5));
    });
    assert_eq!(pkt[8], 4, "the TTL-1 datagram must have been dropped");
}

#[test]
fn destination_without_lease_gets_icmp_net_unreachable() {
    let mut c = udp_cluster(1);
    let a = c.add_pod(0);
    // 10.200.0.9 is inside 10.0.0.0/8 but nobody holds a lease for it. A TCP connect gets the
    // ICMP net-unreachable reply at once (a ping would get none: ICMP is never answered with
    // ICMP, as in the reference).
    let start = std::time::Instant::now();
    let out = c.pods[a].ns.exec(
        "timeout",
        &["5", "bash", "-c", "exec 3<>/dev/tcp/10.200.0.9/80"],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Network is unreachable"), "{err}");
    assert!(
        start.elapsed() < Duration::from_secs(4),
        "no ICMP reply, the connect timed out"
    );
    // And ICMP itself gets no reply.
    let out = c.pods[a]
        .ns
        .exec("ping", &["-c", "1", "-W", "1", "10.200.0.9"]);
    assert!(!String::from_utf8_lossy(&out.stdout).contains("Unreachable"));
}

#[test]
fn tcp_flow_survives_sigkill_restart_of_both_daemons() {
    let mut c = udp_cluster(2);
    let a = c.add_pod(0);
    let b = c.add_pod(1);
    c.wait_full_mesh(T);
    let mut server = c.pods[b]
        .ns
        .command("iperf3")
        .args(["-s", "-1"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let ip = c.pods[b].ip.to_string();
    let client = c.pods[a]
        .ns
        .command("iperf3")
        .args(["-c", &ip, "-t", "6", "-b", "200M"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    for h in 0..2 {
        c.hosts[h].flanneld.as_mut().unwrap().kill();
    }
    // The device outlives the daemon.
    assert!(c.hosts[0]
        .ns
        .exec("ip", &["link", "show", "flannel0"])
        .status
        .success());
    for h in 0..2 {
        c.start_flanneld(h, &["--ip-masq"]);
    }
    let out = client.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "TCP flow broke during the restart:\n{text}"
    );
    assert!(text.contains("receiver"), "{text}");
    let _ = server.wait();
    wait_for(T, "mesh after restart", || {
        c.ping(a, c.pods[b].ip).then_some(())
    });
}

#[test]
fn switching_away_from_udp_removes_the_persistent_device() {
    let mut c = udp_cluster_env(1, &KERNEL);
    let ns = c.hosts[0].ns.clone();
    // A remote lease, so that the kernel path has a route to leave behind.
    c.etcd.put(
        &format!("{}/subnets/10.50.0.0-20", testbed::fixture::PREFIX),
        r#"{"PublicIP":"192.168.100.50","PublicIPv6":null}"#,
    );
    wait_for(T, "kernel-path route", || {
        ns.ip(&["route"])
            .contains("10.50.0.0/20 via 10.50.0.0 dev flannel-udprx onlink")
            .then_some(())
    });
    c.hosts[0].flanneld.as_mut().unwrap().kill();
    assert!(ns
        .exec("ip", &["link", "show", "flannel0"])
        .status
        .success());
    for k in c
        .etcd
        .keys(&format!("{}/subnets/", testbed::fixture::PREFIX))
    {
        c.etcd.del(&k);
    }
    c.put_config(
        None,
        r#"{"Network":"10.0.0.0/8","Backend":{"Type":"vxlan"}}"#,
    );
    c.start_flanneld(0, &[]);
    assert!(!ns
        .exec("ip", &["link", "show", "flannel0"])
        .status
        .success());
    let routes = ns.ip(&["route"]);
    assert!(!routes.contains("dev flannel0"), "{routes}");
    assert!(!routes.contains("flannel-udprx"), "{routes}");
    assert!(!ns
        .exec("ip", &["link", "show", "flannel-udprx"])
        .status
        .success());
}

#[test]
fn cpu_steering_attaches_and_forwards() {
    let mut c = Cluster::new(2);
    c.put_config(None, SEED);
    for h in 0..2 {
        c.start_flanneld_env(h, &["--ip-masq"], &[("FLANNEL_UDP_CPU_STEERING", "1")]);
    }
    c.add_pod(0);
    c.add_pod(1);
    c.wait_full_mesh(T);
    let queues = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let expected = queues > 1 && flanneld::backend::udp::steer::contiguous_cpus() == Some(queues);
    let log = c.flanneld(0).log();
    assert!(
        log.contains(&format!("CPU steering {expected}")),
        "steering state not as expected ({expected}):\n{log}"
    );
}

#[test]
fn kernel_path_speaks_the_same_wire_format_and_receives_go_style_datagrams() {
    let mut c = udp_cluster_env(2, &KERNEL);
    let a = c.add_pod(0);
    let b = c.add_pod(1);
    c.wait_full_mesh(T);
    let log = c.flanneld(0).log();
    assert!(log.contains("udp: kernel data path"), "{log}");
    // Each remote subnet is routed through flannel-udprx to a neighbour entry whose MAC
    // carries the remote host's address (02:66:c0:a8:64:0c = 192.168.100.12).
    let h1 = c.hosts[0].ns.clone();
    let h2 = c.hosts[1].ns.clone();
    let gw = c.subnet(1).network();
    let routes = h1.ip(&["route"]);
    assert!(
        routes.contains(&format!(
            "{} via {gw} dev flannel-udprx onlink",
            c.subnet(1)
        )),
        "{routes}"
    );
    let neigh = h1.ip(&["neigh", "show", "dev", "flannel-udprx"]);
    assert!(
        neigh.contains(&format!("{gw} lladdr 02:66:c0:a8:64:0c PERMANENT")),
        "{neigh}"
    );
    // flanneld doctor checks the kernel path too: it agrees, then names a missing neighbour
    // entry with the command that restores it.
    let (code, text) = c.doctor(0, &["--ip-masq"]);
    assert_eq!(code, 0, "{text}");
    let gw_s = gw.to_string();
    h1.ip(&["neigh", "del", &gw_s, "dev", "flannel-udprx"]);
    let (code, text) = c.doctor(0, &["--ip-masq"]);
    assert_eq!(code, 1, "{text}");
    let fix =
        format!("ip neigh replace {gw} lladdr 02:66:c0:a8:64:0c dev flannel-udprx nud permanent");
    assert!(
        text.contains("neighbour-missing") && text.contains(&fix),
        "{text}"
    );
    let args: Vec<&str> = fix.split(' ').skip(1).collect();
    h1.ip(&args);
    let (code, text) = c.doctor(0, &["--ip-masq"]);
    assert_eq!(code, 0, "{text}");
    // On the wire: exactly what the TUN engine and Go send (UDP 7890 -> 7890, the bare IPv4
    // packet as payload); TTL 64 from the pod, -1 by the host's forwarding (the kernel path
    // routes like a router; Go's proxy takes one more).
    assert_wire_format(&c, a, b, 63);
    let (pa, pb) = (c.pods[a].ip, c.pods[b].ip);
    // A datagram as Go flannel sends it (from a UDP socket, with a UDP checksum) is
    // decapsulated in the kernel and reaches the pod, TTL decremented by the forwarding.
    let src = Ipv4Addr::from(u32::from(c.subnet(1).network()) + 77);
    let to = SocketAddrV4::new(c.hosts[0].ip, 7890);
    let pkt = capture(
        &c.pods[a].ns,
        "eth0",
        "icmp and icmp[4:2] == 0x4242",
        || {
            h2.udp_send(to, &echo_request(src, pa, 10));
        },
    );
    assert!(
        pkt.len() >= 28,
        "the Go-style datagram did not reach the pod"
    );
    assert_eq!(&pkt[12..16], &src.octets());
    assert_eq!(pkt[8], 9);
    // A TCP transfer crosses in both directions (super-packets are segmented on the way).
    for (from, to) in [(a, pb), (b, pa)] {
        let server_ns = if from == a {
            &c.pods[b].ns
        } else {
            &c.pods[a].ns
        };
        let mut server = server_ns
            .command("iperf3")
            .args(["-s", "-1"])
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let out = wait_for(T, "iperf3 server up", || {
            let out = c.pods[from].ns.exec(
                "iperf3",
                &[
                    "-c",
                    &to.to_string(),
                    "-n",
                    "20M",
                    "--connect-timeout",
                    "500",
                ],
            );
            out.status.success().then_some(out)
        });
        assert!(String::from_utf8_lossy(&out.stdout).contains("receiver"));
        let _ = server.wait();
    }
    // The programs are tc filters, not tied to the process: a SIGKILL + restart of both
    // daemons under a 200 pings/s flow loses nothing (a restart replaces them atomically).
    let ping = c.pods[a]
        .ns
        .command("ping")
        .args(["-i", "0.005", "-c", "600", "-W", "1", &pb.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    for h in 0..2 {
        c.flanneld(h).kill();
    }
    for h in 0..2 {
        c.start_flanneld_env(h, &["--ip-masq"], &KERNEL);
    }
    let out = ping.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let summary = text
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .unwrap_or_default();
    assert!(
        summary.starts_with("600 packets transmitted, 600 received"),
        "{text}"
    );
    // A peer that leaves while flanneld is down loses its route at the next start.
    c.flanneld(0).kill();
    let peer_key = c.lease_key(1);
    c.flanneld(1).kill();
    c.etcd.del(&peer_key);
    c.start_flanneld_env(0, &["--ip-masq"], &KERNEL);
    wait_for(T, "stale kernel-path route removed", || {
        (!h1.ip(&["route"]).contains("dev flannel-udprx")).then_some(())
    });
    assert!(!h1
        .ip(&["neigh", "show", "dev", "flannel-udprx"])
        .contains("02:66:"));
}

#[test]
fn kernel_path_without_ip_masq_reaches_pods() {
    // Without --ip-masq the CNI bridge masquerades pod traffic leaving the subnet; the
    // source address comes from the kernel path's receive device (as it does from flannel0).
    let mut c = Cluster::new(2);
    c.put_config(None, SEED);
    for h in 0..2 {
        c.start_flanneld_env(h, &[], &KERNEL);
        c.add_pod(h);
    }
    c.wait_full_mesh(T);
    assert!(c.flanneld(0).log().contains("udp: kernel data path"));
}
