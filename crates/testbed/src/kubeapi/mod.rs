//! A small Kubernetes API server for tests, speaking the real wire protocol (HTTP/1.1 JSON,
//! optional TLS, bearer tokens and client certificates, RBAC for the flannel identity,
//! discovery, list paging, chunked watch streams with bookmarks and 410 Expired, the three
//! PATCH flavours, the `nodes/status` subresource, and server-side printing: `meta.k8s.io` Tables
//! of nodes and pods for kubectl's human-readable `get`).
//!
//! It runs on its own thread with its own (single-threaded) tokio runtime, optionally inside a
//! network namespace, so that flanneld processes in other namespaces reach it over a test
//! underlay. State is changed either over HTTP or directly through the methods of
//! [`KubeApiServer`]; every change bumps the one global resourceVersion and wakes the watchers.

mod http;
mod objects;
mod patch;
mod store;
mod table;
mod tls;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::sync::{oneshot, watch};

pub use objects::kubelet_like_node;
pub use tls::{KubeTls, KubeTlsFiles};

use crate::NetNs;
use store::{State, NODES, PODS};

/// The user name of [`KubeApiServer::FLANNEL_TOKEN`] (and of the generated flannel client
/// certificate).
pub const FLANNEL_USER: &str = "system:serviceaccount:kube-flannel:flannel";
/// A user with a valid client certificate but no RBAC grants (every request is forbidden).
pub const NOBODY_USER: &str = "system:node:nobody";
/// The user name of [`KubeApiServer::ADMIN_TOKEN`].
pub const ADMIN_USER: &str = "admin";

/// How the server is set up.
#[derive(Debug, Clone)]
pub struct KubeApiOptions {
    /// Serve HTTPS with this material (None: plain HTTP).
    pub tls: Option<KubeTls>,
    /// How often watches that allow bookmarks get one (default 1 s).
    pub bookmark_interval: Duration,
    /// How long a watch lasts when the client gives no `timeoutSeconds` (default 5 min).
    pub watch_timeout: Duration,
    /// The minor version `/version` reports (default 32: v1.32).
    pub version_minor: u32,
}

impl Default for KubeApiOptions {
    fn default() -> Self {
        KubeApiOptions {
            tls: None,
            bookmark_interval: Duration::from_secs(1),
            watch_timeout: Duration::from_secs(300),
            version_minor: 32,
        }
    }
}

/// One API request as the server saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestRecord {
    /// `GET`, `PATCH`, ...
    pub method: String,
    /// The URL path.
    pub path: String,
    /// The raw query string ("" if none).
    pub query: String,
    /// The request's Content-Type header.
    pub content_type: Option<String>,
    /// The authenticated user (None: anonymous or rejected).
    pub user: Option<String>,
    /// The response status code.
    pub status: u16,
}

impl RequestRecord {
    /// True if this was a watch request (`watch=` query parameter true).
    pub fn is_watch(&self) -> bool {
        http::query_bool(&self.query, "watch").unwrap_or(false)
    }
}

pub(crate) struct Inner {
    pub state: Mutex<State>,
    pub opts: KubeApiOptions,
    pub addr: Mutex<Option<SocketAddr>>,
    /// The latest resourceVersion, for waking watchers.
    pub rv_tx: watch::Sender<u64>,
    pub bookmark_tx: watch::Sender<u64>,
    pub drop_watches_tx: watch::Sender<u64>,
    /// Bumped to close every connection.
    pub conn_epoch: watch::Sender<u64>,
    pub down_tx: watch::Sender<bool>,
    pub listening: AtomicBool,
    pub conns: AtomicUsize,
    pub fail: Mutex<(usize, u16)>,
    pub requests: Mutex<Vec<RequestRecord>>,
}

