//! A real etcd server (Debian's `etcd-server`) inside a test namespace, and `etcdctl` access.

use std::process::{Child, Stdio};
use std::sync::Arc;
use std::time::Duration;

use crate::netns::NetNs;
use crate::tls::TlsFiles;
use crate::{wait_for, TempDir};

/// An etcd member listening on 127.0.0.1 inside a namespace; killed and wiped on drop.
pub struct Etcd {
    ns: Arc<NetNs>,
    dir: TempDir,
    child: Option<Child>,
    port: u16,
    listen_ip: String,
    tls: Option<TlsFiles>,
    user: Option<(String, String)>,
}

impl Etcd {
    /// Starts a plain-HTTP etcd on 127.0.0.1:2379 in `ns` and waits until it answers.
    pub fn start(ns: &Arc<NetNs>) -> Self {
        Self::start_with(ns, 2379, None)
    }

    /// Starts etcd on `port`; with `tls` it requires client certificates signed by the CA.
    pub fn start_with(ns: &Arc<NetNs>, port: u16, tls: Option<TlsFiles>) -> Self {
        Self::start_on(ns, "127.0.0.1", port, tls)
    }

    /// Starts etcd listening on `listen_ip:port` (other hosts reach it over the underlay).
    pub fn start_on(ns: &Arc<NetNs>, listen_ip: &str, port: u16, tls: Option<TlsFiles>) -> Self {
        let mut e = Etcd {
            ns: ns.clone(),
            dir: TempDir::new("etcd"),
            child: None,
            port,
            listen_ip: listen_ip.to_string(),
            tls,
            user: None,
        };
        e.launch();
        e
    }

    /// Writes many keys quickly through etcd's JSON gateway on one keep-alive connection
    /// (plain-HTTP etcd only), instead of one `etcdctl` process per key.
    pub fn put_many(&self, kvs: &[(String, String)]) {
        assert!(self.tls.is_none(), "put_many needs a plain-HTTP etcd");
        let mut conn = crate::bench::HttpConn::connect(&self.ns, &self.listen_ip, self.port)
            .expect("connect to etcd");
        for (k, v) in kvs {
            let body = format!(
                r#"{{"key":"{}","value":"{}"}}"#,
                crate::bench::base64(k.as_bytes()),
                crate::bench::base64(v.as_bytes())
            );
            let (status, resp) = conn
                .request("POST", "/v3/kv/put", Some(body.as_bytes()))
                .expect("etcd put");
            assert_eq!(status, 200, "{}", String::from_utf8_lossy(&resp));
        }
    }

