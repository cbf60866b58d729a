//! The container image runs for real: the DaemonSet of `packaging/kube-flannel.yml` is played
//! by hand, the way a kubelet would, with podman on test hosts (network namespaces).
//!
//! Every container gets the manifest's `command` + `args`, env, securityContext and volume
//! mounts as written; hostPath volumes are directories under a per-host "root" temp dir,
//! the ConfigMap volume is materialized from the manifest's ConfigMap, and `hostNetwork` is the
//! test host's namespace. The image is `localhost/flannel-rs:dev`, built (or found current) by
//! `scripts/image.sh` through `testbed::podman::ensure_image`.
//!
//! flanneld's control plane ([`ControlPlane`]): in Kubernetes mode the kube-flannel container
//! runs with the manifest's exact args and env against the test API server, with in-cluster
//! credentials (`KUBERNETES_SERVICE_HOST`/`PORT`, the flannel service account's token and CA
//! mounted at `/var/run/secrets/kubernetes.io/serviceaccount`) and a Pod object per node, so
//! flanneld finds its node from `POD_NAME`/`POD_NAMESPACE` as in a real cluster. In etcd mode the
//! one argument `--kube-subnet-mgr` is swapped for `--etcd-endpoints=<the cluster's etcd>`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use serde_yaml::Value;
use testbed::cni::{CniCall, DEBIAN_CNI_PATH};
use testbed::kube_cluster::node_name;
use testbed::podman::{self, Container, Mount, PodIdentity, Security, ServiceAccount, Spec};
use testbed::{unique_name, wait_for, Cluster, KubeApiServer, NetNs, TempDir};

const T: Duration = Duration::from_secs(60);

struct Manifest {
    docs: Vec<Value>,
}

impl Manifest {
    fn load() -> Self {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../packaging/kube-flannel.yml"
        ))
        .unwrap();
        let docs = serde_yaml::Deserializer::from_str(&text)
            .map(|d| serde::Deserialize::deserialize(d).unwrap())
            .filter(|v: &Value| !v.is_null())
            .collect();
        Manifest { docs }
    }

    fn by_kind(&self, kind: &str) -> &Value {
        self.docs
            .iter()
            .find(|d| d["kind"].as_str() == Some(kind))
            .unwrap_or_else(|| panic!("no {kind} in the manifest"))
    }

    fn pod_spec(&self) -> &Value {
        &self.by_kind("DaemonSet")["spec"]["template"]["spec"]
    }

    fn init_containers(&self) -> Vec<&Value> {
        let init = self.pod_spec()["initContainers"].as_sequence().unwrap();
        init.iter().collect()
    }

    fn container(&self, name: &str) -> &Value {
        self.pod_spec()["containers"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|c| c["name"].as_str() == Some(name))
            .unwrap_or_else(|| panic!("no container {name}"))
    }

    /// The data of the ConfigMap called `name`.
    fn config_map(&self, name: &str) -> BTreeMap<String, String> {
        let cm = self
            .docs
            .iter()
            .find(|d| {
                d["kind"].as_str() == Some("ConfigMap")
                    && d["metadata"]["name"].as_str() == Some(name)
            })
            .unwrap_or_else(|| panic!("no ConfigMap {name}"));
        cm["data"]
            .as_mapping()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.as_str().unwrap().into(), v.as_str().unwrap().into()))
            .collect()
    }

    fn cfg(&self, key: &str) -> String {
        self.config_map("kube-flannel-cfg")[key].clone()
    }
}

fn strings(v: &Value) -> Vec<String> {
    v.as_sequence()
        .map(|s| s.iter().map(|a| a.as_str().unwrap().to_string()).collect())
        .unwrap_or_default()
}