impl Inner {
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` on the state and wakes watchers if the version moved.
    pub fn mutate<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        let mut st = self.lock();
        let before = st.rv;
        let r = f(&mut st);
        let after = st.rv;
        drop(st);
        if after != before {
            self.rv_tx.send_replace(after);
        }
        r
    }
}

/// The test API server. Dropping it stops the server and closes every connection.
pub struct KubeApiServer {
    inner: Arc<Inner>,
    addr: SocketAddr,
    tls: Option<KubeTlsFiles>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

fn enter_netns(path: &Path) {
    crate::netns::enter_netns(path)
        .unwrap_or_else(|e| panic!("entering network namespace {}: {e}", path.display()));
}

impl KubeApiServer {
    /// Bearer token of user `admin` (group system:masters), who may do everything.
    pub const ADMIN_TOKEN: &'static str = "frs-admin-token-0123456789abcdef";
    /// Bearer token of `system:serviceaccount:kube-flannel:flannel`, allowed only what the
    /// reference ClusterRole grants: pods get; nodes get, list, watch; nodes/status patch.
    pub const FLANNEL_TOKEN: &'static str = "frs-flannel-token-0123456789abcdef";

    /// Starts serving on `addr` (port 0 = ephemeral) inside network namespace `ns` (None = the
    /// current one). Returns once the socket listens.
    pub fn start(ns: Option<&NetNs>, addr: SocketAddr, opts: KubeApiOptions) -> Self {
        let ns_path = ns.map(|n| PathBuf::from(format!("/run/netns/{}", n.name())));
        let tls = opts.tls.as_ref().map(|t| tls::material(t, addr.ip()));
        let tls_config = tls.as_ref().map(tls::server_config);
        let inner = Arc::new(Inner {
            state: Mutex::new(State::new()),
            opts,
            addr: Mutex::new(None),
            rv_tx: watch::Sender::new(0),
            bookmark_tx: watch::Sender::new(0),
            drop_watches_tx: watch::Sender::new(0),
            conn_epoch: watch::Sender::new(0),
            down_tx: watch::Sender::new(false),
            listening: AtomicBool::new(false),
            conns: AtomicUsize::new(0),
            fail: Mutex::new((0, 500)),
            requests: Mutex::new(Vec::new()),
        });
        let rv = inner.lock().rv;
        inner.rv_tx.send_replace(rv);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = oneshot::channel();
        let thread_inner = inner.clone();
        let thread = std::thread::Builder::new()
            .name("kube-apiserver".into())
            .spawn(move || {
                if let Some(p) = &ns_path {
                    enter_netns(p);
                }
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("tokio runtime");
                rt.block_on(async move {
                    let listener = match tokio::net::TcpListener::bind(addr).await {
                        Ok(l) => l,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    let local = listener.local_addr().expect("local addr");
                    *thread_inner.addr.lock().unwrap() = Some(local);
                    thread_inner.listening.store(true, Ordering::SeqCst);
                    let _ = ready_tx.send(Ok(local));
                    http::serve(thread_inner, listener, local, tls_config, stop_rx).await;
                });
                // Dropping the runtime cancels every connection task.
                drop(rt);
            })
            .expect("spawn kube-apiserver thread");
        let addr = match ready_rx.recv() {
            Ok(Ok(a)) => a,
            Ok(Err(e)) => panic!("kube-apiserver: bind {addr}: {e}"),
            Err(_) => panic!("kube-apiserver thread died during start"),
        };
        KubeApiServer {
            inner,
            addr,
            tls,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    /// `http://ip:port` or `https://ip:port`.
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The CA certificate clients must trust (None without TLS).
    pub fn ca_pem(&self) -> Option<PathBuf> {
        self.tls.as_ref().map(|t| t.ca.clone())
    }

    /// The TLS files in use (None without TLS).
    pub fn tls_files(&self) -> Option<&KubeTlsFiles> {
        self.tls.as_ref()
    }

    /// Writes a kubeconfig (current-context set) with this server, the CA if TLS, and the
    /// bearer token.
    pub fn write_kubeconfig(&self, path: &Path, token: &str) {
        self.write_config(path, &[("token", token.to_string())]);
    }

    /// Writes a kubeconfig that authenticates with a generated client certificate of `user`
    /// ([`ADMIN_USER`] or [`FLANNEL_USER`]); panics unless TLS material was generated.
    pub fn write_kubeconfig_client_cert(&self, path: &Path, user: &str) {
        let (_, cert, key) = self
            .tls
            .as_ref()
            .and_then(|t| t.clients.iter().find(|(u, _, _)| u == user))
            .unwrap_or_else(|| panic!("no generated client certificate for {user}"));
        self.write_config(
            path,
            &[
                ("client-certificate", cert.display().to_string()),
                ("client-key", key.display().to_string()),
            ],
        );
    }

    fn write_config(&self, path: &Path, user: &[(&str, String)]) {
        let q = |s: &str| serde_json::to_string(s).expect("quote");
        let mut text =
            String::from("apiVersion: v1\nkind: Config\nclusters:\n- name: frs\n  cluster:\n");
        text.push_str(&format!("    server: {}\n", q(&self.url())));
        if let Some(ca) = self.ca_pem() {
            text.push_str(&format!(
                "    certificate-authority: {}\n",
                q(&ca.display().to_string())
            ));
        }
        text.push_str("users:\n- name: frs-user\n  user:\n");
        for (k, v) in user {
            text.push_str(&format!("    {k}: {}\n", q(v)));
        }
        text.push_str(
            "contexts:\n- name: frs\n  context:\n    cluster: frs\n    user: frs-user\n\
             current-context: frs\npreferences: {}\n",
        );
        std::fs::write(path, text)
            .unwrap_or_else(|e| panic!("write kubeconfig {}: {e}", path.display()));
    }

    /// Creates a Node: `spec.podCIDR` = the first CIDR, `spec.podCIDRs` = all (empty slice: no
    /// podCIDR yet). Returns the stored object.
    pub fn create_node(
        &self,
        name: &str,
        pod_cidrs: &[&str],
        annotations: &[(&str, &str)],
    ) -> Value {
        let obj = objects::simple_node(name, pod_cidrs, annotations);
        self.inner
            .mutate(|st| st.create(NODES, "", obj, false))
            .map(|o| (*o).clone())
            .unwrap_or_else(|e| panic!("create node {name}: {}", e.message))
    }

