//! The wireguard backend's kernel data path, proven on Debian's kernel in a QEMU guest (this
//! machine's kernel has no WireGuard): `KernelWg` makes the `wireguard` link and configures it
//! through generic netlink only; `ip` and `wg` (wireguard-tools) then read the kernel's state
//! back, and pings cross between hosts over the tunnels.
//!
//! Each test here has a host part (boots the guest and runs the guest part in it) and a guest
//! part (a normal test that returns at once outside the guest).

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Command, Stdio};
use std::time::Duration;

use flanneld::backend::wireguard::datapath::{WgDataPath, WgDeviceConfig, WgKey, WgPeer};
use flanneld::backend::wireguard::kernel::{kernel_available, KernelWg};
use ipnet::IpNet;
use testbed::qemu::{in_guest, run_in_guest};
use testbed::{wait_for, Cluster, NetNs};

/// The device name flannel uses.
const DEV: &str = "flannel-wg";
const PORT: u16 = 51820;
/// Generous: everything in the guest is software-emulated.
const GUEST_WAIT: Duration = Duration::from_secs(60);

/// A key pair made by `wg` (the test's own key source, independent of the code under test).
struct KeyPair {
    private: WgKey,
    public: WgKey,
    public_b64: String,
}

fn wg_tool(args: &[&str], stdin: Option<&str>) -> String {
    use std::io::Write;
    let mut child = Command::new("wg")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run wg (wireguard-tools; scripts/install-deps.sh installs it)");
    let mut input = child.stdin.take().expect("stdin");
    if let Some(s) = stdin {
        input.write_all(s.as_bytes()).expect("write to wg");
    }
    drop(input);
    let out = child.wait_with_output().expect("wg");
    assert!(
        out.status.success(),
        "wg {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn decode_key(b64: &str) -> WgKey {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut bits = 0u32;
    let mut n = 0;
    let mut out = vec![];
    for c in b64.bytes().take_while(|&c| c != b'=') {
        let v = ALPHABET
            .iter()
            .position(|&a| a == c)
            .unwrap_or_else(|| panic!("not base64: {b64}")) as u32;
        bits = (bits << 6) | v;
        n += 6;
        if n >= 8 {
            n -= 8;
            out.push((bits >> n) as u8);
            bits &= (1 << n) - 1;
        }
    }
    out.try_into()
        .unwrap_or_else(|_| panic!("not a 32-byte key: {b64}"))
}

fn key_pair() -> KeyPair {
    let private_b64 = wg_tool(&["genkey"], None);
    let public_b64 = wg_tool(&["pubkey"], Some(&private_b64));
    KeyPair {
        private: decode_key(&private_b64),
        public: decode_key(&public_b64),
        public_b64,
    }
}

/// Runs async code on a thread inside `ns` (netlink sockets belong to the namespace they are
/// opened in).
fn in_ns<R: Send + 'static>(
    ns: &NetNs,
    f: impl FnOnce() -> std::pin::Pin<Box<dyn std::future::Future<Output = R>>> + Send + 'static,
) -> R {
    ns.run_in(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime")
            .block_on(f())
    })
}

/// One peer line of `wg show <dev> dump`: public key -> (psk, endpoint, allowed ips,
/// latest handshake).
#[derive(Debug, Clone, PartialEq, Eq)]
struct DumpPeer {
    psk: String,
    endpoint: String,
    allowed_ips: String,
    latest_handshake: u64,
}

/// `wg show <dev> dump` in `ns`: the device's public key and listen port, and its peers.
fn wg_dump(ns: &NetNs) -> (String, u16, BTreeMap<String, DumpPeer>) {
    let out = ns.run("wg", &["show", DEV, "dump"]);
    let mut lines = out.lines();
    let dev: Vec<&str> = lines.next().expect("device line").split('\t').collect();
    let peers = lines
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            (
                f[0].to_string(),
                DumpPeer {
                    psk: f[1].to_string(),
                    endpoint: f[2].to_string(),
                    allowed_ips: f[3].to_string(),
                    latest_handshake: f[4].parse().unwrap_or(0),
                },
            )
        })
        .collect();
    (dev[1].to_string(), dev[2].parse().expect("port"), peers)
}