/// Where flanneld learns about the cluster.
enum ControlPlane {
    /// The manifest as written (`--kube-subnet-mgr`), in-cluster credentials for the test API
    /// server at `host:port`.
    Kube {
        host: String,
        port: u16,
        sa: ServiceAccount,
    },
    /// flanneld's etcd mode: the manifest's `--kube-subnet-mgr` becomes `--etcd-endpoints`.
    Etcd(String),
}

impl ControlPlane {
    /// The test API server of `cluster` with the manifest's network, a Node per host
    /// (10.244.<i+1>.0/24) and the DaemonSet's Pod on each.
    fn kube(cluster: &Cluster, nodes: &[Node]) -> Self {
        let api = cluster.kube();
        cluster.create_nodes("10.244");
        for n in nodes {
            api.create_pod(
                &n.identity.namespace,
                &n.identity.name,
                &n.identity.node_name,
            );
        }
        let ca = std::fs::read_to_string(api.ca_pem().expect("TLS")).unwrap();
        ControlPlane::Kube {
            host: api.addr().ip().to_string(),
            port: api.addr().port(),
            sa: ServiceAccount::new(KubeApiServer::FLANNEL_TOKEN, &ca, "kube-flannel"),
        }
    }

    fn args(&self, manifest_args: &[String]) -> Vec<String> {
        match self {
            ControlPlane::Kube { .. } => manifest_args.to_vec(),
            ControlPlane::Etcd(url) => manifest_args
                .iter()
                .map(|a| match a.as_str() {
                    "--kube-subnet-mgr" => format!("--etcd-endpoints={url}"),
                    _ => a.clone(),
                })
                .collect(),
        }
    }

    /// The kube-flannel container as a kubelet would start it for this control plane.
    fn container(&self, spec: Spec) -> Spec {
        match self {
            ControlPlane::Kube { host, port, sa } => spec.in_cluster(sa, host, *port),
            ControlPlane::Etcd(_) => spec,
        }
    }
}

/// A Kubernetes node played by a test host: its network namespace and a directory standing
/// for its root file system (hostPath `/x/y` is `<root>/x/y`).
struct Node {
    root: TempDir,
    ns: Arc<NetNs>,
    identity: PodIdentity,
}

impl Node {
    fn new(ns: Arc<NetNs>, name: &str, host_ip: &str) -> Self {
        Node {
            root: TempDir::new(&format!("{name}-root")),
            ns,
            identity: PodIdentity {
                name: format!("kube-flannel-ds-{name}"),
                namespace: "kube-flannel".into(),
                node_name: name.into(),
                host_ip: host_ip.into(),
            },
        }
    }

    fn host_path(&self, path: &str) -> PathBuf {
        self.root.path().join(path.trim_start_matches('/'))
    }

    /// The host path of volume `name` (created like the kubelet does) and whether it is
    /// read-only by nature (configMap).
    fn volume(&self, m: &Manifest, name: &str) -> (PathBuf, bool) {
        let vol = m.pod_spec()["volumes"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|v| v["name"].as_str() == Some(name))
            .unwrap_or_else(|| panic!("no volume {name}"));
        if let Some(path) = vol["hostPath"]["path"].as_str() {
            let p = self.host_path(path);
            match vol["hostPath"]["type"].as_str().unwrap_or("") {
                "FileOrCreate" => {
                    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
                    if !p.exists() {
                        std::fs::write(&p, "").unwrap();
                    }
                }
                // "" (no check) and DirectoryOrCreate: a directory, as container engines
                // create a missing bind source.
                "" | "DirectoryOrCreate" => std::fs::create_dir_all(&p).unwrap(),
                other => panic!("hostPath type {other} not handled"),
            }
            (p, false)
        } else if let Some(cm) = vol["configMap"]["name"].as_str() {
            let dir = self.root.join(&format!(".configmaps/{name}"));
            std::fs::create_dir_all(&dir).unwrap();
            for (k, v) in m.config_map(cm) {
                std::fs::write(dir.join(k), v).unwrap();
            }
            (dir, true)
        } else {
            panic!("volume {name}: kind not handled: {vol:?}");
        }
    }