    /// Stores any object of a served kind (Node, Pod, Namespace, ConfigMap, ...).
    pub fn create_object(&self, obj: Value) {
        let api_version = obj["apiVersion"].as_str().unwrap_or("").to_string();
        let kind = obj["kind"].as_str().unwrap_or("").to_string();
        let res = store::res_by_kind(&api_version, &kind)
            .unwrap_or_else(|| panic!("kind {api_version}/{kind} is not served"));
        let ns = obj
            .pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        if let Err(e) = self.inner.mutate(|st| st.create(res, &ns, obj, false)) {
            panic!("create {kind}: {}", e.message);
        }
    }

    /// The stored Node (with `kind`/`apiVersion`), if any.
    pub fn node(&self, name: &str) -> Option<Value> {
        self.inner
            .lock()
            .get(NODES, "", name)
            .map(|o| (**o).clone())
    }

    /// Every stored Node, by name.
    pub fn nodes(&self) -> Vec<Value> {
        self.inner
            .lock()
            .list(NODES, "", None)
            .into_iter()
            .map(|o| (*o).clone())
            .collect()
    }

    /// Changes a Node in place (spec, status and metadata alike); emits MODIFIED if anything
    /// changed. Panics if the node does not exist.
    pub fn update_node(&self, name: &str, f: impl FnOnce(&mut Value)) {
        self.inner
            .mutate(|st| {
                let mut obj = (**st
                    .get(NODES, "", name)
                    .ok_or_else(|| store::ApiError::not_found(&store::RESOURCES[NODES], name))?)
                .clone();
                f(&mut obj);
                if let Some(m) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
                    m.remove("resourceVersion");
                }
                // A direct write: spec and status both as given.
                st.update(NODES, "", name, obj, Some(store::RAW), false)
            })
            .unwrap_or_else(|e| panic!("update node {name}: {}", e.message));
    }

    /// Deletes a Node (emits DELETED); no-op if absent.
    pub fn delete_node(&self, name: &str) {
        let _ = self.inner.mutate(|st| st.delete(NODES, "", name, false));
    }

    /// What a kubelet status heartbeat changes (every condition's `lastHeartbeatTime`).
    pub fn heartbeat(&self, name: &str) {
        self.inner
            .mutate(|st| {
                let mut obj = (**st
                    .get(NODES, "", name)
                    .ok_or_else(|| store::ApiError::not_found(&store::RESOURCES[NODES], name))?)
                .clone();
                objects::heartbeat(&mut obj);
                st.update(NODES, "", name, obj, Some("status"), false)
            })
            .unwrap_or_else(|e| panic!("heartbeat {name}: {}", e.message));
    }

    /// Creates a Pod scheduled on `node_name` (the namespace is created if missing).
    pub fn create_pod(&self, namespace: &str, name: &str, node_name: &str) {
        self.inner
            .mutate(|st| {
                if st.get(store::NAMESPACES, "", namespace).is_none() {
                    st.create(
                        store::NAMESPACES,
                        "",
                        serde_json::json!({"metadata": {"name": namespace}}),
                        false,
                    )?;
                }
                st.create(
                    PODS,
                    namespace,
                    serde_json::json!({
                        "kind": "Pod", "apiVersion": "v1",
                        "metadata": {"name": name, "namespace": namespace},
                        "spec": {"nodeName": node_name, "containers": [
                            {"name": "main", "image": "docker.io/flannel/flannel:v0.27.0"}]},
                    }),
                    false,
                )
            })
            .unwrap_or_else(|e| panic!("create pod {namespace}/{name}: {}", e.message));
    }

    /// Forgets the event history: every watch (or continue token) from an older
    /// resourceVersion now gets 410 Expired.
    pub fn compact(&self) {
        self.inner.lock().compact();
    }

    /// Ends every open watch response abruptly (the connection is closed mid-stream).
    pub fn drop_watches(&self) {
        self.inner.drop_watches_tx.send_modify(|n| *n += 1);
    }

    /// Sends a BOOKMARK to every watch that allowed bookmarks.
    pub fn bookmark_now(&self) {
        self.inner.bookmark_tx.send_modify(|n| *n += 1);
    }

    /// The next `n` API requests (everything but /version and the health endpoints; discovery
    /// counts) get a `Status` error with this code.
    pub fn fail_next(&self, n: usize, code: u16) {
        *self.inner.fail.lock().unwrap() = (n, code);
    }

    /// Down: stop accepting and close every connection (clients get connection refused). Up:
    /// listen again on the same address. Returns once the change is in effect.
    pub fn set_down(&self, down: bool) {
        self.inner.down_tx.send_replace(down);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let listening = self.inner.listening.load(Ordering::SeqCst);
            let conns = self.inner.conns.load(Ordering::SeqCst);
            if listening != down && (!down || conns == 0) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "kube-apiserver did not go {}",
                if down { "down" } else { "up" }
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Every API request so far, in order.
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.inner.requests.lock().unwrap().clone()
    }

    /// Forgets the recorded requests.
    pub fn clear_requests(&self) {
        self.inner.requests.lock().unwrap().clear();
    }

    /// The current global resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.inner.lock().rv
    }
}

impl Drop for KubeApiServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