fn wg_addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 20, i as u8 + 1, 0)
}

fn wg_subnet(i: usize) -> IpNet {
    format!("10.20.{}.0/24", i + 1).parse().expect("subnet")
}

fn ping(ns: &NetNs, to: Ipv4Addr) -> bool {
    ns.exec("ping", &["-c", "1", "-W", "1", &to.to_string()])
        .status
        .success()
}

fn sorted(mut peers: Vec<WgPeer>) -> Vec<WgPeer> {
    peers.sort_by_key(|p| p.public_key);
    peers
}

/// On whatever kernel runs the suite (no guest): `kernel_available()` agrees with what
/// happens when the device is made, and without the module `create` fails with an error that
/// names the device instead of half-configuring anything.
#[test]
fn kernel_probe_agrees_with_device_creation_on_this_kernel() {
    if in_guest() {
        return;
    }
    testbed::require_root();
    let ns = NetNs::new("wgprobe");
    let (available, created) = in_ns(&ns, || {
        Box::pin(async {
            let available = kernel_available().await;
            let created = KernelWg::create(DEV, 1420)
                .await
                .map(|wg| wg.index())
                .map_err(|e| e.to_string());
            (available, created)
        })
    });
    let links = ns.ip(&["-d", "link", "show"]);
    println!("wireguard probe: available {available}, create {created:?}");
    match created {
        Ok(_) => {
            assert!(available, "device made although the probe said no");
            assert!(links.contains("wireguard"), "{links}");
        }
        Err(e) => {
            assert!(!available, "probe said yes but creation failed: {e}");
            assert!(
                e.contains("failed to create wireguard device flannel-wg"),
                "{e}"
            );
            assert!(!links.contains(DEV), "nothing left behind: {links}");
        }
    }
}

#[test]
fn kernel_wireguard_three_hosts_in_guest() {
    testbed::require_root();
    let run = run_in_guest(
        &["--exact", "guest_kernel_wireguard_three_hosts"],
        Duration::from_secs(420),
    );
    assert!(
        run.output
            .contains("kernel wireguard: 3 hosts configured, pinged, peer removed"),
        "{}",
        run.report()
    );
}

