//! The test Kubernetes API server, kept honest by the real `kubectl` (Google Cloud SDK's
//! dispatcher picks kubectl 1.32 from the server's /version) and by a raw HTTP client that
//! checks the wire protocol: paging, watch streams, bookmarks, 410 Expired, errors.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use testbed::kubeapi::{kubelet_like_node, KubeTls, FLANNEL_USER};
use testbed::{wait_for, KubeApiOptions, KubeApiServer, TempDir};

const TIMEOUT: Duration = Duration::from_secs(20);

fn manifest() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../packaging/kube-flannel.yml")
}

/// A TLS server on loopback and a kubectl with a private HOME and kubeconfig.
struct Kube {
    server: KubeApiServer,
    dir: TempDir,
}

impl Kube {
    fn new(tag: &str) -> Self {
        let dir = TempDir::new(tag);
        let opts = KubeApiOptions {
            tls: Some(KubeTls::Generate(dir.join("pki"))),
            ..Default::default()
        };
        let server = KubeApiServer::start(None, "127.0.0.1:0".parse().unwrap(), opts);
        std::fs::create_dir_all(dir.join("home")).unwrap();
        server.write_kubeconfig(&dir.join("admin.kubeconfig"), KubeApiServer::ADMIN_TOKEN);
        server.write_kubeconfig(
            &dir.join("flannel.kubeconfig"),
            KubeApiServer::FLANNEL_TOKEN,
        );
        server.write_kubeconfig(&dir.join("bad.kubeconfig"), "not-a-valid-token");
        server.write_kubeconfig_client_cert(&dir.join("flannel-cert.kubeconfig"), FLANNEL_USER);
        Kube { server, dir }
    }

    fn command(&self, user: &str, args: &[&str]) -> Command {
        let mut c = Command::new("kubectl");
        c.env("HOME", self.dir.join("home"))
            .env_remove("KUBECONFIG")
            .arg("--kubeconfig")
            .arg(self.dir.join(&format!("{user}.kubeconfig")))
            .arg("--cache-dir")
            .arg(self.dir.join("home/cache"))
            .args(args);
        c
    }

    fn run_as(&self, user: &str, args: &[&str]) -> Output {
        self.command(user, args)
            .stdin(Stdio::null())
            .output()
            .expect("run kubectl")
    }

    /// Runs kubectl as admin and returns stdout, failing the test on a non-zero exit.
    fn ok(&self, args: &[&str]) -> String {
        ok_output(self.run_as("admin", args), args)
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.extend(["-o", "json"]);
        serde_json::from_str(&self.ok(&a)).expect("kubectl -o json output")
    }

