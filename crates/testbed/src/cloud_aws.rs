//! A fake AWS for the aws-vpc tests: moto in server mode (with signature checks on) in its own
//! namespace on the cluster's underlay, and an instance metadata service per host.
//!
//! moto is driven with boto3 (`cloud_aws/ec2_world.py`), the real client, so the fake stays
//! honest; `cloud_aws/moto_server.py` adds what the real EC2 API has and moto lacks (blackhole
//! route states, the `route.state` filter). The metadata service is a small hyper server on a
//! thread inside a host's namespace, with IMDSv2 tokens unsupported, optional or required.

use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::sync::oneshot;

use crate::netns::NetNs;
use crate::{wait_for, TempDir};

const MOTO_SERVER_PY: &str = include_str!("cloud_aws/moto_server.py");
const EC2_WORLD_PY: &str = include_str!("cloud_aws/ec2_world.py");

/// The port moto listens on inside its namespace.
pub const MOTO_PORT: u16 = 5000;

/// The Python interpreter with moto and boto3 (`FRS_PYTHON`, else `python3`).
fn python() -> String {
    std::env::var("FRS_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// moto in server mode in namespace `aws` on the underlay bridge; killed on drop.
pub struct Moto {
    child: Option<Child>,
    /// Scratch space: the scripts and moto's log.
    pub dir: TempDir,
    /// The address moto listens on (on the underlay).
    pub ip: Ipv4Addr,
    /// The region the world is built in.
    pub region: String,
    /// Admin credentials (access key id, secret) for read-back, once [`Moto::setup`] ran.
    admin: Option<(String, String)>,
    /// The namespace moto runs in (dropped last).
    pub ns: NetNs,
}

impl Moto {
    /// Creates namespace `aws` with `eth0` = `ip`/24 on `underlay`'s bridge `br0` and starts moto
    /// there; returns once moto answers.
    pub fn start(underlay: &NetNs, ip: Ipv4Addr, region: &str) -> Self {
        let ns = NetNs::new("aws");
        crate::cluster::plug_into_underlay(underlay, &ns, "veth-aws", &format!("{ip}/24"));
        let dir = TempDir::new("moto");
        std::fs::write(dir.join("moto_server.py"), MOTO_SERVER_PY).expect("write moto_server.py");
        std::fs::write(dir.join("ec2_world.py"), EC2_WORLD_PY).expect("write ec2_world.py");
        let log = std::fs::File::create(dir.join("moto.log")).expect("moto log");
        let mut cmd = ns.command(python());
        cmd.arg(dir.join("moto_server.py"))
            .args(["-H", &ip.to_string(), "-p", &MOTO_PORT.to_string()])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log);
        let child = ns.spawn(cmd);
        let mut moto = Moto {
            child: Some(child),
            dir,
            ip,
            region: region.to_string(),
            admin: None,
            ns,
        };
        let ip_s = ip.to_string();
        wait_for(Duration::from_secs(60), "moto to answer", || {
            if let Some(c) = moto.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    panic!("moto exited ({st}):\n{}", moto.log());
                }
            }
            (!moto.ns.http_get(&ip_s, MOTO_PORT, "/moto-api/").is_empty()).then_some(())
        });
        moto
    }

    /// `http://<ip>:<port>`, for `AWS_ENDPOINT_URL_EC2`.
    pub fn endpoint(&self) -> String {
        format!("http://{}:{MOTO_PORT}", self.ip)
    }

    /// moto's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("moto.log")).unwrap_or_default()
    }

    fn world(&self, args: &[&str], creds: Option<&(String, String)>) -> Value {
        let mut cmd = self.ns.command(python());
        cmd.arg(self.dir.join("ec2_world.py"))
            .args(args)
            .env("AWS_ENDPOINT_URL", self.endpoint())
            .env("AWS_DEFAULT_REGION", &self.region)
            .env_remove("AWS_PROFILE")
            .env("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
            .env("AWS_CONFIG_FILE", "/nonexistent")
            .env("AWS_EC2_METADATA_DISABLED", "true");
        let (id, secret) = match creds {
            Some((i, s)) => (i.as_str(), s.as_str()),
            // Before signatures are checked any key will do.
            None => ("AKIDSETUP", "setup-secret"),
        };
        cmd.env("AWS_ACCESS_KEY_ID", id)
            .env("AWS_SECRET_ACCESS_KEY", secret)
            .stdin(Stdio::null());
        let out = cmd.output().expect("run ec2_world.py");
        assert!(
            out.status.success(),
            "ec2_world.py {} failed: {}\n--- moto log ---\n{}",
            args.first().unwrap_or(&""),
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "ec2_world.py output is not JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// Builds the world (see `ec2_world.py setup`) and turns signature checks on; returns the
    /// ids and credentials.
    pub fn setup(&mut self, args: &Value) -> Value {
        let state = self.world(&["setup", &args.to_string()], None);
        let admin = &state["admin"];
        self.admin = Some((
            admin["AccessKeyId"]
                .as_str()
                .expect("admin key")
                .to_string(),
            admin["SecretAccessKey"]
                .as_str()
                .expect("admin secret")
                .to_string(),
        ));
        state
    }

    /// Route tables (`{"tables": {rtb: [{dest, target, state}]}, "enis": {eni:
    /// {source_dest_check}}}`), read back with the admin's credentials.
    pub fn dump(&self) -> Value {
        self.world(&["dump"], self.admin.as_ref())
    }

    /// One boto3 call (`service`, snake_case `method`, keyword arguments) as the admin.
    pub fn call(&self, service: &str, method: &str, kwargs: &Value) -> Value {
        self.world(
            &["call", service, method, &kwargs.to_string()],
            self.admin.as_ref(),
        )
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- moto log ---\n{}", self.log());
        }
    }
}

/// How an instance metadata service treats IMDSv2 session tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tokens {
    /// An old service or proxy: `PUT /latest/api/token` is 405, reads need no token.
    Unsupported,
    /// Tokens are issued and accepted, reads without one work too (AWS's "optional").
    Optional,
    /// Reads without a valid token are 401 (AWS's `HttpTokens=required`).
    Required,
}