#[test]
fn guest_kernel_wireguard_three_hosts() {
    if !in_guest() {
        return;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    assert!(
        rt.block_on(kernel_available()),
        "the guest kernel has WireGuard, kernel_available must say so"
    );
    let c = Cluster::new(3);
    let n = c.hosts.len();
    let keys: Vec<KeyPair> = (0..n).map(|_| key_pair()).collect();
    let psk_b64 = wg_tool(&["genpsk"], None);
    let psk = decode_key(&psk_b64);
    let peer_of = |j: usize| WgPeer {
        public_key: keys[j].public,
        preshared_key: Some(psk),
        endpoint: Some(SocketAddr::new(c.hosts[j].ip.into(), PORT)),
        allowed_ips: vec![wg_subnet(j)],
        keepalive_secs: 0,
    };

    // Every host: device, key, port and the two other hosts as peers, all through KernelWg.
    for (i, key) in keys.iter().enumerate() {
        let config = WgDeviceConfig {
            private_key: key.private,
            listen_port: PORT,
        };
        let peers: Vec<WgPeer> = (0..n).filter(|&j| j != i).map(peer_of).collect();
        let want = peers.clone();
        let read_back = in_ns(&c.hosts[i].ns, move || {
            Box::pin(async move {
                let mut wg = KernelWg::create(DEV, 1420).await.expect("create");
                wg.set_device(&config).await.expect("set_device");
                for p in &peers {
                    wg.set_peer(p).await.expect("set_peer");
                }
                wg.peers().await.expect("peers")
            })
        });
        assert_eq!(
            sorted(read_back),
            sorted(want),
            "peers read back on h{}",
            i + 1
        );
        let ns = &c.hosts[i].ns;
        // Addressing as Go flannel does it (the control plane's job, done by hand here).
        ns.ip(&["addr", "add", &format!("{}/32", wg_addr(i)), "dev", DEV]);
        ns.ip(&["route", "add", "10.20.0.0/16", "dev", DEV, "scope", "link"]);
    }

    // The kernel's view, through the standard tools.
    for i in 0..n {
        let ns = &c.hosts[i].ns;
        let link = ns.ip(&["-d", "link", "show", DEV]);
        assert!(link.contains("wireguard"), "h{}: {link}", i + 1);
        assert!(link.contains("mtu 1420"), "h{}: {link}", i + 1);
        let (public, port, peers) = wg_dump(ns);
        assert_eq!(public, keys[i].public_b64, "h{} public key", i + 1);
        assert_eq!(port, PORT);
        let want: BTreeMap<String, (String, String, String)> = (0..n)
            .filter(|&j| j != i)
            .map(|j| {
                (
                    keys[j].public_b64.clone(),
                    (
                        psk_b64.clone(),
                        format!("{}:{PORT}", c.hosts[j].ip),
                        wg_subnet(j).to_string(),
                    ),
                )
            })
            .collect();
        let got: BTreeMap<String, (String, String, String)> = peers
            .iter()
            .map(|(k, p)| {
                (
                    k.clone(),
                    (p.psk.clone(), p.endpoint.clone(), p.allowed_ips.clone()),
                )
            })
            .collect();
        assert_eq!(got, want, "wg show on h{}", i + 1);
    }

    // Pings cross every pair over the tunnels, and the sessions really were negotiated.
    for i in 0..n {
        for j in 0..n {
            if i != j {
                let ns = &c.hosts[i].ns;
                wait_for(
                    GUEST_WAIT,
                    &format!("h{} to ping h{}'s {DEV} address", i + 1, j + 1),
                    || ping(ns, wg_addr(j)).then_some(()),
                );
            }
        }
    }
    for i in 0..n {
        let (_, _, peers) = wg_dump(&c.hosts[i].ns);
        assert!(
            peers.values().all(|p| p.latest_handshake > 0),
            "h{}: a peer without handshake: {peers:?}",
            i + 1
        );
    }

    // set_peer replaces allowed IPs (never appends), and create() reuses the device as is.
    let h1 = c.hosts[0].ns.clone();
    let mut wider = peer_of(1);
    wider
        .allowed_ips
        .push("10.20.99.0/24".parse().expect("net"));
    let narrow = peer_of(1);
    let index_before = h1.ip(&["-o", "link", "show", DEV]);
    let (after_wide, after_narrow) = in_ns(&h1, move || {
        Box::pin(async move {
            let mut wg = KernelWg::create(DEV, 1420).await.expect("reuse");
            wg.set_peer(&wider).await.expect("wider");
            let a = wg.peers().await.expect("peers");
            wg.set_peer(&narrow).await.expect("narrow");
            let b = wg.peers().await.expect("peers");
            (a, b)
        })
    });
    let allowed_of = |peers: &[WgPeer], k: &WgKey| {
        peers
            .iter()
            .find(|p| &p.public_key == k)
            .map(|p| p.allowed_ips.clone())
    };
    assert_eq!(
        allowed_of(&after_wide, &keys[1].public).map(|a| a.len()),
        Some(2)
    );
    assert_eq!(
        allowed_of(&after_narrow, &keys[1].public),
        Some(vec![wg_subnet(1)])
    );
    assert_eq!(
        h1.ip(&["-o", "link", "show", DEV]).split(':').next(),
        index_before.split(':').next(),
        "create() must reuse the existing device"
    );
    wait_for(
        GUEST_WAIT,
        "h1 to reach h2 after reusing the device",
        || ping(&h1, wg_addr(1)).then_some(()),
    );

    // Remove h3 from h1: gone from KernelWg's view and from `wg show`, and no longer reachable.
    let h3_key = keys[2].public;
    let left = in_ns(&h1, move || {
        Box::pin(async move {
            let mut wg = KernelWg::create(DEV, 1420).await.expect("reuse");
            wg.remove_peer(&h3_key).await.expect("remove");
            // Removing an absent peer is not an error.
            wg.remove_peer(&h3_key).await.expect("remove again");
            wg.peers().await.expect("peers")
        })
    });
    assert_eq!(left, vec![peer_of(1)], "h1's peers after removing h3");
    let (_, _, peers) = wg_dump(&h1);
    assert!(!peers.contains_key(&keys[2].public_b64), "{peers:?}");
    assert!(peers.contains_key(&keys[1].public_b64), "{peers:?}");
    assert!(!ping(&h1, wg_addr(2)), "h3 still reachable after removal");
    wait_for(GUEST_WAIT, "h1 to still reach h2 after removing h3", || {
        ping(&h1, wg_addr(1)).then_some(())
    });
    println!("kernel wireguard: 3 hosts configured, pinged, peer removed");
}

/// The full backend on the guest's kernel: 3 flanneld with the wireguard backend (its
/// `open_datapath` picks `KernelWg` there).
#[test]
fn flanneld_wireguard_three_hosts_in_guest() {
    testbed::require_root();
    let run = run_in_guest(
        &["--exact", "guest_flanneld_wireguard_three_hosts"],
        Duration::from_secs(600),
    );
    assert!(
        run.output.contains("flanneld wireguard: 3 hosts"),
        "{}",
        run.report()
    );
}

#[test]
fn guest_flanneld_wireguard_three_hosts() {
    if !in_guest() {
        return;
    }
    flanneld_wireguard_three_hosts();
}

/// 3 hosts running flanneld with `{"Network":"10.20.0.0/16","Backend":{"Type":"wireguard"}}`
/// on the kernel's WireGuard: pods reach each other, `flannel-wg` is a `wireguard` link, and
/// `wg show` lists each other host with its subnet as allowed-ips, its underlay address and
/// port as endpoint, and the public key its lease announces.
pub fn flanneld_wireguard_three_hosts() {
    let mut c = Cluster::new(3);
    c.put_config(
        None,
        r#"{"Network":"10.20.0.0/16","Backend":{"Type":"wireguard"}}"#,
    );
    for i in 0..c.hosts.len() {
        // Each host its own key file (all namespaces share the guest's /run).
        let key_file = c.dir.join(&format!("h{}-wgkey", i + 1));
        let key_file = key_file.to_string_lossy().into_owned();
        c.start_flanneld_env(i, &[], &[("WIREGUARD_KEY_FILE", &key_file)]);
    }
    for h in 0..c.hosts.len() {
        c.add_pod(h);
    }
    c.wait_full_mesh(GUEST_WAIT);
    let n = c.hosts.len();
    for i in 0..n {
        let ns = &c.hosts[i].ns;
        let link = ns.ip(&["-d", "link", "show", DEV]);
        assert!(link.contains("wireguard"), "h{}: {link}", i + 1);
        let lease = c.lease(i);
        assert_eq!(lease["BackendType"], "wireguard", "{lease}");
        let (public, port, peers) = wg_dump(ns);
        assert_eq!(
            lease["BackendData"]["PublicKey"].as_str(),
            Some(public.as_str()),
            "h{} lease key vs device key",
            i + 1
        );
        assert_eq!(lease["BackendData"]["Port"], port, "{lease}");
        assert_eq!(peers.len(), n - 1, "h{}: {peers:?}", i + 1);
        for j in (0..n).filter(|&j| j != i) {
            let their = c.lease(j);
            let key = their["BackendData"]["PublicKey"]
                .as_str()
                .expect("PublicKey")
                .to_string();
            let p = peers
                .get(&key)
                .unwrap_or_else(|| panic!("h{}: no peer for h{}: {peers:?}", i + 1, j + 1));
            assert_eq!(p.allowed_ips, c.subnet(j).to_string(), "h{}", i + 1);
            assert_eq!(
                p.endpoint,
                format!("{}:{PORT}", c.hosts[j].ip),
                "h{}",
                i + 1
            );
        }
    }
    println!("flanneld wireguard: 3 hosts, pods reachable, kernel state as Go flannel builds it");
}