    /// Runs kubectl as `user`, expecting failure; returns stderr.
    fn fails_as(&self, user: &str, args: &[&str]) -> String {
        let out = self.run_as(user, args);
        assert!(
            !out.status.success(),
            "kubectl {args:?} should have failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }
}

fn ok_output(out: Output, args: &[&str]) -> String {
    assert!(
        out.status.success(),
        "kubectl {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn condition_types(node: &Value) -> Vec<String> {
    node["status"]["conditions"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|c| c["type"].as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default()
}

fn ready_condition() -> Value {
    json!({"type": "Ready", "status": "True", "reason": "KubeletReady",
           "message": "kubelet is posting ready status",
           "lastHeartbeatTime": "2025-01-01T00:00:00Z", "lastTransitionTime": "2025-01-01T00:00:00Z"})
}

#[test]
fn kubectl_get_patch_delete_nodes() {
    let k = Kube::new("kube-nodes");
    let s = &k.server;
    s.create_node("n1", &["10.10.1.0/24"], &[("dummy", "value")]);
    s.update_node("n1", |n| {
        n["status"]["conditions"] = json!([ready_condition()])
    });
    s.create_node("n2", &["10.10.2.0/24", "fd00:10:2::/64"], &[]);
    s.create_node("n3", &[], &[]);

    let version = k.ok(&["version", "-o", "json"]);
    let version: Value = serde_json::from_str(&version).unwrap();
    assert_eq!(version["serverVersion"]["gitVersion"], "v1.32.6");
    assert!(
        version["clientVersion"]["minor"]
            .as_str()
            .unwrap()
            .starts_with("32"),
        "the dispatcher picks kubectl 1.32: {version}"
    );

    let table = k.ok(&["get", "nodes"]);
    let names: Vec<&str> = table
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(names, ["n1", "n2", "n3"], "{table}");

    let n1 = k.json(&["get", "node", "n1"]);
    let stored = s.node("n1").unwrap();
    assert_eq!(n1["kind"], "Node");
    assert_eq!(n1["apiVersion"], "v1");
    assert_eq!(
        n1["spec"],
        json!({"podCIDR": "10.10.1.0/24", "podCIDRs": ["10.10.1.0/24"]})
    );
    assert_eq!(n1["metadata"]["annotations"], json!({"dummy": "value"}));
    assert_eq!(
        n1["metadata"]["resourceVersion"],
        stored["metadata"]["resourceVersion"]
    );
    assert_eq!(n1["metadata"]["uid"], stored["metadata"]["uid"]);
    assert_eq!(n1, stored);
    let n2 = k.json(&["get", "node", "n2"]);
    assert_eq!(
        n2["spec"]["podCIDRs"],
        json!(["10.10.2.0/24", "fd00:10:2::/64"])
    );
    assert!(k.json(&["get", "node", "n3"])["spec"]
        .get("podCIDR")
        .is_none());
    let list = k.json(&["get", "nodes"]);
    assert_eq!(list["items"].as_array().unwrap().len(), 3);
    assert_eq!(
        k.ok(&[
            "get",
            "nodes",
            "-l",
            "kubernetes.io/hostname=n2",
            "-o",
            "name"
        ])
        .trim(),
        "node/n2"
    );

    // Strategic merge on nodes/status, as flannel does: conditions merge by type (Ready
    // stays), annotations merge, spec is kept even if the patch tries to change it.
    s.clear_requests();
    let patch = json!({
        "metadata": {"annotations": {"flannel.alpha.coreos.com/public-ip": "10.0.0.1"}},
        "spec": {"podCIDR": "10.99.0.0/24"},
        "status": {"conditions": [{"type": "NetworkUnavailable", "status": "False",
            "reason": "FlannelIsUp", "message": "Flannel is running on this node",
            "lastHeartbeatTime": "2025-01-01T00:00:01Z", "lastTransitionTime": "2025-01-01T00:00:01Z"}]},
    })
    .to_string();
    k.ok(&[
        "patch",
        "node",
        "n1",
        "--subresource=status",
        "--type=strategic",
        "-p",
        &patch,
    ]);
    let n1 = s.node("n1").unwrap();
    assert_eq!(condition_types(&n1), ["Ready", "NetworkUnavailable"]);
    assert_eq!(n1["status"]["conditions"][0], ready_condition());
    assert_eq!(n1["status"]["conditions"][1]["reason"], "FlannelIsUp");
    assert_eq!(
        n1["spec"]["podCIDR"], "10.10.1.0/24",
        "status updates keep spec"
    );
    assert_eq!(
        n1["metadata"]["annotations"],
        json!({"dummy": "value", "flannel.alpha.coreos.com/public-ip": "10.0.0.1"})
    );
    let reqs = s.requests();
    let p = reqs
        .iter()
        .find(|r| r.method == "PATCH")
        .expect("PATCH recorded");
    assert_eq!(p.path, "/api/v1/nodes/n1/status");
    assert_eq!(
        p.content_type.as_deref(),
        Some("application/strategic-merge-patch+json")
    );
    assert_eq!(p.user.as_deref(), Some("admin"));
    assert_eq!(p.status, 200);

    // A strategic patch of the node itself changes metadata/spec but not status.
    k.ok(&["patch", "node", "n1", "--type=strategic", "-p",
        r#"{"metadata":{"labels":{"role":"worker"}},"spec":{"unschedulable":true},"status":{"conditions":[{"type":"Ready","status":"False"}]}}"#]);
    let n1 = s.node("n1").unwrap();
    assert_eq!(n1["metadata"]["labels"]["role"], "worker");
    assert_eq!(n1["spec"]["unschedulable"], true);
    assert_eq!(
        n1["status"]["conditions"][0]["status"], "True",
        "main updates keep status"
    );

    // JSON merge patch on status: the conditions list is replaced as a whole.
    let before = s.node("n1").unwrap();
    k.ok(&[
        "patch",
        "node",
        "n1",
        "--subresource=status",
        "--type=merge",
        "-p",
        r#"{"status":{"conditions":[{"type":"NetworkUnavailable","status":"True"}]}}"#,
    ]);
    let n1 = s.node("n1").unwrap();
    assert_eq!(
        n1["status"]["conditions"],
        json!([{"type": "NetworkUnavailable", "status": "True"}])
    );
    let rv = |n: &Value| {
        n["metadata"]["resourceVersion"]
            .as_str()
            .unwrap()
            .parse::<u64>()
            .unwrap()
    };
    assert!(rv(&n1) > rv(&before));
    let mut rest = n1.clone();
    let mut rest_before = before.clone();
    for v in [&mut rest, &mut rest_before] {
        v["status"]["conditions"] = Value::Null;
        v["metadata"]["resourceVersion"] = Value::Null;
    }
    assert_eq!(rest, rest_before, "the merge patch changed nothing else");

    // JSON patch: exactly the listed operations.
    k.ok(&["patch", "node", "n1", "--type=json", "-p",
        r#"[{"op":"add","path":"/metadata/annotations/k","value":"v"},{"op":"remove","path":"/metadata/labels/role"},{"op":"replace","path":"/spec/unschedulable","value":false}]"#]);
    let n1 = s.node("n1").unwrap();
    assert_eq!(n1["metadata"]["annotations"]["k"], "v");
    assert!(n1["metadata"]["labels"].get("role").is_none());
    assert_eq!(n1["spec"]["unschedulable"], false);
    let err = k.fails_as(
        "admin",
        &[
            "patch",
            "node",
            "n1",
            "--type=json",
            "-p",
            r#"[{"op":"remove","path":"/metadata/labels/absent"}]"#,
        ],
    );
    assert!(err.contains("Invalid") || err.contains("invalid"), "{err}");
    let types: Vec<String> = s
        .requests()
        .iter()
        .filter(|r| r.method == "PATCH")
        .map(|r| {
            r.content_type
                .as_deref()
                .unwrap_or("")
                .split(';')
                .next()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(
        types,
        [
            "application/strategic-merge-patch+json",
            "application/strategic-merge-patch+json",
            "application/merge-patch+json",
            "application/json-patch+json",
            "application/json-patch+json"
        ]
    );

    k.ok(&["delete", "node", "n2"]);
    assert!(s.node("n2").is_none());
    let err = k.fails_as("admin", &["get", "node", "n2"]);
    assert!(err.contains(r#"nodes "n2" not found"#), "{err}");
    let err = k.fails_as("admin", &["delete", "node", "n2"]);
    assert!(err.contains("NotFound"), "{err}");
}

/// Parses kubectl's `-o json` watch output (one JSON document after another) on a thread.
fn json_stream(child: &mut Child) -> mpsc::Receiver<Value> {
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for v in serde_json::Deserializer::from_reader(stdout).into_iter::<Value>() {
            match v {
                Ok(v) => {
                    if tx.send(v).is_err() {
                        return;
                    }
                }
                Err(_) => return,
            }
        }
    });
    rx
}

fn next_event(rx: &mpsc::Receiver<Value>, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(v) if pred(&v) => return v,
            Ok(_) => {}
            Err(e) => panic!("waiting for {what}: {e}"),
        }
    }
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn kubectl_watch_sees_changes() {
    let k = Kube::new("kube-watch");
    let s = &k.server;
    s.create_node("old", &["10.10.1.0/24"], &[]);
    s.clear_requests();
    let mut child = KillOnDrop(
        k.command(
            "admin",
            &[
                "get",
                "nodes",
                "--watch",
                "--output-watch-events",
                "-o",
                "json",
            ],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn kubectl"),
    );
    let rx = json_stream(&mut child.0);
    let first = next_event(&rx, "ADDED old", |_| true);
    assert_eq!(first["type"], "ADDED");
    assert_eq!(first["object"]["metadata"]["name"], "old");
    assert_eq!(first["object"]["kind"], "Node");
    // Changes only after the watch request itself is open.
    wait_for(TIMEOUT, "kubectl's watch request", || {
        s.requests()
            .iter()
            .find(|r| r.is_watch() && r.status == 200)
            .map(|_| ())
    });
    s.create_node("new", &["10.10.9.0/24"], &[]);
    s.update_node("new", |n| n["metadata"]["labels"]["x"] = "y".into());
    s.delete_node("new");
    let named = |t: &'static str| {
        move |v: &Value| v["type"] == t && v["object"]["metadata"]["name"] == "new"
    };
    let added = next_event(&rx, "ADDED new", named("ADDED"));
    assert_eq!(added["object"]["spec"]["podCIDR"], "10.10.9.0/24");
    let modified = next_event(&rx, "MODIFIED new", named("MODIFIED"));
    assert_eq!(modified["object"]["metadata"]["labels"]["x"], "y");
    let deleted = next_event(&rx, "DELETED new", named("DELETED"));
    assert_eq!(deleted["object"]["metadata"]["name"], "new");
    let watch = s.requests().into_iter().find(|r| r.is_watch()).unwrap();
    assert_eq!(watch.path, "/api/v1/nodes");
    assert!(watch.query.contains("resourceVersion="), "{}", watch.query);
}

/// kubectl's human-readable output, cut into cells at the header's column starts (kubectl
/// aligns with a tabwriter, and cells such as OS-IMAGE contain spaces).
fn table_rows(out: &str) -> (Vec<String>, Vec<Vec<String>>) {
    let mut lines = out.lines().filter(|l| !l.trim().is_empty());
    let header = lines.next().unwrap_or_else(|| panic!("no header: {out:?}"));
    let mut starts = Vec::new();
    let mut prev = ' ';
    for (i, c) in header.char_indices() {
        // A column starts after two or more spaces (headers like NOMINATED NODE have one).
        if c != ' ' && (i == 0 || (prev == ' ' && header[..i].ends_with("  "))) {
            starts.push(i);
        }
        prev = c;
    }
    let cut = |l: &str| -> Vec<String> {
        (0..starts.len())
            .map(|j| {
                let end = starts.get(j + 1).copied().unwrap_or(l.len()).min(l.len());
                l.get(starts[j].min(l.len())..end)
                    .unwrap_or("")
                    .trim()
                    .to_string()
            })
            .collect()
    };
    (cut(header), lines.map(cut).collect())
}

fn row_named<'a>(rows: &'a [Vec<String>], name: &str, out: &str) -> &'a [String] {
    rows.iter()
        .find(|r| r[0] == name)
        .unwrap_or_else(|| panic!("no row {name}: {out}"))
}

#[test]
fn kubectl_prints_server_side_tables() {
    let k = Kube::new("kube-tables");
    let s = &k.server;
    s.create_object(kubelet_like_node(
        "worker-1",
        "10.244.1.0/24",
        std::net::Ipv4Addr::new(10, 0, 0, 11),
        &[],
    ));
    let mut cp = kubelet_like_node(
        "cp-1",
        "10.244.0.0/24",
        std::net::Ipv4Addr::new(10, 0, 0, 10),
        &[],
    );
    cp["metadata"]["labels"]["node-role.kubernetes.io/control-plane"] = "".into();
    cp["spec"]["unschedulable"] = true.into();
    s.create_object(cp);
    s.create_node("bare", &[], &[]);

    let out = k.ok(&["get", "nodes", "-o", "wide"]);
    let (header, rows) = table_rows(&out);
    assert_eq!(
        header,
        [
            "NAME",
            "STATUS",
            "ROLES",
            "AGE",
            "VERSION",
            "INTERNAL-IP",
            "EXTERNAL-IP",
            "OS-IMAGE",
            "KERNEL-VERSION",
            "CONTAINER-RUNTIME"
        ],
        "{out}"
    );
    let names: Vec<&str> = rows.iter().map(|r| r[0].as_str()).collect();
    assert_eq!(names, ["bare", "cp-1", "worker-1"], "{out}");
    let w = row_named(&rows, "worker-1", &out);
    assert_eq!(w[1], "Ready", "{out}");
    assert_eq!(w[2], "<none>", "{out}");
    assert!(
        w[3].ends_with('s') && w[3].trim_end_matches('s').parse::<u64>().is_ok(),
        "a fresh node's AGE is in seconds: {out}"
    );
    assert_eq!(
        &w[4..],
        [
            "v1.32.6",
            "10.0.0.11",
            "<none>",
            "Debian GNU/Linux 12 (bookworm)",
            "6.1.0-37-amd64",
            "containerd://1.7.24"
        ],
        "{out}"
    );
    let c = row_named(&rows, "cp-1", &out);
    assert_eq!(c[1], "Ready,SchedulingDisabled", "{out}");
    assert_eq!(c[2], "control-plane", "{out}");
    assert_eq!(c[5], "10.0.0.10", "{out}");
    let b = row_named(&rows, "bare", &out);
    assert_eq!(
        [&b[1], &b[2], &b[4], &b[5], &b[7]],
        ["Unknown", "<none>", "", "<none>", "<unknown>"],
        "{out}"
    );

    // Without -o wide kubectl drops the priority-1 columns.
    let out = k.ok(&["get", "nodes"]);
    let (header, rows) = table_rows(&out);
    assert_eq!(
        header,
        ["NAME", "STATUS", "ROLES", "AGE", "VERSION"],
        "{out}"
    );
    assert_eq!(row_named(&rows, "worker-1", &out)[1], "Ready");
    assert_eq!(row_named(&rows, "worker-1", &out)[4], "v1.32.6");
    // One node (a Table of one row), and a sorted list (which asks for whole objects).
    let out = k.ok(&["get", "node", "cp-1"]);
    let (header, rows) = table_rows(&out);
    assert_eq!(header[1], "STATUS", "{out}");
    assert_eq!(rows.len(), 1, "{out}");
    assert_eq!(
        rows[0][..3],
        ["cp-1", "Ready,SchedulingDisabled", "control-plane"]
    );
    let out = k.ok(&["get", "nodes", "--sort-by=.status.nodeInfo.kubeletVersion"]);
    let (header, rows) = table_rows(&out);
    assert_eq!(header[4], "VERSION", "{out}");
    assert_eq!(rows.len(), 3, "{out}");
    // Machine-readable output is unchanged: the object itself.
    let w = k.json(&["get", "node", "worker-1"]);
    assert_eq!(w["kind"], "Node");
    assert_eq!(w["status"]["nodeInfo"]["kubeletVersion"], "v1.32.6");

    // Pods.
    s.create_pod("kube-flannel", "kube-flannel-ds-abcde", "worker-1");
    let out = k.ok(&["get", "pods", "-A", "-o", "wide"]);
    let (header, rows) = table_rows(&out);
    assert_eq!(
        header,
        [
            "NAMESPACE",
            "NAME",
            "READY",
            "STATUS",
            "RESTARTS",
            "AGE",
            "IP",
            "NODE",
            "NOMINATED NODE",
            "READINESS GATES"
        ],
        "{out}"
    );
    assert_eq!(rows.len(), 1, "{out}");
    let p = &rows[0];
    assert_eq!(
        [&p[0], &p[1], &p[2], &p[3], &p[4], &p[6], &p[7]],
        [
            "kube-flannel",
            "kube-flannel-ds-abcde",
            "0/1",
            "Pending",
            "0",
            "<none>",
            "worker-1"
        ],
        "{out}"
    );

    // kubectl get -w: the list, then one-row Tables per event.
    let mut child = KillOnDrop(
        k.command("admin", &["get", "nodes", "--watch"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn kubectl"),
    );
    let stdout = child.0.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(stdout).lines() {
            let Ok(l) = l else { return };
            if tx.send(l).is_err() {
                return;
            }
        }
    });
    let next_line = |what: &str, pred: &dyn Fn(&str) -> bool| -> String {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(l) if pred(&l) => return l,
                Ok(_) => {}
                Err(e) => panic!("waiting for {what}: {e}"),
            }
        }
    };
    let header = next_line("the header", &|l| l.starts_with("NAME"));
    assert!(
        header.contains("STATUS") && header.contains("ROLES"),
        "{header}"
    );
    next_line("worker-1", &|l| l.starts_with("worker-1 "));
    wait_for(TIMEOUT, "kubectl's watch request", || {
        s.requests()
            .iter()
            .find(|r| r.is_watch() && r.status == 200)
            .map(|_| ())
    });
    s.create_object(kubelet_like_node(
        "late",
        "10.244.9.0/24",
        std::net::Ipv4Addr::new(10, 0, 0, 19),
        &[],
    ));
    let late = next_line("late", &|l| l.starts_with("late "));
    let cells: Vec<&str> = late.split_whitespace().collect();
    assert_eq!(cells[1..3], ["Ready", "<none>"], "{late}");
    assert_eq!(cells.last(), Some(&"v1.32.6"), "{late}");
}

#[test]
fn kubectl_creates_flannel_manifest() {
    let k = Kube::new("kube-manifest");
    let s = &k.server;
    let path = manifest();
    let path = path.to_str().unwrap();
    let rv = s.resource_version();
    // A server dry run on an empty cluster: the cluster-scoped objects pass, the namespaced
    // ones fail exactly as on a real server, because the namespace was not really created.
    let out = k.run_as(
        "admin",
        &["create", "--dry-run=server", "--validate=false", "-f", path],
    );
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    for obj in [
        "namespace/kube-flannel",
        "clusterrole.rbac.authorization.k8s.io/flannel",
        "clusterrolebinding.rbac.authorization.k8s.io/flannel",
    ] {
        assert!(
            stdout.contains(&format!("{obj} created (server dry run)")),
            "{stdout}"
        );
    }
    assert_eq!(
        stderr
            .matches(r#"namespaces "kube-flannel" not found"#)
            .count(),
        3,
        "{stderr}"
    );
    assert_eq!(s.resource_version(), rv, "a dry run stores nothing");
    let err = k.fails_as("admin", &["get", "namespace", "kube-flannel"]);
    assert!(
        err.contains(r#"namespaces "kube-flannel" not found"#),
        "{err}"
    );

    // With the namespace in place, every namespaced object passes the dry run.
    // (kubectl's typed generators such as `create namespace` send protobuf, which this server
    // does not decode; manifests are sent as JSON.)
    let ns_file = k.dir.join("ns.json");
    std::fs::write(
        &ns_file,
        r#"{"apiVersion":"v1","kind":"Namespace","metadata":{"name":"kube-flannel"}}"#,
    )
    .unwrap();
    k.ok(&[
        "create",
        "--validate=false",
        "-f",
        ns_file.to_str().unwrap(),
    ]);
    let rv = s.resource_version();
    let out = k.run_as(
        "admin",
        &["create", "--dry-run=server", "--validate=false", "-f", path],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    for obj in [
        "clusterrole.rbac.authorization.k8s.io/flannel",
        "clusterrolebinding.rbac.authorization.k8s.io/flannel",
        "serviceaccount/flannel",
        "configmap/kube-flannel-cfg",
        "daemonset.apps/kube-flannel-ds",
    ] {
        assert!(
            stdout.contains(&format!("{obj} created (server dry run)")),
            "{stdout}"
        );
    }
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains(r#"namespaces "kube-flannel" already exists"#));
    assert_eq!(s.resource_version(), rv, "a dry run stores nothing");
    k.ok(&["get", "namespace", "kube-flannel"]);
    let err = k.fails_as(
        "admin",
        &["get", "-n", "kube-flannel", "configmap", "kube-flannel-cfg"],
    );
    assert!(err.contains("NotFound"), "{err}");
    k.ok(&["delete", "namespace", "kube-flannel"]);

    let out = k.ok(&["create", "--validate=false", "-f", path]);
    assert_eq!(
        out.lines().filter(|l| l.ends_with(" created")).count(),
        6,
        "{out}"
    );
    let cm = k.json(&["get", "-n", "kube-flannel", "configmap", "kube-flannel-cfg"]);
    let conf: Value = serde_json::from_str(cm["data"]["net-conf.json"].as_str().unwrap()).unwrap();
    assert!(conf["Network"].is_string(), "{conf}");
    let ds = k.json(&["get", "-n", "kube-flannel", "daemonset", "kube-flannel-ds"]);
    assert_eq!(ds["kind"], "DaemonSet");
    assert_eq!(ds["metadata"]["namespace"], "kube-flannel");
    assert_eq!(
        ds["spec"]["template"]["spec"]["serviceAccountName"],
        "flannel"
    );
    let role = k.json(&["get", "clusterrole", "flannel"]);
    assert!(role["rules"]
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r["resources"] == json!(["nodes/status"])));
    k.ok(&["get", "clusterrolebinding", "flannel"]);
    k.ok(&["get", "-n", "kube-flannel", "serviceaccount", "flannel"]);

    let err = k.fails_as("admin", &["create", "--validate=false", "-f", path]);
    assert!(err.contains("AlreadyExists"), "{err}");
    assert!(
        err.contains(r#"daemonsets.apps "kube-flannel-ds" already exists"#),
        "{err}"
    );
    let cm_file = k.dir.join("cm.json");
    std::fs::write(
        &cm_file,
        r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"c","namespace":"nope"}}"#,
    )
    .unwrap();
    let err = k.fails_as(
        "admin",
        &[
            "create",
            "--validate=false",
            "-f",
            cm_file.to_str().unwrap(),
        ],
    );
    assert!(err.contains(r#"namespaces "nope" not found"#), "{err}");
}

#[test]
fn kubectl_auth_and_flannel_rbac() {
    let k = Kube::new("kube-rbac");
    let s = &k.server;
    s.create_node("n1", &["10.10.1.0/24"], &[]);
    s.create_pod("kube-flannel", "flannel-abc", "n1");

    // Discovery fails first: kubectl prints the generic 401 text (as against a real server)...
    let err = k.fails_as("bad", &["get", "nodes"]);
    assert!(
        err.contains("You must be logged in to the server")
            && (err.contains("Unauthorized") || err.contains("provide credentials")),
        "{err}"
    );
    // ...a direct request shows the Status reason.
    let err = k.fails_as("bad", &["get", "--raw", "/api/v1/nodes"]);
    assert!(err.contains("(Unauthorized)"), "{err}");

    let out = ok_output(k.run_as("flannel", &["get", "nodes", "-o", "name"]), &[]);
    assert_eq!(out.trim(), "node/n1");
    let pod = ok_output(
        k.run_as(
            "flannel",
            &[
                "get",
                "pod",
                "-n",
                "kube-flannel",
                "flannel-abc",
                "-o",
                "json",
            ],
        ),
        &[],
    );
    let pod: Value = serde_json::from_str(&pod).unwrap();
    assert_eq!(pod["spec"]["nodeName"], "n1");

    let patch = r#"{"metadata":{"annotations":{"flannel.alpha.coreos.com/backend-type":"vxlan"}}}"#;
    let err = k.fails_as("flannel", &["patch", "node", "n1", "-p", patch]);
    assert!(
        err.contains(r#"nodes "n1" is forbidden: User "system:serviceaccount:kube-flannel:flannel" cannot patch resource "nodes" in API group "" at the cluster scope"#),
        "{err}"
    );
    let err = k.fails_as("flannel", &["get", "pods", "-n", "kube-flannel"]);
    assert!(
        err.contains(
            r#"cannot list resource "pods" in API group "" in the namespace "kube-flannel""#
        ),
        "{err}"
    );
    let err = k.fails_as("flannel", &["delete", "node", "n1"]);
    assert!(
        err.contains("Forbidden") || err.contains("forbidden"),
        "{err}"
    );

    // kubectl reads nodes/n1/status before patching it, which the reference ClusterRole does
    // not grant (a real server refuses it the same way)...
    let err = k.fails_as(
        "flannel",
        &["patch", "node", "n1", "--subresource=status", "-p", patch],
    );
    assert!(
        err.contains(r#"nodes "n1" is forbidden: User "system:serviceaccount:kube-flannel:flannel" cannot get resource "nodes/status" in API group "" at the cluster scope"#),
        "{err}"
    );
    // ...while the PATCH itself, which is all flanneld sends, is allowed (over TLS, via curl).
    let out = Command::new("curl")
        .args(["-sS", "--fail-with-body", "--cacert"])
        .arg(s.ca_pem().unwrap())
        .args(["-X", "PATCH", "-H"])
        .arg(format!(
            "Authorization: Bearer {}",
            KubeApiServer::FLANNEL_TOKEN
        ))
        .args([
            "-H",
            "Content-Type: application/strategic-merge-patch+json",
            "--data",
            patch,
        ])
        .arg(format!("{}/api/v1/nodes/n1/status", s.url()))
        .output()
        .expect("run curl");
    let body = ok_output(out, &["curl"]);
    let patched: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        patched["metadata"]["annotations"]["flannel.alpha.coreos.com/backend-type"],
        "vxlan"
    );
    assert_eq!(
        s.node("n1").unwrap()["metadata"]["annotations"]["flannel.alpha.coreos.com/backend-type"],
        "vxlan"
    );
    let last = s.requests().pop().unwrap();
    assert_eq!(
        (
            last.method.as_str(),
            last.path.as_str(),
            last.user.as_deref(),
            last.status
        ),
        ("PATCH", "/api/v1/nodes/n1/status", Some(FLANNEL_USER), 200)
    );

    // Client-certificate authentication: CN is the user.
    s.clear_requests();
    let out = ok_output(
        k.run_as("flannel-cert", &["get", "nodes", "-o", "name"]),
        &[],
    );
    assert_eq!(out.trim(), "node/n1");
    let reqs = s.requests();
    let list = reqs.iter().find(|r| r.path == "/api/v1/nodes").unwrap();
    assert_eq!(list.user.as_deref(), Some(FLANNEL_USER));
    let err = k.fails_as("flannel-cert", &["patch", "node", "n1", "-p", patch]);
    assert!(err.contains("forbidden"), "{err}");
}

#[test]
fn server_in_network_namespace() {
    testbed::require_root();
    let ns = testbed::NetNs::new("kapi");
    let dir = TempDir::new("kube-netns");
    let opts = KubeApiOptions {
        tls: Some(KubeTls::Generate(dir.join("pki"))),
        ..Default::default()
    };
    let server = KubeApiServer::start(Some(&ns), "127.0.0.1:0".parse().unwrap(), opts);
    server.create_node("inside", &["10.10.1.0/24"], &[]);
    server.write_kubeconfig(&dir.join("kc"), KubeApiServer::ADMIN_TOKEN);
    // Reachable from inside the namespace (its own loopback).
    let mut c = ns.command("kubectl");
    c.env("HOME", dir.path())
        .arg("--kubeconfig")
        .arg(dir.join("kc"))
        .args(["get", "nodes", "-o", "name"]);
    let out = ok_output(c.output().unwrap(), &["get", "nodes"]);
    assert_eq!(out.trim(), "node/inside");
}

// ---------------------------------------------------------------------------------------------
// A raw HTTP/1.1 client: exact status codes, bodies and chunked watch streams.

fn connect(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_millis(200)))?;
    Ok(s)
}

fn send(
    s: &mut TcpStream,
    method: &str,
    target: &str,
    token: Option<&str>,
    body: Option<(&str, &str)>,
) -> std::io::Result<()> {
    let mut req =
        format!("{method} {target} HTTP/1.1\r\nHost: kube\r\nAccept: application/json\r\n");
    if let Some(t) = token {
        req.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    if let Some((ct, b)) = body {
        req.push_str(&format!(
            "Content-Type: {ct}\r\nContent-Length: {}\r\n",
            b.len()
        ));
    }
    req.push_str("\r\n");
    if let Some((_, b)) = body {
        req.push_str(b);
    }
    s.write_all(req.as_bytes())
}

/// A response being read: status, headers, then the body (content-length or chunked).
struct Resp {
    r: BufReader<TcpStream>,
    status: u16,
    chunked: bool,
    length: usize,
    pending: Vec<u8>,
    ended: bool,
}

fn read_line_until(r: &mut BufReader<TcpStream>, deadline: Instant) -> std::io::Result<String> {
    let mut line = Vec::new();
    loop {
        match r.read_until(b'\n', &mut line) {
            Ok(0) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "connection closed",
                ))
            }
            Ok(_) if line.ends_with(b"\n") => {
                return Ok(String::from_utf8_lossy(&line).trim_end().to_string())
            }
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                if Instant::now() > deadline {
                    return Err(e);
                }
            }
            Err(e) => return Err(e),
        }
    }
}

fn read_exact_until(
    r: &mut BufReader<TcpStream>,
    n: usize,
    deadline: Instant,
) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; n];
    let mut got = 0;
    while got < n {
        match r.read(&mut buf[got..]) {
            Ok(0) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "closed",
                ))
            }
            Ok(k) => got += k,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                if Instant::now() > deadline {
                    return Err(e);
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(buf)
}

impl Resp {
    fn read(s: TcpStream) -> std::io::Result<Resp> {
        let deadline = Instant::now() + TIMEOUT;
        let mut r = BufReader::new(s);
        let status_line = read_line_until(&mut r, deadline)?;
        let status = status_line
            .split_whitespace()
            .nth(1)
            .unwrap_or("0")
            .parse()
            .unwrap_or(0);
        let (mut chunked, mut length) = (false, 0);
        loop {
            let h = read_line_until(&mut r, deadline)?;
            if h.is_empty() {
                break;
            }
            let lower = h.to_ascii_lowercase();
            if lower.starts_with("transfer-encoding:") && lower.contains("chunked") {
                chunked = true;
            }
            if let Some(v) = lower.strip_prefix("content-length:") {
                length = v.trim().parse().unwrap_or(0);
            }
        }
        Ok(Resp {
            r,
            status,
            chunked,
            length,
            pending: Vec::new(),
            ended: false,
        })
    }

    /// The next chunk's data (None at the terminating chunk); Err if the stream breaks.
    fn chunk(&mut self, deadline: Instant) -> std::io::Result<Option<Vec<u8>>> {
        let size = read_line_until(&mut self.r, deadline)?;
        let size = usize::from_str_radix(size.split(';').next().unwrap().trim(), 16)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        let data = read_exact_until(&mut self.r, size + 2, deadline)?;
        if size == 0 {
            self.ended = true;
            return Ok(None);
        }
        Ok(Some(data[..size].to_vec()))
    }

    fn body(mut self) -> std::io::Result<Vec<u8>> {
        let deadline = Instant::now() + TIMEOUT;
        if !self.chunked {
            let n = self.length;
            return read_exact_until(&mut self.r, n, deadline);
        }
        let mut out = Vec::new();
        while let Some(c) = self.chunk(deadline)? {
            out.extend(c);
        }
        Ok(out)
    }

    /// The next watch event: Ok(None) when the server ended the stream cleanly.
    fn event(&mut self, timeout: Duration) -> std::io::Result<Option<Value>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(i) = self.pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.pending.drain(..=i).collect();
                return Ok(Some(
                    serde_json::from_slice(&line).expect("one JSON event per line"),
                ));
            }
            if self.ended {
                assert!(self.pending.is_empty(), "partial event at end of stream");
                return Ok(None);
            }
            if let Some(c) = self.chunk(deadline)? {
                self.pending.extend(c);
            }
        }
    }