    /// A container of the manifest as this node's kubelet would run it (hostNetwork pod).
    fn spec(&self, m: &Manifest, c: &Value, args: &[String]) -> Spec {
        let image = c["image"].as_str().unwrap();
        assert!(
            image.contains("/flannel-rs:"),
            "the manifest runs the flannel-rs image: {image}"
        );
        assert_eq!(m.pod_spec()["hostNetwork"].as_bool(), Some(true));
        let name = c["name"].as_str().unwrap();
        let mut spec = Spec::new(name, podman::IMAGE)
            .command(&strings(&c["command"]))
            .args(args)
            .host_network(&self.ns);
        for e in c["env"].as_sequence().into_iter().flatten() {
            let key = e["name"].as_str().unwrap();
            let value = match (
                e["value"].as_str(),
                e["valueFrom"]["fieldRef"]["fieldPath"].as_str(),
            ) {
                (Some(v), _) => v.to_string(),
                (None, Some(field)) => self
                    .identity
                    .field(field)
                    .unwrap_or_else(|| panic!("fieldRef {field} not handled")),
                _ => panic!("env {key}: source not handled: {e:?}"),
            };
            spec = spec.env(key, &value);
        }
        for vm in c["volumeMounts"].as_sequence().into_iter().flatten() {
            let (host, ro) = self.volume(m, vm["name"].as_str().unwrap());
            let path = vm["mountPath"].as_str().unwrap();
            let ro = ro || vm["readOnly"].as_bool().unwrap_or(false);
            spec = spec.mount(if ro {
                Mount::ro(host, path)
            } else {
                Mount::rw(host, path)
            });
        }
        let sc = &c["securityContext"];
        let security = if sc["privileged"].as_bool() == Some(true) {
            Security::Privileged
        } else if sc["capabilities"]["add"].is_sequence() {
            Security::Caps(strings(&sc["capabilities"]["add"]))
        } else {
            Security::Default
        };
        spec.security(security)
    }

    /// Runs the init containers in order, each to a successful exit; returns their start times.
    fn run_init_containers(&self, m: &Manifest) -> Vec<Duration> {
        let mut starts = vec![];
        for c in m.init_containers() {
            let spec = self.spec(m, c, &strings(&c["args"]));
            let mut ctr = Container::run(&spec);
            starts.push(ctr.started_in());
            let code = ctr.wait_exit(T);
            assert_eq!(
                code,
                0,
                "init container {} failed:\n{}",
                c["name"].as_str().unwrap(),
                ctr.logs()
            );
        }
        starts
    }

    /// Checks what the init containers installed: a working CNI plugin and the ConfigMap's
    /// conflist.
    fn assert_cni_installed(&self, m: &Manifest) {
        let plugin = self.host_path("/opt/cni/bin/flannel");
        let meta = std::fs::metadata(&plugin).expect("flannel plugin installed");
        use std::os::unix::fs::PermissionsExt;
        assert!(meta.permissions().mode() & 0o111 != 0, "plugin executable");
        let out = testbed::cni::invoke(
            &self.ns,
            &plugin,
            DEBIAN_CNI_PATH,
            &CniCall {
                command: "VERSION",
                container_id: "",
                pod_ns: "",
                ifname: "",
                stdin: r#"{"cniVersion":"1.0.0"}"#,
            },
        );
        assert!(out.ok(), "{out:?}");
        assert!(out.stdout.contains("supportedVersions"), "{out:?}");
        let conflist =
            std::fs::read_to_string(self.host_path("/etc/cni/net.d/10-flannel.conflist"))
                .expect("conflist installed");
        assert_eq!(conflist, m.cfg("cni-conf.json"));
    }

