//! A host configured by hand as Go flannel's wireguard backend configures one, on Debian's
//! user-space `wireguard-go` + `wg` (for interop tests and the benchmark's reference pair).
//!
//! wireguard-go's control socket lives in the file system (`/var/run/wireguard/<dev>.sock`),
//! so it runs in its own mount namespace with a private `/run`; `wg` reaches it with
//! `nsenter -t <pid> -m -n`.

use std::io::Write;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::cluster::Cluster;
use crate::fixture::PREFIX;
use crate::wait_for;

/// `wg <args>` in the mount and network namespaces of process `pid`; panics on failure.
pub fn wg(pid: u32, args: &[&str]) -> String {
    let out = Command::new("nsenter")
        .args(["-t", &pid.to_string(), "-m", "-n", "wg"])
        .args(args)
        .output()
        .expect("nsenter wg (apt-get install wireguard-tools)");
    assert!(
        out.status.success(),
        "wg {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `wg pubkey` of a base64 private key.
pub fn pubkey(private: &str) -> String {
    let mut p = Command::new("wg")
        .arg("pubkey")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("wg (apt-get install wireguard-tools)");
    p.stdin
        .take()
        .expect("stdin")
        .write_all(private.as_bytes())
        .expect("write key");
    String::from_utf8(p.wait_with_output().expect("wg pubkey").stdout)
        .expect("utf-8")
        .trim()
        .to_string()
}

/// wireguard-go `flannel-wg` (and `flannel-wg-v6`, dual stack) on a cluster host, set up as
/// Go flannel does; killed on drop.
pub struct HandWg {
    child: Child,
    /// The `flannel-wg-v6` wireguard-go, in the first one's mount namespace.
    child6: Option<Child>,
    dir: PathBuf,
    /// Its public key (base64).
    pub public_key: String,
}

impl Drop for HandWg {
    fn drop(&mut self) {
        for c in std::iter::once(&mut self.child).chain(self.child6.as_mut()) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The IPv6 half of a hand-made host in Go's `separate` mode.
pub struct HandV6<'a> {
    /// The host's IPv6 subnet (e.g. `fc00:5:0:95::/64`).
    pub subnet: &'a str,
    /// The network's IPv6Network.
    pub network: &'a str,
}

/// Waits until `wg show <dev>` answers in the namespaces of `pid`.
fn wait_uapi(pid: u32, dev: &str) {
    wait_for(
        Duration::from_secs(30),
        &format!("wireguard-go UAPI socket of {dev}"),
        || {
            Command::new("nsenter")
                .args(["-t", &pid.to_string(), "-m", "-n", "wg", "show", dev])
                .output()
                .ok()
                .filter(|o| o.status.success())
        },
    );
}

impl HandWg {
    /// Starts wireguard-go on host `h`: private key, port 51820, MTU 1420, address
    /// `<subnet network>/32`, route `<network> dev flannel-wg scope link`; writes the host's
    /// subnet.env (for its pods) and its lease in Go's exact JSON; `psk` is kept for peers.
    pub fn start(c: &Cluster, h: usize, subnet: &str, network: &str, psk: Option<&str>) -> Self {
        Self::start_dual(c, h, subnet, network, None, psk)
    }

    /// Like [`Self::start`], plus with `v6` Go's `separate`-mode IPv6 device: a second
    /// wireguard-go `flannel-wg-v6` with the same key on port 51821, MTU 1420, address
    /// `<v6 subnet network>/128`, route `<IPv6Network> dev flannel-wg-v6`; the lease gets
    /// PublicIPv6 and BackendV6Data, subnet.env the IPv6 lines.
    pub fn start_dual(
        c: &Cluster,
        h: usize,
        subnet: &str,
        network: &str,
        v6: Option<HandV6<'_>>,
        psk: Option<&str>,
    ) -> Self {
        let dir = c.dir.join(&format!("wggo-h{}", h + 1));
        std::fs::create_dir_all(&dir).expect("dir");
        let out = Command::new("wg")
            .arg("genkey")
            .output()
            .expect("wg genkey");
        let private = String::from_utf8_lossy(&out.stdout).trim().to_string();
        std::fs::write(dir.join("key"), &private).expect("key");
        if let Some(psk) = psk {
            std::fs::write(dir.join("psk"), psk).expect("psk");
        }
        let public_key = pubkey(&private);
        let ns = c.hosts[h].ns.clone();
        let child = ns
            .command("unshare")
            .args([
                "-m",
                "--propagation",
                "private",
                "sh",
                "-c",
                "mount -t tmpfs -o mode=755 tmpfs /run && exec wireguard-go flannel-wg",
            ])
            .env("WG_PROCESS_FOREGROUND", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("wireguard-go (apt-get install wireguard-go)");
        let mut hw = HandWg {
            child,
            child6: None,
            dir,
            public_key,
        };
        let pid = hw.pid();
        wait_uapi(pid, "flannel-wg");
        let keyp = hw.dir.join("key").to_string_lossy().into_owned();
        wg(
            pid,
            &[
                "set",
                "flannel-wg",
                "private-key",
                &keyp,
                "listen-port",
                "51820",
            ],
        );
        let net: ipnet::Ipv4Net = subnet.parse().expect("subnet");
        ns.ip(&["link", "set", "flannel-wg", "mtu", "1420", "up"]);
        ns.ip(&[
            "addr",
            "add",
            &format!("{}/32", net.network()),
            "dev",
            "flannel-wg",
        ]);
        ns.ip(&[
            "route",
            "replace",
            network,
            "dev",
            "flannel-wg",
            "scope",
            "link",
        ]);
        let gw = Ipv4Addr::from(u32::from(net.network()) + 1);
        let mut env = format!(
            "FLANNEL_NETWORK={network}\nFLANNEL_SUBNET={gw}/{}\n",
            net.prefix_len()
        );
        let Some(v6) = v6 else {
            c.etcd.put(
                &format!("{PREFIX}/subnets/{}-{}", net.network(), net.prefix_len()),
                &format!(
                    r#"{{"PublicIP":"{}","PublicIPv6":null,"BackendType":"wireguard","BackendData":{{"PublicKey":"{}","Port":51820}}}}"#,
                    c.hosts[h].ip, hw.public_key
                ),
            );
            env.push_str("FLANNEL_MTU=1420\nFLANNEL_IPMASQ=false\n");
            std::fs::write(&c.hosts[h].subnet_file, env).expect("subnet.env");
            return hw;
        };
        // The v6 device: another wireguard-go in the first one's mount namespace, so that
        // `wg` finds both sockets in the same private /run.
        let child6 = ns
            .command("nsenter")
            .args([
                "-t",
                &pid.to_string(),
                "-m",
                "wireguard-go",
                "flannel-wg-v6",
            ])
            .env("WG_PROCESS_FOREGROUND", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("wireguard-go flannel-wg-v6");
        hw.child6 = Some(child6);
        wait_uapi(pid, "flannel-wg-v6");
        wg(
            pid,
            &[
                "set",
                "flannel-wg-v6",
                "private-key",
                &keyp,
                "listen-port",
                "51821",
            ],
        );
        let net6: ipnet::Ipv6Net = v6.subnet.parse().expect("v6 subnet");
        ns.ip(&["link", "set", "flannel-wg-v6", "mtu", "1420", "up"]);
        ns.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{}/128", net6.network()),
            "dev",
            "flannel-wg-v6",
            "nodad",
        ]);
        ns.ip(&[
            "-6",
            "route",
            "replace",
            v6.network,
            "dev",
            "flannel-wg-v6",
            "scope",
            "link",
        ]);
        c.etcd.put(
            &crate::lease_key(net, Some(net6)),
            &format!(
                r#"{{"PublicIP":"{}","PublicIPv6":"{}","BackendType":"wireguard","BackendData":{{"PublicKey":"{k}","Port":51820}},"BackendV6Data":{{"PublicKey":"{k}","Port":51821}}}}"#,
                c.hosts[h].ip,
                c.hosts[h].ip6,
                k = hw.public_key
            ),
        );
        let gw6 = std::net::Ipv6Addr::from(u128::from(net6.network()) + 1);
        env.push_str(&format!(
            "FLANNEL_IPV6_NETWORK={}\nFLANNEL_IPV6_SUBNET={gw6}/{}\nFLANNEL_MTU=1420\nFLANNEL_IPMASQ=false\n",
            v6.network,
            net6.prefix_len()
        ));
        std::fs::write(&c.hosts[h].subnet_file, env).expect("subnet.env");
        hw
    }

    /// The wireguard-go process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Adds a peer as Go flannel's lease handler does (endpoint, allowed-ips, the PSK).
    pub fn add_peer(&self, public_key: &str, endpoint: &str, allowed: &str) {
        self.add_peer_on("flannel-wg", public_key, endpoint, allowed)
    }

    /// [`Self::add_peer`] on device `dev` (`flannel-wg-v6` for the IPv6 half).
    pub fn add_peer_on(&self, dev: &str, public_key: &str, endpoint: &str, allowed: &str) {
        let psk = self.dir.join("psk").to_string_lossy().into_owned();
        let mut args = vec![
            "set",
            dev,
            "peer",
            public_key,
            "endpoint",
            endpoint,
            "allowed-ips",
            allowed,
        ];
        if self.dir.join("psk").exists() {
            args.extend(["preshared-key", psk.as_str()]);
        }
        wg(self.pid(), &args);
    }
}