/// What one host's metadata service answers.
#[derive(Debug, Clone)]
pub struct ImdsConfig {
    /// `meta-data/instance-id`.
    pub instance_id: String,
    /// The region (in `placement/region` and the identity document).
    pub region: String,
    /// Whether `meta-data/placement/region` exists (else only the identity document has it).
    pub placement_region: bool,
    /// Token behaviour.
    pub tokens: Tokens,
    /// The instance profile: role name and its credentials document, if any.
    pub role: Option<(String, Value)>,
}

/// One request the metadata service saw.
#[derive(Debug, Clone)]
pub struct ImdsRequest {
    /// `GET`, `PUT`.
    pub method: String,
    /// The path.
    pub path: String,
    /// Whether a valid session token came with it.
    pub token: bool,
    /// The status answered.
    pub status: u16,
}

struct ImdsState {
    cfg: ImdsConfig,
    issued: Vec<String>,
    requests: Vec<ImdsRequest>,
}

/// An instance metadata service on a thread inside a host's namespace; stopped on drop.
pub struct ImdsServer {
    state: Arc<Mutex<ImdsState>>,
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl ImdsServer {
    /// Serves `cfg` on `addr` inside `ns`; returns once it listens.
    pub fn start(ns: &NetNs, addr: SocketAddr, cfg: ImdsConfig) -> Self {
        let state = Arc::new(Mutex::new(ImdsState {
            cfg,
            issued: vec![],
            requests: vec![],
        }));
        let ns_path = PathBuf::from(format!("/run/netns/{}", ns.name()));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let thread_state = state.clone();
        let thread = std::thread::Builder::new()
            .name("imds".into())
            .spawn(move || {
                enter_netns(&ns_path);
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
                    let _ = ready_tx.send(Ok(listener.local_addr().expect("local addr")));
                    let serve = async {
                        loop {
                            let Ok((io, _)) = listener.accept().await else {
                                continue;
                            };
                            let st = thread_state.clone();
                            tokio::spawn(async move {
                                let svc = hyper::service::service_fn(move |req| {
                                    let st = st.clone();
                                    async move { Ok::<_, Infallible>(answer(&st, req)) }
                                });
                                let _ = hyper::server::conn::http1::Builder::new()
                                    .serve_connection(TokioIo::new(io), svc)
                                    .await;
                            });
                        }
                    };
                    tokio::select! {
                        _ = serve => {}
                        _ = stop_rx => {}
                    }
                });
                drop(rt);
            })
            .expect("spawn imds thread");
        let addr = match ready_rx.recv() {
            Ok(Ok(a)) => a,
            Ok(Err(e)) => panic!("imds: bind {addr}: {e}"),
            Err(_) => panic!("imds thread died during start"),
        };
        ImdsServer {
            state,
            addr,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    /// `http://ip:port`, for `AWS_EC2_METADATA_SERVICE_ENDPOINT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<ImdsRequest> {
        self.state.lock().expect("imds state").requests.clone()
    }