    /// Attaches a pod namespace with the installed conflist (a chain: flannel, then portmap),
    /// as a container runtime does: the installed `flannel` first on CNI_PATH, Debian's bridge,
    /// host-local and portmap after it. Returns the pod's IPv4 address.
    fn attach_pod(&self, pod: &NetNs, runtime_config: &serde_json::Value) -> String {
        let list: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(self.host_path("/etc/cni/net.d/10-flannel.conflist")).unwrap(),
        )
        .unwrap();
        let bin_dir = self.host_path("/opt/cni/bin");
        let cni_path = format!("{}:{DEBIAN_CNI_PATH}", bin_dir.display());
        let id = unique_name("ctr");
        let mut prev: Option<serde_json::Value> = None;
        for plugin in list["plugins"].as_array().unwrap() {
            let mut conf = plugin.clone();
            conf["name"] = list["name"].clone();
            conf["cniVersion"] = list["cniVersion"].clone();
            let kind = plugin["type"].as_str().unwrap();
            if kind == "flannel" {
                // The plugin's default paths, under this node's root.
                conf["subnetFile"] =
                    json!(self.host_path("/run/flannel/subnet.env").to_string_lossy());
                conf["dataDir"] = json!(self.host_path("/var/lib/cni/flannel").to_string_lossy());
                conf["ipam"] =
                    json!({"dataDir": self.host_path("/var/lib/cni/networks").to_string_lossy()});
            }
            if let Some(caps) = plugin["capabilities"].as_object() {
                let rc: serde_json::Map<_, _> = caps
                    .iter()
                    .filter(|(_, on)| on.as_bool() == Some(true))
                    .filter_map(|(k, _)| Some((k.clone(), runtime_config.get(k)?.clone())))
                    .collect();
                conf["runtimeConfig"] = serde_json::Value::Object(rc);
            }
            if let Some(p) = &prev {
                conf["prevResult"] = p.clone();
            }
            let exe = std::env::split_paths(&cni_path)
                .map(|d| d.join(kind))
                .find(|p| p.exists())
                .unwrap_or_else(|| panic!("plugin {kind} not on {cni_path}"));
            let out = testbed::cni::invoke(
                &self.ns,
                &exe,
                &cni_path,
                &CniCall {
                    command: "ADD",
                    container_id: &id,
                    pod_ns: pod.name(),
                    ifname: "eth0",
                    stdin: &conf.to_string(),
                },
            );
            assert!(out.ok(), "{kind} ADD failed: {out:?}");
            prev = Some(out.json());
        }
        let result = prev.unwrap();
        result["ips"][0]["address"]
            .as_str()
            .unwrap()
            .split('/')
            .next()
            .unwrap()
            .to_string()
    }

    /// An HTTP GET from inside the node to `ip:port/path`, as a kubelet probe does.
    fn http_get(&self, ip: &str, port: u16, path: &str) -> String {
        self.ns.http_get(ip, port, path)
    }
}

fn ping(from: &NetNs, to: &str) -> bool {
    from.exec("ping", &["-c", "1", "-W", "1", to])
        .status
        .success()
}

fn nodes_of(cluster: &Cluster) -> Vec<Node> {
    cluster
        .hosts
        .iter()
        .enumerate()
        .map(|(i, h)| Node::new(h.ns.clone(), &node_name(i), &h.ip.to_string()))
        .collect()
}

#[test]
fn daemonset_as_written_in_kube_mode_connects_pods_across_hosts() {
    let t0 = Instant::now();
    podman::ensure_image();
    let image_ready = t0.elapsed();
    let m = Manifest::load();
    let cluster = Cluster::with_kube_api(2);
    let nodes = nodes_of(&cluster);
    let plane = ControlPlane::kube(&cluster, &nodes);
    run_daemonset(&m, &nodes, &plane, t0, image_ready);
    // flanneld announced each node as Go flannel does, from inside its container.
    for (i, n) in nodes.iter().enumerate() {
        let node = cluster.kube().node(&n.identity.node_name).unwrap();
        let a = &node["metadata"]["annotations"];
        assert_eq!(a["flannel.alpha.coreos.com/kube-subnet-manager"], "true");
        assert_eq!(a["flannel.alpha.coreos.com/backend-type"], "vxlan");
        assert_eq!(
            a["flannel.alpha.coreos.com/public-ip"],
            cluster.hosts[i].ip.to_string().as_str()
        );
    }
}