    /// Reads to the end of the stream: true if it broke off (no terminating chunk).
    fn ends_abruptly(&mut self) -> bool {
        loop {
            match self.event(TIMEOUT) {
                Ok(Some(_)) => continue,
                Ok(None) => return false,
                Err(_) => return true,
            }
        }
    }

    fn expect_event(&mut self, what: &str) -> Value {
        match self.event(TIMEOUT) {
            Ok(Some(v)) => v,
            other => panic!("waiting for {what}: {other:?}"),
        }
    }
}

fn call(
    addr: SocketAddr,
    method: &str,
    target: &str,
    token: Option<&str>,
    body: Option<(&str, &str)>,
) -> std::io::Result<(u16, Value)> {
    let mut s = connect(addr)?;
    send(&mut s, method, target, token, body)?;
    let resp = Resp::read(s)?;
    let status = resp.status;
    let body = resp.body()?;
    let v = serde_json::from_slice(&body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into()));
    Ok((status, v))
}

fn get(addr: SocketAddr, target: &str, token: Option<&str>) -> std::io::Result<(u16, Value)> {
    call(addr, "GET", target, token, None)
}

fn admin_get(addr: SocketAddr, target: &str) -> (u16, Value) {
    get(addr, target, Some(KubeApiServer::ADMIN_TOKEN)).unwrap()
}

