//! ipsec backend end to end, on a kernel that has ESP and XFRM: each `*_in_uml` test boots a
//! user-mode-linux guest (testbed::uml) and runs its `guest_*` half there, with the iptables rules
//! mode (the guest kernel has no nf_tables for ip). The `guest_*` tests return at once elsewhere.
//!
//! Every flanneld runs with its own mount namespace and a private /run (as on a real host), so
//! the charon it starts has its own pid file and `/var/run/charon.vici`; `swanctl` reaches it
//! with nsenter. The underlay is watched with tcpdump on the bridge ports (what is really on the
//! wire: a capture on a host's eth0 also shows decrypted inbound packets).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use testbed::{uml, wait_for, Cluster, NetNs};

const T: Duration = Duration::from_secs(60);
const GUEST_TIMEOUT: Duration = Duration::from_secs(400);

fn ipsec_config(extra: &str) -> String {
    // 100 characters: the reference wants at least 96.
    let psk = "flannel-rs-test-psk-".repeat(5);
    format!(r#"{{"Network":"10.5.0.0/16","Backend":{{"Type":"ipsec","PSK":"{psk}"{extra}}}}}"#)
}

testbed::uml_guest_tests!(GUEST_TIMEOUT;
    three_hosts_in_uml => "guest_three_hosts",
    udp_encap_in_uml => "guest_udp_encap",
    go_configured_host_interop_in_uml => "guest_go_configured_host_interop",
    running_charon_in_uml => "guest_running_charon",
    charon_restart_in_uml => "guest_charon_restart",
);

/// A PSK shorter than 96 characters: the reference's error, exit 1, before charon or the kernel
/// are touched (so no guest needed).
#[test]
fn short_psk_is_refused() {
    let c = Cluster::new(1);
    c.put_config(
        None,
        r#"{"Network":"10.5.0.0/16","Backend":{"Type":"ipsec","PSK":"too-short"}}"#,
    );
    let mut f = testbed::Flanneld::start(
        &c.hosts[0].ns,
        c.dir.path(),
        &[
            format!("--etcd-endpoints={}", c.etcd.url()),
            format!("--subnet-file={}", c.hosts[0].subnet_file.display()),
        ],
    );
    let st = f.wait_exit(T);
    assert_eq!(st.code(), Some(1), "{}", f.log());
    assert!(
        f.log()
            .contains("Error registering network: config error, password is too short"),
        "{}",
        f.log()
    );
    assert!(!f.log().contains("Charon daemon started"), "{}", f.log());
}

/// Starts flanneld on host `h` in its own mount namespace (private /run for charon), with
/// `--ip-masq` as clusters run it: pod-to-pod traffic must keep its pod source address to match
/// the policies (the CNI bridge's own masquerade would hide it behind the host's address).
fn start(c: &mut Cluster, h: usize) {
    c.start_flanneld_env(h, &["--ip-masq"], &[("TESTBED_PRIVATE_RUN", "1")]);
}

fn cluster(n: usize, extra: &str) -> Cluster {
    let mut c = Cluster::new(n);
    c.put_config(None, &ipsec_config(extra));
    for h in 0..n {
        start(&mut c, h);
    }
    for h in 0..n {
        c.add_pod(h);
    }
    c
}

/// `swanctl <args>` against host `h`'s charon (in its flanneld's mount namespace).
fn swanctl(c: &mut Cluster, h: usize, args: &[&str]) -> String {
    let pid = c.flanneld(h).pid().expect("flanneld pid").to_string();
    let out = Command::new("nsenter")
        // --root: the target's root (in the guest that is a chroot, not the namespace's root).
        .args(["-t", &pid, "-m", "-n", "--root", "--wd", "swanctl"])
        .args(args)
        .output()
        .expect("nsenter swanctl");
    assert!(
        out.status.success(),
        "swanctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The reqid-11 policies in `ns`, one line each (`ip xfrm policy` joined, without `ptype main`).
fn reqid11_policies(ns: &NetNs) -> Vec<String> {
    let text = ns.ip(&["xfrm", "policy"]);
    let mut out = vec![];
    let mut cur = String::new();
    for line in text.lines() {
        if line.starts_with("src ") {
            if cur.contains("reqid 11 ") {
                out.push(cur.clone());
            }
            cur.clear();
        }
        cur.push_str(line.trim());
        cur.push(' ');
    }
    if cur.contains("reqid 11 ") {
        out.push(cur);
    }
    out.iter().map(|p| p.replace("ptype main ", "")).collect()
}

/// tcpdump on an interface of a namespace, started and ready (it said "listening on"), its
/// lines (one per packet) collected as they come.
struct Capture {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Capture {
    fn start(ns: &NetNs, dev: &str, filter: &str) -> Capture {
        let mut child = ns
            .command("tcpdump")
            .args([
                "-Z",
                "root",
                "-i",
                dev,
                "-n",
                "-l",
                "--immediate-mode",
                filter,
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("tcpdump");
        let stderr = child.stderr.take().expect("tcpdump stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("listening on") {
                    let _ = tx.send(());
                }
            }
        });
        let lines = Arc::new(Mutex::new(vec![]));
        let stdout = child.stdout.take().expect("tcpdump stdout");
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        let cap = Capture { child, lines };
        if rx.recv_timeout(Duration::from_secs(20)).is_err() {
            panic!("tcpdump on {dev} did not start listening");
        }
        cap
    }

    /// Waits (up to 10 s) until `enough` holds for the lines so far, then stops the capture
    /// and returns every line.
    fn stop_when(mut self, enough: impl Fn(&[String]) -> bool) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline && !enough(&self.lines.lock().unwrap()) {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let lines = self.lines.lock().unwrap().clone();
        lines
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Pings every pod pair across hosts (each must answer) while capturing on host 0's underlay
/// bridge port; returns the captured lines once at least two lines matching `carrier` (request
/// and reply) per ping across that port were seen.
fn ping_all_capturing(c: &Cluster, carrier: &str) -> Vec<String> {
    let cap = Capture::start(&c.underlay, "veth-h1", "icmp or esp or udp port 4500");
    let mut crossing = 0;
    for a in 0..c.pods.len() {
        for b in 0..c.pods.len() {
            if c.pods[a].host != c.pods[b].host {
                assert!(c.ping(a, c.pods[b].ip), "{} -> {}", a, c.pods[b].ip);
                crossing += usize::from(c.pods[a].host == 0 || c.pods[b].host == 0);
            }
        }
    }
    let lines = cap.stop_when(|l| l.iter().filter(|l| l.contains(carrier)).count() >= 2 * crossing);
    let seen = lines.iter().filter(|l| l.contains(carrier)).count();
    assert!(
        seen >= 2 * crossing,
        "{crossing} pings crossed h1's port, only {seen} packets with {carrier:?}: {lines:#?}"
    );
    lines
}

/// 3 hosts: all pod pairs reachable; on the wire only ESP, never the pods' ICMP; lease, MTU,
/// policies and charon connections as Go flannel's; a departed host's policies and connection
/// removed.
#[test]
fn guest_three_hosts() {
    if !uml::in_guest() {
        return;
    }
    let mut c = cluster(3, "");
    c.wait_full_mesh(T);

    // Each ping across h1's port: request and reply, both as ESP.
    let lines = ping_all_capturing(&c, ": ESP(");
    let icmp: Vec<&String> = lines.iter().filter(|l| l.contains("ICMP")).collect();
    assert!(icmp.is_empty(), "plain ICMP on the underlay: {icmp:#?}");

    assert_eq!(
        c.etcd.get(&c.lease_key(2)).unwrap(),
        r#"{"PublicIP":"192.168.100.13","PublicIPv6":null,"BackendType":"ipsec"}"#
    );
    assert_eq!(c.env_var(0, "FLANNEL_MTU"), "1423");

    let (s1, s2, s3) = (c.subnet(0), c.subnet(1), c.subnet(2));
    let h1 = c.hosts[0].ns.clone();
    let pol = reqid11_policies(&h1);
    assert_eq!(pol.len(), 6, "{pol:#?}");
    for (s, ip) in [(s2, "192.168.100.12"), (s3, "192.168.100.13")] {
        let out = format!(
            "src {s1} dst {s} dir out priority 0 tmpl src 192.168.100.11 dst {ip} proto esp reqid 11 mode tunnel"
        );
        assert!(pol.iter().any(|p| p.contains(&out)), "{out}\n{pol:#?}");
        for dir in ["in", "fwd"] {
            let want = format!(
                "src {s} dst {s1} dir {dir} priority 0 tmpl src {ip} dst 192.168.100.11 proto esp reqid 11 mode tunnel"
            );
            assert!(pol.iter().any(|p| p.contains(&want)), "{want}\n{pol:#?}");
        }
    }
    // charon routes nothing itself (policies = no): table 220 stays empty.
    let t220 = h1.exec("ip", &["route", "show", "table", "220"]);
    assert_eq!(String::from_utf8_lossy(&t220.stdout).trim(), "");
    let conns = swanctl(&mut c, 0, &["--list-conns"]);
    let h3_conn = format!("192.168.100.11-{s1}-{s3}-192.168.100.13");
    assert!(conns.contains(&format!("{h3_conn}: ")), "{conns}");
    assert!(
        conns.contains(&format!("{s1}-{s3}: TUNNEL")),
        "child SA name: {conns}"
    );
    let sas = swanctl(&mut c, 0, &["--list-sas"]);
    assert!(
        sas.contains(&format!("{h3_conn}: #")) && sas.contains("ESTABLISHED, IKEv2"),
        "{sas}"
    );

    // h3 leaves: its lease is deleted; h1 and h2 drop its policies and connection.
    c.hosts[2].flanneld.as_mut().unwrap().kill();
    c.etcd.del(&c.lease_key(2));
    for h in 0..2 {
        let ns = c.hosts[h].ns.clone();
        let s3 = s3.to_string();
        wait_for(T, "h3's policies to disappear", || {
            let p = reqid11_policies(&ns);
            (p.len() == 3 && !p.iter().any(|l| l.contains(&s3))).then_some(())
        });
    }
    let conns = swanctl(&mut c, 0, &["--list-conns"]);
    assert!(!conns.contains(&h3_conn), "{conns}");
    assert!(c.ping(0, c.pods[1].ip));
}

/// UDPEncap: ESP in UDP port 4500 on the wire (no bare ESP, no plain ICMP); MTU E − 85; charon
/// stopped with flanneld.
#[test]
fn guest_udp_encap() {
    if !uml::in_guest() {
        return;
    }
    let mut c = cluster(2, r#","UDPEncap":true"#);
    c.wait_full_mesh(T);
    assert_eq!(c.env_var(0, "FLANNEL_MTU"), "1415");
    let lines = ping_all_capturing(&c, "UDP-encap: ESP(");
    let bare_esp = lines
        .iter()
        .filter(|l| l.contains(": ESP(") && !l.contains("UDP-encap"))
        .count();
    let icmp = lines.iter().filter(|l| l.contains("ICMP")).count();
    assert_eq!((bare_esp, icmp), (0, 0), "{lines:#?}");

    // flanneld stopped (SIGTERM): it stops its charon too (as the reference), and exits 0.
    let pid = charon_pid(&mut c, 0);
    assert!(c.flanneld(0).stop().success());
    let proc_dir = format!("/proc/{pid}");
    wait_for(Duration::from_secs(10), "charon to be gone", || {
        (!std::path::Path::new(&proc_dir).exists()).then_some(())
    });
}

/// The pid of the charon that host `h`'s flanneld started last (from its log).
fn charon_pid(c: &mut Cluster, h: usize) -> i32 {
    let log = c.flanneld(h).log();
    log.lines()
        .rev()
        .filter_map(|l| l.split("Charon daemon started (").nth(1))
        .find_map(|rest| rest.split("pid ").nth(1)?.split(')').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no charon start in the log:\n{log}"))
}

/// Better than the reference, on 2 hosts: a reqid-11 policy left by an earlier run is removed at
/// start; charon is killed and the kernel's SAs flushed: flanneld starts a new charon, reloads
/// the PSK and connections, new SAs are negotiated and the pods reach each other again; a policy
/// deleted behind flanneld's back is put back.
#[test]
fn guest_charon_restart() {
    if !uml::in_guest() {
        return;
    }
    let mut c = Cluster::new(2);
    c.put_config(None, &ipsec_config(""));
    let h1 = c.hosts[0].ns.clone();
    let stale = "src 10.5.200.0/24 dst 10.5.201.0/24 dir out";
    h1.ip(&[
        "xfrm",
        "policy",
        "add",
        "src",
        "10.5.200.0/24",
        "dst",
        "10.5.201.0/24",
        "dir",
        "out",
        "tmpl",
        "src",
        "192.168.100.11",
        "dst",
        "192.168.100.99",
        "proto",
        "esp",
        "reqid",
        "11",
        "mode",
        "tunnel",
    ]);
    for h in 0..2 {
        start(&mut c, h);
        c.add_pod(h);
    }
    c.wait_full_mesh(T);
    wait_for(T, "the stale policy to be removed", || {
        (!reqid11_policies(&h1).iter().any(|p| p.contains(stale))).then_some(())
    });
    assert!(c.flanneld(0).log().contains("removed stale ipsec policy"));

    let old = charon_pid(&mut c, 0);
    // SAFETY: kill has no memory-safety preconditions.
    unsafe {
        libc::kill(old, libc::SIGKILL);
    }
    // Without charon nothing renegotiates: with the SAs gone, traffic can only come back
    // through SAs the new charon negotiates.
    h1.ip(&["xfrm", "state", "flush"]);
    c.flanneld(0).wait_log("charon reloaded", T);
    let new = charon_pid(&mut c, 0);
    assert_ne!(old, new);
    assert!(c.flanneld(0).log().contains("charon exited"));
    c.wait_full_mesh(T);
    let sas = h1.ip(&["xfrm", "state"]);
    assert!(sas.contains("reqid 11 mode tunnel"), "{sas}");
    let conns = swanctl(&mut c, 0, &["--list-sas"]);
    assert!(conns.contains("ESTABLISHED, IKEv2"), "{conns}");

    // Someone flushes the policies: they come back within a check period.
    h1.ip(&["xfrm", "policy", "flush"]);
    wait_for(T, "the policies to be put back", || {
        (reqid11_policies(&h1).len() == 3).then_some(())
    });
    c.wait_full_mesh(T);
}

/// `swanctl` configuration of what Go flannel's ipsec backend loads over VICI on host `me`
/// (`me_ip`, subnet `mine`) for each `(peer subnet, peer ip)`: the PSK for every owner, one
/// connection per peer with Go's values. swanctl.conf cannot spell Go's names (`.` and `/` are
/// not allowed in section names), so they are written with `_`: names never go on the wire.
fn go_swanctl_conf(psk: &str, me_ip: &str, mine: &str, peers: &[(String, String)]) -> String {
    let label = |s: String| s.replace(['.', '/'], "_");
    let mut conf = String::from("connections {\n");
    for (theirs, ip) in peers {
        let conn = label(format!("{me_ip}-{mine}-{theirs}-{ip}"));
        let child = label(format!("{mine}-{theirs}"));
        conf.push_str(&format!(
            "  {conn} {{\n    local_addrs = {me_ip}\n    remote_addrs = {ip}\n    \
             proposals = aes256-sha256-modp4096\n    version = 2\n    encap = no\n    \
             keyingtries = 0\n    local {{\n      auth = psk\n    }}\n    remote {{\n      auth = psk\n    }}\n    \
             children {{\n      {child} {{\n        local_ts = {mine}\n        remote_ts = {theirs}\n        \
             esp_proposals = aes128gcm16-sha256-prfsha256-ecp256\n        start_action = start\n        \
             close_action = trap\n        dpd_action = restart\n        mode = tunnel\n        \
             reqid = 11\n        rekey_time = 1h\n        policies = no\n      }}\n    }}\n  }}\n"
        ));
    }
    conf.push_str("}\nsecrets {\n");
    let owners = std::iter::once(me_ip).chain(peers.iter().map(|(_, ip)| ip.as_str()));
    for (i, owner) in owners.enumerate() {
        conf.push_str(&format!(
            "  ike-{i} {{\n    id = {owner}\n    secret = \"{psk}\"\n  }}\n"
        ));
    }
    conf.push_str("}\n");
    conf
}

/// A host configured by hand exactly as Go flannel's ipsec backend configures one (its own
/// charon with Go's connections and keys loaded through swanctl, the reqid-11 policies made
/// with `ip xfrm`, the lease in Go's JSON, subnet.env) and flanneld hosts: pods reach each other
/// both ways.
#[test]
fn guest_go_configured_host_interop() {
    if !uml::in_guest() {
        return;
    }
    let mut c = Cluster::new(3);
    c.put_config(None, &ipsec_config(""));
    for h in 0..2 {
        start(&mut c, h);
        c.add_pod(h);
    }
    // h3, "Go flannel": lease 10.5.77.0/24 in Go's JSON, charon + VICI config, policies.
    let go_subnet = "10.5.77.0/24";
    let go_ip = "192.168.100.13";
    let h3 = c.hosts[2].ns.clone();
    let mut cmd = h3.command("unshare");
    cmd.args([
        "-m",
        "--propagation",
        "private",
        "sh",
        "-c",
        "mount -t tmpfs -o mode=755 tmpfs /run && exec /usr/lib/ipsec/charon",
    ])
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    let mut charon = h3.spawn(cmd);
    let peers: Vec<(String, String)> = (0..2)
        .map(|i| (c.subnet(i).to_string(), c.hosts[i].ip.to_string()))
        .collect();
    let psk = "flannel-rs-test-psk-".repeat(5);
    let conf = c.dir.join("go-h3-swanctl.conf");
    std::fs::write(&conf, go_swanctl_conf(&psk, go_ip, go_subnet, &peers)).unwrap();
    let pid = charon.id().to_string();
    let conf_arg = conf.to_string_lossy().into_owned();
    wait_for(T, "the hand-made charon to take Go's configuration", || {
        Command::new("nsenter")
            .args(["-t", &pid, "-m", "-n", "--root", "--wd", "swanctl"])
            .args(["--load-all", "--noprompt", "--file", &conf_arg])
            .output()
            .ok()
            .filter(|o| {
                // swanctl exits 0 even on a config it cannot parse: check what it loaded.
                let out = String::from_utf8_lossy(&o.stdout);
                o.status.success() && out.contains("successfully loaded 2 connections")
            })
            .map(|_| ())
    });
    for (theirs, ip) in &peers {
        for (src, dst, dir, tsrc, tdst) in [
            (go_subnet, theirs.as_str(), "out", go_ip, ip.as_str()),
            (theirs, go_subnet, "in", ip, go_ip),
            (theirs, go_subnet, "fwd", ip, go_ip),
        ] {
            h3.ip(&[
                "xfrm", "policy", "add", "src", src, "dst", dst, "dir", dir, "tmpl", "src", tsrc,
                "dst", tdst, "proto", "esp", "reqid", "11", "mode", "tunnel",
            ]);
        }
    }
    c.etcd.put(
        "/coreos.com/network/subnets/10.5.77.0-24",
        r#"{"PublicIP":"192.168.100.13","PublicIPv6":null,"BackendType":"ipsec"}"#,
    );
    let env = c.dir.join("go-h3-subnet.env");
    std::fs::write(
        &env,
        "FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.5.77.1/24\nFLANNEL_MTU=1423\nFLANNEL_IPMASQ=true\n",
    )
    .unwrap();
    let go_pod = c.add_pod_on(2, &env, "cni0");
    let go_pod_ip = c.pods[go_pod].ip;
    for p in 0..2 {
        c.wait_ping(p, go_pod_ip, T);
        c.wait_ping(go_pod, c.pods[p].ip, T);
    }
    c.wait_ping(0, c.pods[1].ip, T);
    let _ = charon.kill();
    let _ = charon.wait();
}

/// A charon that already answers on /var/run/charon.vici is used, not a second one started; when
/// it dies, flanneld starts its own and loads everything into it. (h1 uses the guest's /run: the
/// guest is a machine of its own.)
#[test]
fn guest_running_charon() {
    if !uml::in_guest() {
        return;
    }
    let mut c = Cluster::new(2);
    c.put_config(None, &ipsec_config(""));
    let h1 = c.hosts[0].ns.clone();
    let mut cmd = h1.command("/usr/lib/ipsec/charon");
    cmd.stdout(Stdio::null()).stderr(Stdio::null());
    let mut running = h1.spawn(cmd);
    wait_for(T, "the running charon to answer", || {
        h1.exec("swanctl", &["--stats"])
            .status
            .success()
            .then_some(())
    });
    c.start_flanneld(0, &["--ip-masq"]);
    start(&mut c, 1);
    c.add_pod(0);
    c.add_pod(1);
    c.wait_full_mesh(T);
    let log = c.flanneld(0).log();
    assert!(
        log.contains("Using the charon daemon that answers on /var/run/charon.vici"),
        "{log}"
    );
    assert!(!log.contains("Charon daemon started"), "{log}");

    let _ = running.kill();
    let _ = running.wait();
    h1.ip(&["xfrm", "state", "flush"]);
    c.flanneld(0).wait_log("charon reloaded", T);
    let log = c.flanneld(0).log();
    assert!(
        log.contains("starting our own") && log.contains("Charon daemon started"),
        "{log}"
    );
    c.wait_full_mesh(T);
}
