//! A multi-host cluster: hosts as namespaces joined by an underlay bridge that lives in its own
//! namespace, a real etcd on the first host, a flanneld per host, and pods attached through the
//! real CNI `bridge` + `host-local` plugins.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use crate::fixture::PREFIX;
use crate::netns::NetNs;
use crate::{unique_name, wait_for, Etcd, Flanneld, TempDir};

/// A pod: a namespace with `eth0` on its host's `cni0` bridge.
pub struct Pod {
    /// The pod's namespace.
    pub ns: NetNs,
    /// Its address.
    pub ip: Ipv4Addr,
    /// Its IPv6 address, in a dual-stack network.
    pub ip6: Option<std::net::Ipv6Addr>,
    /// Index of its host in the cluster.
    pub host: usize,
    /// Display name, `h<host>/pod<n>`.
    pub label: String,
}

/// One host of the cluster.
pub struct ClusterHost {
    /// The host's namespace.
    pub ns: Arc<NetNs>,
    /// Its underlay address (on `eth0`).
    pub ip: Ipv4Addr,
    /// Its IPv6 underlay address (on `eth0`).
    pub ip6: std::net::Ipv6Addr,
    /// Its flanneld, when running.
    pub flanneld: Option<Flanneld>,
    /// The subnet.env its flanneld writes.
    pub subnet_file: PathBuf,
}

/// N hosts on one L2 underlay (192.168.100.0/24) with etcd on the first.
pub struct Cluster {
    /// Pods (dropped first).
    pub pods: Vec<Pod>,
    /// The etcd server on host 0.
    pub etcd: Etcd,
    /// The Kubernetes API server on host 0, in kube-mode clusters.
    pub kube: Option<crate::kubeapi::KubeApiServer>,
    /// The hosts.
    pub hosts: Vec<ClusterHost>,
    /// Scratch space.
    pub dir: TempDir,
    /// The namespace holding the underlay bridge `br0` (dropped last).
    pub underlay: Arc<NetNs>,
}

impl Cluster {
    /// Builds `n` hosts and starts etcd; no flanneld yet.
    pub fn new(n: usize) -> Self {
        let underlay = Arc::new(NetNs::new("ul"));
        underlay.ip(&["link", "add", "br0", "type", "bridge"]);
        underlay.ip(&["link", "set", "br0", "up"]);
        let dir = TempDir::new("cluster");
        let mut hosts = vec![];
        for i in 0..n {
            hosts.push(Self::make_host(&underlay, &dir, i));
        }
        let etcd = Etcd::start_on(&hosts[0].ns, &hosts[0].ip.to_string(), 2379, None);
        Cluster {
            pods: vec![],
            etcd,
            kube: None,
            hosts,
            dir,
            underlay,
        }
    }