#[test]
fn daemonset_in_etcd_mode_connects_pods_across_hosts() {
    let t0 = Instant::now();
    podman::ensure_image();
    let image_ready = t0.elapsed();
    let m = Manifest::load();
    let cluster = Cluster::new(2);
    cluster.put_config(None, &m.cfg("net-conf.json"));
    let nodes = nodes_of(&cluster);
    let plane = ControlPlane::Etcd(cluster.etcd.url());
    let subnets = run_daemonset(&m, &nodes, &plane, t0, image_ready);
    // The leases outlive the stopped daemons (as on a DaemonSet rollout).
    for s in subnets {
        assert!(cluster.etcd.get(&testbed::lease_key(s, None)).is_some());
    }
}

/// The DaemonSet on every node: init containers, then kube-flannel; then a pod per node through
/// the installed CNI plugin, pinging across nodes; then SIGTERM. Returns the nodes' subnets.
fn run_daemonset(
    m: &Manifest,
    nodes: &[Node],
    plane: &ControlPlane,
    t0: Instant,
    image_ready: Duration,
) -> Vec<ipnet::Ipv4Net> {
    // Init containers, exactly as written: they install the plugin and the conflist.
    let mut starts = vec![];
    for n in nodes {
        starts.extend(n.run_init_containers(m));
        n.assert_cni_installed(m);
    }

    // The kube-flannel container on every node.
    let c = m.container("kube-flannel");
    let args = plane.args(&strings(&c["args"]));
    assert!(args.contains(&"--ip-masq".to_string()), "{args:?}");
    let mut flannelds: Vec<Container> = nodes
        .iter()
        .map(|n| Container::run(&plane.container(n.spec(m, c, &args))))
        .collect();
    starts.extend(flannelds.iter().map(|f| f.started_in()));
    let mut subnets = vec![];
    for (n, f) in nodes.iter().zip(flannelds.iter_mut()) {
        let env = n.host_path("/run/flannel/subnet.env");
        wait_for(T, &format!("{} to write subnet.env", f.name()), || {
            assert!(f.running(), "flanneld exited:\n{}", f.logs());
            env.exists().then_some(())
        });
        assert_eq!(testbed::env_value(&env, "FLANNEL_NETWORK"), "10.244.0.0/16");
        assert_eq!(testbed::env_value(&env, "FLANNEL_IPMASQ"), "true");
        subnets.push(testbed::env_subnet(&env));
    }
    assert_ne!(subnets[0], subnets[1]);

    // What flanneld did inside the node's namespace from its container, and its probes (the
    // manifest's port and paths, on the node's address as hostNetwork makes it).
    let port: u16 = args
        .iter()
        .find_map(|a| a.strip_prefix("--healthz-port="))
        .unwrap()
        .parse()
        .unwrap();
    for n in nodes {
        n.ns.ip(&["link", "show", "flannel.1"]);
        let nat =
            n.ns.run("iptables", &["-t", "nat", "-S", "FLANNEL-POSTRTG"]);
        assert!(nat.contains("MASQUERADE"), "{nat}");
        for probe in ["livenessProbe", "readinessProbe"] {
            let path = c[probe]["httpGet"]["path"].as_str().unwrap();
            let r = wait_for(T, &format!("{probe} {path} to answer 200"), || {
                let r = n.http_get(&n.identity.host_ip, port, path);
                r.starts_with("HTTP/1.1 200").then_some(r)
            });
            assert!(r.ends_with("flanneld is running") || r.ends_with("flanneld is ready"));
        }
    }

    // One pod per node through the installed plugin and conflist; a host port on the first.
    let pods: Vec<NetNs> = (0..nodes.len())
        .map(|i| NetNs::new(&format!("pod{}", i + 1)))
        .collect();
    let mappings =
        json!({"portMappings": [{"hostPort": 18080, "containerPort": 80, "protocol": "tcp"}]});
    let none = json!({});
    let ips: Vec<String> = nodes
        .iter()
        .zip(&pods)
        .enumerate()
        .map(|(i, (n, p))| n.attach_pod(p, if i == 0 { &mappings } else { &none }))
        .collect();
    for (n, ip) in nodes.iter().zip(&ips) {
        let subnet = testbed::env_subnet(&n.host_path("/run/flannel/subnet.env"));
        assert!(subnet.contains(&ip.parse::<std::net::Ipv4Addr>().unwrap()));
    }
    let dnat = nodes[0]
        .ns
        .run("iptables", &["-t", "nat", "-S", "CNI-HOSTPORT-DNAT"]);
    assert!(dnat.contains("CNI-DN-"), "portmap ran: {dnat}");
    for (a, b) in [(0, 1), (1, 0)] {
        wait_for(T, &format!("pod{} to reach {}", a + 1, ips[b]), || {
            ping(&pods[a], &ips[b]).then_some(())
        });
    }

    // SIGTERM: flanneld exits 0.
    for f in flannelds.iter_mut() {
        assert_eq!(f.stop(Duration::from_secs(10)), 0, "{}", f.logs());
    }
    eprintln!(
        "timings: image ensured in {image_ready:.1?}; container starts {:?}; test {:.1?}",
        starts
            .iter()
            .map(|d| format!("{:.0}ms", d.as_secs_f64() * 1000.0))
            .collect::<Vec<_>>(),
        t0.elapsed()
    );
    subnets
}

