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

/// wireguard-go `flannel-wg` on a cluster host, set up as Go flannel does; killed on drop.
pub struct HandWg {
    child: Child,
    dir: PathBuf,
    /// Its public key (base64).
    pub public_key: String,
}

impl Drop for HandWg {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl HandWg {
    /// Starts wireguard-go on host `h`: private key, port 51820, MTU 1420, address
    /// `<subnet network>/32`, route `<network> dev flannel-wg scope link`; writes the host's
    /// subnet.env (for its pods) and its lease in Go's exact JSON; `psk` is kept for peers.
    pub fn start(c: &Cluster, h: usize, subnet: &str, network: &str, psk: Option<&str>) -> Self {
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
        let hw = HandWg {
            child,
            dir,
            public_key,
        };
        let pid = hw.pid();
        wait_for(Duration::from_secs(30), "wireguard-go UAPI socket", || {
            Command::new("nsenter")
                .args([
                    "-t",
                    &pid.to_string(),
                    "-m",
                    "-n",
                    "wg",
                    "show",
                    "flannel-wg",
                ])
                .output()
                .ok()
                .filter(|o| o.status.success())
        });
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
        c.etcd.put(
            &format!("{PREFIX}/subnets/{}-{}", net.network(), net.prefix_len()),
            &format!(
                r#"{{"PublicIP":"{}","PublicIPv6":null,"BackendType":"wireguard","BackendData":{{"PublicKey":"{}","Port":51820}}}}"#,
                c.hosts[h].ip, hw.public_key
            ),
        );
        let gw = Ipv4Addr::from(u32::from(net.network()) + 1);
        std::fs::write(
            &c.hosts[h].subnet_file,
            format!(
                "FLANNEL_NETWORK={network}\nFLANNEL_SUBNET={gw}/{}\nFLANNEL_MTU=1420\nFLANNEL_IPMASQ=false\n",
                net.prefix_len()
            ),
        )
        .expect("subnet.env");
        hw
    }

    /// The wireguard-go process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Adds a peer as Go flannel's lease handler does (endpoint, allowed-ips, the PSK).
    pub fn add_peer(&self, public_key: &str, endpoint: &str, allowed: &str) {
        let psk = self.dir.join("psk").to_string_lossy().into_owned();
        let mut args = vec![
            "set",
            "flannel-wg",
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