    fn make_host(underlay: &Arc<NetNs>, dir: &TempDir, i: usize) -> ClusterHost {
        let ns = Arc::new(NetNs::new(&format!("h{}", i + 1)));
        let ip = Ipv4Addr::new(192, 168, 100, 11 + i as u8);
        plug_into_underlay(
            underlay,
            &ns,
            &format!("veth-h{}", i + 1),
            &format!("{ip}/24"),
        );
        ns.ip(&["route", "add", "default", "via", "192.168.100.1"]);
        ns.run("sysctl", &["-qw", "net.ipv4.ip_forward=1"]);
        // IPv6 underlay too (fd00:100::/64), for dual-stack networks.
        let ip6: std::net::Ipv6Addr = format!("fd00:100::{}", 11 + i).parse().expect("v6");
        ns.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{ip6}/64"),
            "dev",
            "eth0",
            "nodad",
        ]);
        ns.ip(&[
            "-6",
            "route",
            "add",
            "default",
            "via",
            "fd00:100::1",
            "dev",
            "eth0",
        ]);
        ns.run("sysctl", &["-qw", "net.ipv6.conf.all.forwarding=1"]);
        ClusterHost {
            ns,
            ip,
            ip6,
            flanneld: None,
            subnet_file: dir.join(&format!("h{}-subnet.env", i + 1)),
        }
    }

    /// Adds a host to a running cluster (e.g. one joining later); returns its index.
    pub fn add_host(&mut self) -> usize {
        let i = self.hosts.len();
        let h = Self::make_host(&self.underlay, &self.dir, i);
        self.hosts.push(h);
        i
    }

    /// Writes the network config at `prefix` (default prefix when `None`).
    pub fn put_config(&self, prefix: Option<&str>, json: &str) {
        self.etcd
            .put(&format!("{}/config", prefix.unwrap_or(PREFIX)), json);
    }

    /// Starts flanneld on host `i` with `extra` flags and waits for its subnet.env.
    pub fn start_flanneld(&mut self, i: usize, extra: &[&str]) -> String {
        self.start_flanneld_env(i, extra, &[])
    }

    /// Like [`Self::start_flanneld`] with extra environment variables.
    pub fn start_flanneld_env(&mut self, i: usize, extra: &[&str], env: &[(&str, &str)]) -> String {
        self.spawn_flanneld_env(i, extra, env);
        let h = &mut self.hosts[i];
        let f = h.flanneld.as_mut().expect("just spawned");
        f.wait_subnet_env(&h.subnet_file, Duration::from_secs(60))
    }

    /// Starts flanneld on host `i` (etcd flags first, so `extra` may override them) without
    /// waiting for it to become ready.
    pub fn spawn_flanneld_env(&mut self, i: usize, extra: &[&str], env: &[(&str, &str)]) {
        let h = &mut self.hosts[i];
        let mut args = vec![
            format!("--etcd-endpoints={}", self.etcd.url()),
            format!("--subnet-file={}", h.subnet_file.display()),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let _ = std::fs::remove_file(&h.subnet_file);
        h.flanneld = Some(Flanneld::start_env(&h.ns, self.dir.path(), &args, env));
    }

    /// Runs `flanneld doctor` on host `i` with the flags its daemon gets (`extra` as given to
    /// the daemon, plus e.g. `--json`); returns the exit code and stdout (stderr appended).
    pub fn doctor(&self, i: usize, extra: &[&str]) -> (i32, String) {
        let h = &self.hosts[i];
        let mut args = vec![
            "doctor".to_string(),
            format!("--etcd-endpoints={}", self.etcd.url()),
            format!("--subnet-file={}", h.subnet_file.display()),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        run_doctor(&h.ns, &args, &[])
    }

    /// Like [`Self::doctor`], but run inside host `i`'s running flanneld's mount and network
    /// namespaces, so it sees what the daemon sees (e.g. the private /run of
    /// `TESTBED_PRIVATE_RUN` with the user-space WireGuard's UAPI socket).
    pub fn doctor_beside_daemon(&mut self, i: usize, extra: &[&str]) -> (i32, String) {
        let pid = self.flanneld(i).pid().expect("flanneld running");
        let h = &self.hosts[i];
        let mut args: Vec<String> = ["-t", &pid.to_string(), "-m", "-n"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        args.extend([
            crate::binary("flanneld").display().to_string(),
            "doctor".to_string(),
            format!("--etcd-endpoints={}", self.etcd.url()),
            format!("--subnet-file={}", h.subnet_file.display()),
        ]);
        args.extend(extra.iter().map(|s| s.to_string()));
        run_command(std::process::Command::new("nsenter").args(&args))
    }

    /// Starts flanneld on every host.
    pub fn start_all(&mut self, extra: &[&str]) {
        for i in 0..self.hosts.len() {
            self.start_flanneld(i, extra);
        }
    }

    /// The flanneld of host `i`.
    pub fn flanneld(&mut self, i: usize) -> &mut Flanneld {
        self.hosts[i].flanneld.as_mut().expect("flanneld running")
    }

    /// Reads a key of host `i`'s subnet.env.
    pub fn env_var(&self, i: usize, key: &str) -> String {
        crate::env_value(&self.hosts[i].subnet_file, key)
    }

    /// Host `i`'s IPv4 subnet (network form).
    pub fn subnet(&self, i: usize) -> ipnet::Ipv4Net {
        crate::env_subnet(&self.hosts[i].subnet_file)
    }

    /// Host `i`'s IPv6 subnet, in a dual-stack network.
    pub fn subnet6(&self, i: usize) -> Option<ipnet::Ipv6Net> {
        crate::env_subnet6(&self.hosts[i].subnet_file)
    }

    /// The etcd key of host `i`'s lease (default prefix).
    pub fn lease_key(&self, i: usize) -> String {
        crate::lease_key(self.subnet(i), self.subnet6(i))
    }

    /// Host `i`'s lease value as stored in etcd, parsed.
    pub fn lease(&self, i: usize) -> serde_json::Value {
        let key = self.lease_key(i);
        let v = self
            .etcd
            .get(&key)
            .unwrap_or_else(|| panic!("no lease at {key}"));
        serde_json::from_str(&v).expect("lease JSON")
    }

    /// Attaches a pod to host `i` with the reference bridge + host-local plugins, configured from
    /// the host's subnet.env; returns the pod index.
    pub fn add_pod(&mut self, i: usize) -> usize {
        let subnet_file = self.hosts[i].subnet_file.clone();
        self.add_pod_on(i, &subnet_file, "cni0")
    }

    /// Like [`Self::add_pod`] with an explicit subnet.env and bridge name (several networks).
    /// The pod is wired by our `flannel` CNI plugin delegating to the reference bridge +
    /// host-local, exactly as on a Kubernetes node.
    pub fn add_pod_on(&mut self, i: usize, subnet_file: &std::path::Path, bridge: &str) -> usize {
        let n = self.pods.iter().filter(|p| p.host == i).count() + 1;
        let label = format!("h{}/pod{n}", i + 1);
        let pod_ns = NetNs::new(&format!("p{}{}", i + 1, n));
        let conf = serde_json::json!({
            "cniVersion": "0.3.1",
            "name": format!("frs-{bridge}"),
            "type": "flannel",
            "subnetFile": subnet_file.to_string_lossy(),
            "dataDir": self.dir.join(&format!("cni-h{}", i + 1)).to_string_lossy(),
            "delegate": {"bridge": bridge, "hairpinMode": true, "isDefaultGateway": true},
            "ipam": {"dataDir": self.dir.join(&format!("ipam-h{}", i + 1)).to_string_lossy()},
        });
        let container_id = unique_name("ctr");
        let out = crate::cni::invoke(
            &self.hosts[i].ns,
            &crate::cni::flannel_plugin(),
            &crate::cni::our_cni_path(),
            &crate::cni::CniCall {
                command: "ADD",
                container_id: &container_id,
                pod_ns: pod_ns.name(),
                ifname: "eth0",
                stdin: &conf.to_string(),
            },
        );
        assert!(out.ok(), "flannel CNI ADD failed: {out:?}");
        let v = out.json();
        let addrs: Vec<&str> = v["ips"]
            .as_array()
            .expect("CNI result has IPs")
            .iter()
            .filter_map(|i| i["address"].as_str())
            .map(|a| a.split('/').next().unwrap_or(""))
            .collect();
        let ip: Ipv4Addr = addrs
            .iter()
            .find_map(|a| a.parse().ok())
            .unwrap_or(Ipv4Addr::UNSPECIFIED);
        let ip6 = addrs.iter().find_map(|a| a.parse().ok());
        self.pods.push(Pod {
            ns: pod_ns,
            ip,
            ip6,
            host: i,
            label,
        });
        self.pods.len() - 1
    }

    /// Whether pod `from` gets one ping answer from `to` (1 s timeout).
    pub fn ping(&self, from: usize, to: Ipv4Addr) -> bool {
        self.pods[from]
            .ns
            .exec("ping", &["-c", "1", "-W", "1", &to.to_string()])
            .status
            .success()
    }

    /// Whether pod `from` gets one ping answer from the IPv6 address `to`.
    pub fn ping6(&self, from: usize, to: std::net::Ipv6Addr) -> bool {
        self.pods[from]
            .ns
            .exec("ping", &["-6", "-c", "1", "-W", "1", &to.to_string()])
            .status
            .success()
    }

    /// Waits until pod `from` can ping the IPv6 address `to`; panics otherwise.
    pub fn wait_ping6(&self, from: usize, to: std::net::Ipv6Addr, timeout: Duration) {
        let what = format!("{} to reach {to}", self.pods[from].label);
        wait_for(timeout, &what, || self.ping6(from, to).then_some(()));
    }

    /// Waits (up to `timeout`) until pod `from` can ping `to`; panics otherwise.
    pub fn wait_ping(&self, from: usize, to: Ipv4Addr, timeout: Duration) {
        let what = format!("{} to reach {to}", self.pods[from].label);
        wait_for(timeout, &what, || self.ping(from, to).then_some(()));
    }

    /// Every (from, to) pair of pods on different hosts.
    pub fn cross_host_pairs(&self) -> Vec<(usize, usize)> {
        let n = self.pods.len();
        (0..n)
            .flat_map(|a| (0..n).map(move |b| (a, b)))
            .filter(|&(a, b)| self.pods[a].host != self.pods[b].host)
            .collect()
    }

    /// Sends `bytes` (iperf3 syntax, e.g. `20M`) over one TCP connection from pod `from` to
    /// pod `to`'s IPv4 or IPv6 address with iperf3 (retrying the connection until the server
    /// listens, up to `timeout`); returns the client's report. Panics if the transfer fails.
    pub fn tcp_transfer(
        &self,
        from: usize,
        to: usize,
        v6: bool,
        bytes: &str,
        timeout: Duration,
    ) -> String {
        let ip = if v6 {
            self.pods[to]
                .ip6
                .unwrap_or_else(|| panic!("{} has no IPv6 address", self.pods[to].label))
                .to_string()
        } else {
            self.pods[to].ip.to_string()
        };
        let mut server = self.pods[to]
            .ns
            .command("iperf3")
            .args(["-s", "-1"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("iperf3 (apt-get install iperf3)");
        let what = format!("{} to send {bytes} to {ip}", self.pods[from].label);
        let report = wait_for(timeout, &what, || {
            let out = self.pods[from].ns.exec(
                "iperf3",
                &["-c", &ip, "-n", bytes, "--connect-timeout", "2000"],
            );
            out.status
                .success()
                .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
        });
        let _ = server.kill();
        let _ = server.wait();
        report
    }

    /// Waits until every pod reaches every pod on other hosts.
    pub fn wait_full_mesh(&self, timeout: Duration) {
        for (a, b) in self.cross_host_pairs() {
            self.wait_ping(a, self.pods[b].ip, timeout);
        }
    }

    /// Waits until every pod reaches every pod on other hosts over IPv6 (dual-stack
    /// networks); panics if a pod has no IPv6 address.
    pub fn wait_full_mesh6(&self, timeout: Duration) {
        for (a, b) in self.cross_host_pairs() {
            let to = self.pods[b]
                .ip6
                .unwrap_or_else(|| panic!("{} has no IPv6 address", self.pods[b].label));
            self.wait_ping6(a, to, timeout);
        }
    }
}

/// Connects `ns` to the underlay bridge `br0` of `underlay`: a veth pair created directly inside
/// the two namespaces (nothing appears in the root namespace), `eth0` in `ns` with `cidr`, up.
pub fn plug_into_underlay(underlay: &NetNs, ns: &NetNs, peer: &str, cidr: &str) {
    let out = Command::new("ip")
        .args([
            "link",
            "add",
            "eth0",
            "netns",
            ns.name(),
            "type",
            "veth",
            "peer",
            "name",
            peer,
            "netns",
            underlay.name(),
        ])
        .output()
        .expect("ip link add");
    assert!(
        out.status.success(),
        "veth: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    underlay.ip(&["link", "set", peer, "master", "br0"]);
    underlay.ip(&["link", "set", peer, "up"]);
    ns.ip(&["addr", "add", cidr, "dev", "eth0"]);
    ns.ip(&["link", "set", "eth0", "up"]);
}

/// A background ping (5 per second) from a pod, for measuring loss while things change.
pub struct Pinger(std::process::Child);

impl Pinger {
    /// Starts `ping -i 0.2` from pod `from` to `to`; `count` pings, or until [`Pinger::finish`].
    pub fn start(c: &Cluster, from: usize, to: Ipv4Addr, count: Option<u32>) -> Self {
        let mut cmd = c.pods[from].ns.command("ping");
        // Quiet: only the summary is printed, so a long run never fills the unread pipe (a
        // blocked ping stops sending).
        cmd.args(["-q", "-i", "0.2", "-W", "1"]);
        if let Some(n) = count {
            cmd.args(["-c", &n.to_string()]);
        }
        let child = cmd
            .arg(to.to_string())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("ping");
        Pinger(child)
    }

    /// Stops the ping if it still runs (SIGINT, so it prints its summary) and returns the
    /// summary line (`N packets transmitted, M received, ...`).
    pub fn finish(mut self) -> String {
        if matches!(self.0.try_wait(), Ok(None)) {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(self.0.id() as i32, libc::SIGINT) };
        }
        let out = self.0.wait_with_output().expect("ping output");
        let text = String::from_utf8_lossy(&out.stdout);
        text.lines()
            .find(|l| l.contains("packets transmitted"))
            .unwrap_or("")
            .to_string()
    }
}

/// (sent, received) from a ping summary line.
pub fn ping_counts(summary: &str) -> (u64, u64) {
    let num = |needle: &str| {
        summary
            .split(',')
            .find(|p| p.contains(needle))
            .and_then(|p| p.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    (num("transmitted"), num("received"))
}

/// Runs `flanneld <args>` (a doctor run) in `ns`; returns the exit code and stdout + stderr.
pub fn run_doctor(ns: &NetNs, args: &[String], env: &[(&str, &str)]) -> (i32, String) {
    let mut cmd = ns.command(crate::binary("flanneld"));
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    run_command(&mut cmd)
}

/// Runs a doctor command line; returns the exit code and stdout (stderr appended).
fn run_command(cmd: &mut std::process::Command) -> (i32, String) {
    cmd.env_remove("RUST_LOG");
    let out = cmd.output().expect("run flanneld doctor");
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    let err = String::from_utf8_lossy(&out.stderr);
    if !err.is_empty() {
        text.push_str("\n--- stderr ---\n");
        text.push_str(&err);
    }
    (out.status.code().unwrap_or(-1), text)
}