/// Prints what a kube-mode flanneld would read: the service account, the API address, the
/// downward-API env; then checks the credentials are read-only.
const REPORT: &str = r#"cd /var/run/secrets/kubernetes.io/serviceaccount
printf '%s|%s|%s|%s:%s|%s|%s|%s|%s\n' "$(cat token)" "$(cat namespace)" "$(cat ca.crt)" \
  "$KUBERNETES_SERVICE_HOST" "$KUBERNETES_SERVICE_PORT" "$POD_NAME" "$POD_NAMESPACE" "$NODE_NAME" \
  "$EVENT_QUEUE_DEPTH"
touch x 2>/dev/null || echo read-only"#;

#[test]
fn in_cluster_credentials_and_downward_env_reach_the_container() {
    podman::ensure_image();
    let ns = Arc::new(NetNs::new("incl"));
    let node = Node::new(ns.clone(), "node1", "192.0.2.10");
    let sa = ServiceAccount::new("tok-123", "-----BEGIN CERTIFICATE-----\n", "kube-flannel");
    let m = Manifest::load();
    let c = m.container("kube-flannel");
    // The kube-flannel container's spec (env from the manifest, mounts, caps), with the
    // in-cluster plumbing the --kube-subnet-mgr mode will need; the command only reports.
    let spec = node
        .spec(&m, c, &[])
        .command(&["sh", "-c", REPORT])
        .env("NODE_NAME", &node.identity.node_name)
        .in_cluster(&sa, "192.0.2.1", 6443);
    let mut ctr = Container::run(&spec);
    assert_eq!(ctr.wait_exit(T), 0, "{}", ctr.logs());
    assert_eq!(
        ctr.logs(),
        "tok-123|kube-flannel|-----BEGIN CERTIFICATE-----|192.0.2.1:6443|kube-flannel-ds-node1|kube-flannel|node1|5000\nread-only\n"
    );
    assert!(Path::new(sa.path()).join("token").exists());
}