fn open_watch(addr: SocketAddr, target: &str) -> Resp {
    let mut s = connect(addr).unwrap();
    send(
        &mut s,
        "GET",
        target,
        Some(KubeApiServer::FLANNEL_TOKEN),
        None,
    )
    .unwrap();
    let r = Resp::read(s).unwrap();
    assert_eq!(r.status, 200, "watch {target}");
    assert!(r.chunked, "watch responses are chunked");
    r
}

fn plain_server() -> KubeApiServer {
    KubeApiServer::start(
        None,
        "127.0.0.1:0".parse().unwrap(),
        KubeApiOptions {
            bookmark_interval: Duration::from_secs(3600),
            ..Default::default()
        },
    )
}

fn rv_of(v: &Value) -> u64 {
    v["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn protocol_paging_watch_bookmarks_and_expiry() {
    let s = plain_server();
    let a = s.addr();
    for i in 0..25 {
        s.create_object(kubelet_like_node(
            &format!("node-{i:02}"),
            &format!("10.244.{i}.0/24"),
            std::net::Ipv4Addr::new(10, 0, 0, i as u8 + 1),
            &[],
        ));
    }

    // Paging: limit + continue, items without kind, one consistent resourceVersion.
    let (code, page) = admin_get(a, "/api/v1/nodes?limit=10");
    assert_eq!(code, 200);
    assert_eq!(page["kind"], "NodeList");
    assert_eq!(page["apiVersion"], "v1");
    let list_rv = rv_of(&page);
    assert_eq!(list_rv, s.resource_version());
    assert_eq!(page["metadata"]["remainingItemCount"], 15);
    let mut names = Vec::new();
    let mut page = page;
    loop {
        for it in page["items"].as_array().unwrap() {
            assert!(
                it.get("kind").is_none() && it.get("apiVersion").is_none(),
                "list items carry no kind"
            );
            names.push(it["metadata"]["name"].as_str().unwrap().to_string());
        }
        let Some(cont) = page["metadata"]["continue"].as_str().map(str::to_string) else {
            break;
        };
        assert_eq!(rv_of(&page), list_rv);
        let (code, next) = admin_get(a, &format!("/api/v1/nodes?limit=10&continue={cont}"));
        assert_eq!(code, 200);
        page = next;
    }
    let expected: Vec<String> = (0..25).map(|i| format!("node-{i:02}")).collect();
    assert_eq!(names, expected);
    let (_, first) = admin_get(a, "/api/v1/nodes?limit=10");
    let stale_continue = first["metadata"]["continue"].as_str().unwrap().to_string();

    // Watch from the list's version, kube-rs style (leading '&', "True"): only later changes,
    // with kind/apiVersion; bookmarks carry only the version.
    let mut w = open_watch(a, &format!("/api/v1/nodes?&watch=True&resourceVersion={list_rv}&allowWatchBookmarks=true&timeoutSeconds=60"));
    s.create_node("n-new", &["10.9.0.0/24"], &[]);
    let ev = w.expect_event("ADDED");
    assert_eq!(ev["type"], "ADDED");
    assert_eq!(ev["object"]["kind"], "Node");
    assert_eq!(ev["object"]["apiVersion"], "v1");
    assert_eq!(ev["object"]["metadata"]["name"], "n-new");
    s.heartbeat("node-03");
    let ev = w.expect_event("MODIFIED (heartbeat)");
    assert_eq!(ev["type"], "MODIFIED");
    assert_eq!(ev["object"]["metadata"]["name"], "node-03");
    s.bookmark_now();
    let ev = w.expect_event("BOOKMARK");
    assert_eq!(
        ev,
        json!({"type": "BOOKMARK", "object": {"kind": "Node", "apiVersion": "v1",
            "metadata": {"resourceVersion": s.resource_version().to_string()}}})
    );
    s.delete_node("n-new");
    let ev = w.expect_event("DELETED");
    assert_eq!(ev["type"], "DELETED");
    assert_eq!(rv_of(&ev["object"]), s.resource_version());

    // Watch from "0": every current object as ADDED first.
    let mut w0 = open_watch(a, "/api/v1/nodes?watch=1");
    let mut seen = Vec::new();
    for _ in 0..25 {
        let ev = w0.expect_event("initial ADDED");
        assert_eq!(ev["type"], "ADDED");
        seen.push(
            ev["object"]["metadata"]["name"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    assert_eq!(seen, expected);

    // Compaction: the open watch from before loses nothing it already had; a new watch or
    // continue from before gets 410 (HTTP 200 + ERROR event for watches).
    s.update_node("node-00", |n| n["metadata"]["labels"]["c"] = "1".into());
    assert_eq!(
        w.expect_event("MODIFIED before compaction")["type"],
        "MODIFIED"
    );
    s.compact();
    let mut old = open_watch(
        a,
        &format!("/api/v1/nodes?watch=true&resourceVersion={list_rv}"),
    );
    let ev = old.expect_event("ERROR 410");
    assert_eq!(ev["type"], "ERROR");
    let st = &ev["object"];
    assert_eq!(st["kind"], "Status");
    assert_eq!(st["apiVersion"], "v1");
    assert_eq!(st["status"], "Failure");
    assert_eq!(st["reason"], "Expired");
    assert_eq!(st["code"], 410);
    assert!(st["message"]
        .as_str()
        .unwrap()
        .starts_with(&format!("too old resource version: {list_rv} (")));
    assert!(
        matches!(old.event(TIMEOUT), Ok(None)),
        "the stream ends after the ERROR"
    );
    let (code, st) = admin_get(
        a,
        &format!("/api/v1/nodes?limit=10&continue={stale_continue}"),
    );
    assert_eq!((code, st["reason"].as_str()), (410, Some("Expired")));
    let now = s.resource_version();
    let mut fresh = open_watch(
        a,
        &format!("/api/v1/nodes?watch=true&resourceVersion={now}&allowWatchBookmarks=true"),
    );
    s.update_node("node-01", |n| n["metadata"]["labels"]["c"] = "2".into());
    assert_eq!(
        fresh.expect_event("MODIFIED after compaction")["object"]["metadata"]["name"],
        "node-01"
    );

    // drop_watches ends open streams abruptly (no terminating chunk).
    s.drop_watches();
    assert!(
        fresh.ends_abruptly(),
        "an abruptly dropped watch is an error, not a clean end"
    );
    assert!(w.ends_abruptly());

    // The server's timeout ends a watch cleanly.
    let now = s.resource_version();
    let mut short = open_watch(
        a,
        &format!("/api/v1/nodes?watch=true&resourceVersion={now}&timeoutSeconds=1"),
    );
    let t0 = Instant::now();
    match short.event(TIMEOUT) {
        Ok(None) => {}
        Ok(Some(ev)) => panic!("no change was made: {ev}"),
        Err(e) => panic!("the timeout should end the watch cleanly: {e}"),
    }
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
}

#[test]
fn protocol_errors_auth_and_faults() {
    let s = plain_server();
    let a = s.addr();
    s.create_node("n1", &["10.10.1.0/24"], &[]);
    let flannel = Some(KubeApiServer::FLANNEL_TOKEN);
    let admin = Some(KubeApiServer::ADMIN_TOKEN);

    // /version needs no credentials; the API does.
    let (code, v) = get(a, "/version", None).unwrap();
    assert_eq!(
        (code, v["minor"].as_str(), v["gitVersion"].as_str()),
        (200, Some("32"), Some("v1.32.6"))
    );
    let (code, st) = get(a, "/api/v1/nodes", None).unwrap();
    assert_eq!(code, 401);
    assert_eq!(
        st,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": "Unauthorized", "reason": "Unauthorized", "code": 401})
    );
    assert_eq!(get(a, "/api/v1/nodes", Some("wrong")).unwrap().0, 401);

    // Discovery.
    let (_, apis) = admin_get(a, "/apis");
    let groups: Vec<&str> = apis["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["name"].as_str().unwrap())
        .collect();
    assert!(groups.contains(&"apps") && groups.contains(&"rbac.authorization.k8s.io"));
    let (_, v1) = get(a, "/api/v1", flannel).unwrap();
    let res: Vec<&str> = v1["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    for r in [
        "nodes",
        "nodes/status",
        "pods",
        "namespaces",
        "configmaps",
        "serviceaccounts",
    ] {
        assert!(res.contains(&r), "{r} in {res:?}");
    }

    // RBAC shapes.
    let (code, st) = call(
        a,
        "PATCH",
        "/api/v1/nodes/n1",
        flannel,
        Some((
            "application/strategic-merge-patch+json",
            r#"{"metadata":{"labels":{"a":"b"}}}"#,
        )),
    )
    .unwrap();
    assert_eq!(code, 403);
    assert_eq!(st["reason"], "Forbidden");
    assert_eq!(st["details"], json!({"name": "n1", "kind": "nodes"}));
    assert_eq!(
        st["message"],
        r#"nodes "n1" is forbidden: User "system:serviceaccount:kube-flannel:flannel" cannot patch resource "nodes" in API group "" at the cluster scope"#
    );
    let (code, st) = call(
        a,
        "PUT",
        "/api/v1/nodes/n1/status",
        flannel,
        Some(("application/json", "{}")),
    )
    .unwrap();
    assert_eq!(code, 403);
    assert!(st["message"]
        .as_str()
        .unwrap()
        .contains(r#"cannot update resource "nodes/status""#));

    // Conflict on a stale resourceVersion, 415 for an unknown patch type, 404, 409 exists.
    let mut n1 = s.node("n1").unwrap();
    let stale = n1["metadata"]["resourceVersion"].clone();
    s.update_node("n1", |n| n["metadata"]["labels"]["moved"] = "on".into());
    n1["metadata"]["resourceVersion"] = stale;
    let (code, st) = call(
        a,
        "PUT",
        "/api/v1/nodes/n1",
        admin,
        Some(("application/json", &n1.to_string())),
    )
    .unwrap();
    assert_eq!((code, st["reason"].as_str()), (409, Some("Conflict")));
    assert!(st["message"].as_str().unwrap().starts_with(
        r#"Operation cannot be fulfilled on nodes "n1": the object has been modified"#
    ));
    let (code, st) = call(
        a,
        "PATCH",
        "/api/v1/nodes/n1/status",
        admin,
        Some(("application/apply-patch+yaml", "{}")),
    )
    .unwrap();
    assert_eq!(
        (code, st["reason"].as_str()),
        (415, Some("UnsupportedMediaType"))
    );
    let (code, st) = admin_get(a, "/api/v1/nodes/nope");
    assert_eq!(
        (code, st["reason"].as_str(), st["message"].as_str()),
        (404, Some("NotFound"), Some(r#"nodes "nope" not found"#))
    );
    assert_eq!(st["details"], json!({"name": "nope", "kind": "nodes"}));
    let (code, st) = call(
        a,
        "POST",
        "/api/v1/nodes",
        admin,
        Some((
            "application/json",
            r#"{"apiVersion":"v1","kind":"Node","metadata":{"name":"n1"}}"#,
        )),
    )
    .unwrap();
    assert_eq!((code, st["reason"].as_str()), (409, Some("AlreadyExists")));

    // A status patch without changes does not bump the version.
    let rv = s.resource_version();
    let (code, _) = call(
        a,
        "PATCH",
        "/api/v1/nodes/n1/status",
        flannel,
        Some((
            "application/merge-patch+json",
            r#"{"metadata":{"labels":{"moved":"on"}}}"#,
        )),
    )
    .unwrap();
    assert_eq!(code, 200);
    assert_eq!(s.resource_version(), rv);

    // Pods: flannel may get its pod.
    s.create_pod("kube-flannel", "p1", "n1");
    let (code, pod) = get(a, "/api/v1/namespaces/kube-flannel/pods/p1", flannel).unwrap();
    assert_eq!((code, pod["spec"]["nodeName"].as_str()), (200, Some("n1")));

    // Injected failures: counted on API requests (not /version), as Status objects.
    s.fail_next(2, 503);
    assert_eq!(get(a, "/version", None).unwrap().0, 200);
    let (code, st) = admin_get(a, "/api/v1/nodes");
    assert_eq!(
        (code, st["reason"].as_str(), st["kind"].as_str()),
        (503, Some("ServiceUnavailable"), Some("Status"))
    );
    assert_eq!(admin_get(a, "/api").0, 503);
    assert_eq!(admin_get(a, "/api/v1/nodes").0, 200);

    // Down: connection refused, open connections closed; up again on the same address.
    let mut w = open_watch(a, "/api/v1/nodes?watch=true");
    w.expect_event("ADDED n1");
    s.set_down(true);
    let e = connect(a).expect_err("connection refused while down");
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused);
    assert!(w.ends_abruptly(), "open watches are cut");
    s.set_down(false);
    assert_eq!(admin_get(a, "/api/v1/nodes/n1").0, 200);

    // The request log.
    let reqs = s.requests();
    let last = reqs.last().unwrap();
    assert_eq!(
        (last.method.as_str(), last.path.as_str(), last.status),
        ("GET", "/api/v1/nodes/n1", 200)
    );
    assert_eq!(last.user.as_deref(), Some("admin"));
    s.clear_requests();
    assert!(s.requests().is_empty());
}

#[test]
fn many_kubelet_nodes_list_quickly() {
    let s = plain_server();
    for i in 0..5000u32 {
        s.create_object(kubelet_like_node(
            &format!("node-{i:04}"),
            &format!("10.{}.{}.0/24", 100 + i / 256, i % 256),
            std::net::Ipv4Addr::from(0x0a00_0000 + i + 1),
            &[("flannel.alpha.coreos.com/kube-subnet-manager", "true")],
        ));
    }
    let t = Instant::now();
    let (code, list) = admin_get(s.addr(), "/api/v1/nodes");
    assert_eq!(code, 200);
    assert_eq!(list["items"].as_array().unwrap().len(), 5000);
    let size = serde_json::to_vec(&list).unwrap().len();
    assert!(size > 20_000_000, "{size}");
    assert!(
        t.elapsed() < Duration::from_secs(15),
        "full list took {:?}",
        t.elapsed()
    );
}