    /// The client URL flanneld should use.
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}:{}", self.listen_ip, self.port)
    }

    fn launch(&mut self) {
        let url = self.url();
        let mut cmd = self.ns.command("etcd");
        cmd.args([
            "--name",
            "frs",
            "--data-dir",
            &self.dir.join("data").to_string_lossy(),
            "--listen-client-urls",
            &url,
            "--advertise-client-urls",
            &url,
            "--listen-peer-urls",
            &format!("http://127.0.0.1:{}", self.port + 1),
            "--initial-advertise-peer-urls",
            &format!("http://127.0.0.1:{}", self.port + 1),
            "--initial-cluster",
            &format!("frs=http://127.0.0.1:{}", self.port + 1),
        ]);
        if let Some(t) = &self.tls {
            cmd.args([
                "--client-cert-auth",
                "--trusted-ca-file",
                &t.ca.to_string_lossy(),
                "--cert-file",
                &t.server_cert.to_string_lossy(),
                "--key-file",
                &t.server_key.to_string_lossy(),
            ]);
        }
        let log = std::fs::File::create(self.dir.join("etcd.log")).expect("etcd log");
        cmd.stdout(Stdio::null()).stderr(log).stdin(Stdio::null());
        self.child = Some(self.ns.spawn(cmd));
        wait_for(Duration::from_secs(20), "etcd to answer", || {
            let out = self.ctl_output(&["endpoint", "health"]);
            out.status.success().then_some(())
        });
    }

    /// Stops the server (SIGKILL), keeping its data.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Freezes (SIGSTOP) or thaws (SIGCONT) the server: it keeps its connections but answers
    /// nothing while frozen.
    pub fn freeze(&self, frozen: bool) {
        if let Some(c) = &self.child {
            let sig = if frozen { libc::SIGSTOP } else { libc::SIGCONT };
            // SAFETY: sending a signal to our own child has no memory-safety preconditions.
            unsafe {
                libc::kill(c.id() as i32, sig);
            }
        }
    }

    /// Starts the server again on the same data directory.
    pub fn restart(&mut self) {
        self.stop();
        self.launch();
    }

    /// Turns on authentication with a `root` user and this password; later `ctl` calls use it.
    pub fn enable_auth(&mut self, password: &str) {
        self.ctl(&["user", "add", &format!("root:{password}")]);
        self.ctl(&["auth", "enable"]);
        self.user = Some(("root".into(), password.into()));
    }

    fn ctl_output(&self, args: &[&str]) -> std::process::Output {
        let mut cmd = self.ns.command("etcdctl");
        cmd.env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", self.url()))
            .arg("--command-timeout=5s");
        if let Some(t) = &self.tls {
            cmd.arg(format!("--cacert={}", t.ca.display()))
                .arg(format!("--cert={}", t.client_cert.display()))
                .arg(format!("--key={}", t.client_key.display()));
        }
        if let Some((u, p)) = &self.user {
            cmd.arg(format!("--user={u}:{p}"));
        }
        cmd.args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run etcdctl")
    }

    /// Runs etcdctl; panics with its error output on failure; returns stdout.
    pub fn ctl(&self, args: &[&str]) -> String {
        let out = self.ctl_output(args);
        assert!(
            out.status.success(),
            "etcdctl {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Writes a key (without a lease).
    pub fn put(&self, key: &str, value: &str) {
        self.ctl(&["put", key, value]);
    }

    /// Deletes a key.
    pub fn del(&self, key: &str) {
        self.ctl(&["del", key]);
    }

    /// The value of a key, if present.
    pub fn get(&self, key: &str) -> Option<String> {
        let out = self.ctl(&["get", key, "--print-value-only"]);
        let v = out.strip_suffix('\n').unwrap_or(&out);
        (!out.is_empty()).then(|| v.to_string())
    }

    /// The keys under a prefix, sorted.
    pub fn keys(&self, prefix: &str) -> Vec<String> {
        let out = self.ctl(&["get", prefix, "--prefix", "--keys-only"]);
        let mut keys: Vec<String> = out
            .lines()
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect();
        keys.sort();
        keys
    }

    /// The etcd lease id attached to a key (0 = none, i.e. a reservation).
    pub fn lease_id(&self, key: &str) -> i64 {
        let out = self.ctl(&["get", key, "-w", "json"]);
        let v: serde_json::Value = serde_json::from_str(&out).expect("etcdctl json");
        v["kvs"][0]["lease"].as_i64().unwrap_or(0)
    }

    /// Remaining TTL in seconds of the lease attached to a key.
    pub fn ttl(&self, key: &str) -> i64 {
        let id = self.lease_id(key);
        assert_ne!(id, 0, "{key} has no lease");
        let out = self.ctl(&["lease", "timetolive", &format!("{id:x}"), "-w", "json"]);
        let v: serde_json::Value = serde_json::from_str(&out).expect("etcdctl json");
        v["ttl"].as_i64().expect("ttl")
    }

    /// The current store revision.
    pub fn revision(&self) -> i64 {
        let out = self.ctl(&[
            "get",
            "/",
            "--prefix",
            "--keys-only",
            "-w",
            "json",
            "--limit=1",
        ]);
        let v: serde_json::Value = serde_json::from_str(&out).expect("etcdctl json");
        v["header"]["revision"].as_i64().expect("revision")
    }

    /// Compacts the history up to the current revision.
    pub fn compact(&self) {
        let rev = self.revision();
        self.ctl(&["compact", &rev.to_string(), "--physical"]);
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
    }
}
