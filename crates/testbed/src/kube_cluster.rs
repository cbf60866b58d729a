//! Kube-mode clusters: the test Kubernetes API server on host 1's underlay address, one Node
//! per host (named `h1`, `h2`, ...), and flanneld started as the DaemonSet starts it
//! (`--kube-subnet-mgr`, a kubeconfig with the flannel service account's token, `NODE_NAME`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::kubeapi::{kubelet_like_node, KubeApiOptions, KubeApiServer, KubeTls};
use crate::{Cluster, Flanneld};

/// Port of the test API server.
pub const KUBE_PORT: u16 = 6443;

/// The Node name of host `i`.
pub fn node_name(i: usize) -> String {
    format!("h{}", i + 1)
}

impl Cluster {
    /// `n` hosts with the API server (HTTPS, certificates made for the run) running on the
    /// first one; no Nodes yet.
    pub fn with_kube_api(n: usize) -> Self {
        Self::with_kube_api_opts(n, |_| {})
    }

    /// Like [`Self::with_kube_api`], letting `tune` change the server options.
    pub fn with_kube_api_opts(n: usize, tune: impl FnOnce(&mut KubeApiOptions)) -> Self {
        let mut c = Cluster::new(n);
        let mut opts = KubeApiOptions {
            tls: Some(KubeTls::Generate(c.dir.join("kube-tls"))),
            ..KubeApiOptions::default()
        };
        tune(&mut opts);
        let addr = SocketAddr::new(c.hosts[0].ip.into(), KUBE_PORT);
        c.kube = Some(KubeApiServer::start(Some(&c.hosts[0].ns), addr, opts));
        c
    }

    /// The API server (panics outside kube mode).
    pub fn kube(&self) -> &KubeApiServer {
        self.kube.as_ref().expect("cluster built with_kube_api")
    }

    /// Registers host `i`'s Node as a kubelet would (addresses, capacity, conditions, images)
    /// with these pod CIDRs (empty: not assigned yet).
    pub fn create_node(&self, i: usize, pod_cidrs: &[&str]) {
        let mut node = kubelet_like_node(&node_name(i), "", self.hosts[i].ip, &[]);
        let spec = &mut node["spec"];
        match pod_cidrs.first() {
            Some(first) => {
                spec["podCIDR"] = (*first).into();
                spec["podCIDRs"] = pod_cidrs.iter().map(|c| serde_json::json!(c)).collect();
            }
            None => {
                if let Some(m) = spec.as_object_mut() {
                    m.remove("podCIDR");
                    m.remove("podCIDRs");
                }
            }
        }
        self.kube().create_object(node);
    }

    /// Runs the real `kubectl` as the cluster admin (inside host 1, where the API server
    /// listens) and returns its output; panics if it fails.
    pub fn kubectl(&self, args: &[&str]) -> String {
        let home = self.dir.join("kubectl-home");
        let _ = std::fs::create_dir_all(&home);
        let kc = self.kubeconfig(KubeApiServer::ADMIN_TOKEN);
        let mut cmd = self.hosts[0].ns.command("kubectl");
        cmd.env("HOME", &home)
            .env_remove("KUBECONFIG")
            .arg("--kubeconfig")
            .arg(&kc)
            .arg("--cache-dir")
            .arg(home.join("cache"))
            .args(args);
        let out = cmd.output().expect("run kubectl");
        assert!(
            out.status.success(),
            "kubectl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Registers one Node per host, host `i` getting `<prefix>.<i+1>.0/24`.
    pub fn create_nodes(&self, prefix16: &str) {
        for i in 0..self.hosts.len() {
            self.create_node(i, &[&format!("{prefix16}.{}.0/24", i + 1)]);
        }
    }

    /// Writes net-conf.json (as the ConfigMap mounts it) and returns its path.
    pub fn write_net_conf(&self, json: &str) -> PathBuf {
        let p = self.dir.join("net-conf.json");
        std::fs::write(&p, json).expect("write net-conf.json");
        p
    }

    /// A kubeconfig for the API server with `token`.
    pub fn kubeconfig(&self, token: &str) -> PathBuf {
        let tag: usize = token.bytes().map(usize::from).sum();
        let p = self.dir.join(&format!("kubeconfig-{}-{tag}", token.len()));
        self.kube().write_kubeconfig(&p, token);
        p
    }

    /// A kubeconfig that logs in with the generated client certificate of `user`.
    pub fn kubeconfig_cert(&self, user: &str) -> PathBuf {
        let p = self
            .dir
            .join(&format!("kubeconfig-cert-{}", user.replace(':', "_")));
        self.kube().write_kubeconfig_client_cert(&p, user);
        p
    }

    /// The arguments the DaemonSet passes, pointed at this cluster, for host `i`.
    pub fn kube_args(&self, i: usize, token: &str) -> Vec<String> {
        vec![
            "--kube-subnet-mgr".into(),
            format!("--kubeconfig-file={}", self.kubeconfig(token).display()),
            format!(
                "--net-config-path={}",
                self.dir.join("net-conf.json").display()
            ),
            format!("--subnet-file={}", self.hosts[i].subnet_file.display()),
        ]
    }

    /// Starts flanneld in kube mode on host `i` (flannel service account, `NODE_NAME=h<i+1>`)
    /// and waits for its subnet.env.
    pub fn start_flanneld_kube(&mut self, i: usize, extra: &[&str]) -> String {
        let f = self.spawn_flanneld_kube(i, extra, &[]);
        self.hosts[i].flanneld = Some(f);
        let path = self.hosts[i].subnet_file.clone();
        self.hosts[i]
            .flanneld
            .as_mut()
            .expect("just started")
            .wait_subnet_env(&path, Duration::from_secs(60))
    }

    /// Runs `flanneld doctor` in Kubernetes mode on host `i`, with the daemon's flags plus `extra`.
    pub fn doctor_kube(&self, i: usize, extra: &[&str]) -> (i32, String) {
        let mut args = vec!["doctor".to_string()];
        args.extend(self.kube_args(i, KubeApiServer::FLANNEL_TOKEN));
        args.extend(extra.iter().map(|s| s.to_string()));
        let name = node_name(i);
        crate::cluster::run_doctor(&self.hosts[i].ns, &args, &[("NODE_NAME", name.as_str())])
    }

    /// Starts kube-mode flanneld on host `i` without waiting; `env` adds or overrides variables
    /// (`NODE_NAME` defaults to the host's node name; pass `("NODE_NAME", "")` to unset it).
    pub fn spawn_flanneld_kube(&self, i: usize, extra: &[&str], env: &[(&str, &str)]) -> Flanneld {
        let mut args = self.kube_args(i, KubeApiServer::FLANNEL_TOKEN);
        args.extend(extra.iter().map(|s| s.to_string()));
        let _ = std::fs::remove_file(&self.hosts[i].subnet_file);
        let name = node_name(i);
        let mut vars: Vec<(&str, &str)> = vec![("NODE_NAME", name.as_str())];
        for (k, v) in env {
            vars.retain(|(x, _)| x != k);
            vars.push((k, v));
        }
        Flanneld::start_env(&self.hosts[i].ns, self.dir.path(), &args, &vars)
    }
}