    /// Forgets the requests seen so far.
    pub fn clear_requests(&self) {
        self.state.lock().expect("imds state").requests.clear();
    }
}

impl Drop for ImdsServer {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn enter_netns(path: &Path) {
    crate::netns::enter_netns(path)
        .unwrap_or_else(|e| panic!("entering network namespace {}: {e}", path.display()));
}

fn answer(state: &Mutex<ImdsState>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let mut st = state.lock().expect("imds state");
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let token = header("x-aws-ec2-metadata-token").is_some_and(|t| st.issued.contains(&t));
    let (status, body) = route(&mut st, &method, &path, token, header);
    st.requests.push(ImdsRequest {
        method: method.to_string(),
        path,
        token,
        status: status.as_u16(),
    });
    Response::builder()
        .status(status)
        .header("content-type", "text/plain")
        .body(Full::new(Bytes::from(body)))
        .expect("response")
}

fn route(
    st: &mut ImdsState,
    method: &Method,
    path: &str,
    token: bool,
    header: impl Fn(&str) -> Option<String>,
) -> (StatusCode, String) {
    let cfg = st.cfg.clone();
    if path == "/latest/api/token" {
        if cfg.tokens == Tokens::Unsupported || method != Method::PUT {
            return (StatusCode::METHOD_NOT_ALLOWED, String::new());
        }
        if header("x-aws-ec2-metadata-token-ttl-seconds").is_none() {
            return (StatusCode::BAD_REQUEST, String::new());
        }
        let t = format!("frs-imds-token-{}", st.issued.len() + 1);
        st.issued.push(t.clone());
        return (StatusCode::OK, t);
    }
    if method != Method::GET {
        return (StatusCode::METHOD_NOT_ALLOWED, String::new());
    }
    if cfg.tokens == Tokens::Required && !token {
        return (StatusCode::UNAUTHORIZED, String::new());
    }
    let doc = serde_json::json!({
        "accountId": "123456789012",
        "instanceId": cfg.instance_id,
        "region": cfg.region,
        "availabilityZone": format!("{}a", cfg.region),
    });
    let found = match path {
        "/latest/meta-data/instance-id" => Some(cfg.instance_id.clone()),
        "/latest/meta-data/placement/region" if cfg.placement_region => Some(cfg.region.clone()),
        "/latest/dynamic/instance-identity/document" => Some(doc.to_string()),
        "/latest/meta-data/iam/security-credentials/"
        | "/latest/meta-data/iam/security-credentials" => cfg.role.as_ref().map(|r| r.0.clone()),
        p => cfg.role.as_ref().and_then(|(name, creds)| {
            (p == format!("/latest/meta-data/iam/security-credentials/{name}"))
                .then(|| creds.to_string())
        }),
    };
    match found {
        Some(b) => (StatusCode::OK, b),
        None => (StatusCode::NOT_FOUND, String::new()),
    }
}
