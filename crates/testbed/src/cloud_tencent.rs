//! A fake Tencent Cloud for the `tencent-vpc` backend's tests: the instance metadata service
//! (`/latest/meta-data/...`, answering per calling host) and the VPC API 3.0 (`POST /`,
//! `X-TC-Action`, TC3-HMAC-SHA256 signatures checked like the real service), with a route
//! table that tests read back and fault injection. Its wire protocol is exercised with the
//! provider's own Python SDK in the tests, so it cannot drift from the real API.
//!
//! Also home of [`HttpFake`], the small in-namespace HTTP server the cloud fakes share, and
//! [`cloud_host`], a namespace on a cluster's underlay for them.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::sync::oneshot;

use crate::netns::NetNs;

/// One request as a fake sees it.
#[derive(Debug, Clone)]
pub struct FakeRequest {
    /// Who called (the host's underlay address).
    pub peer: IpAddr,
    /// The local port it arrived on.
    pub port: u16,
    /// HTTP method.
    pub method: String,
    /// Path without the query.
    pub path: String,
    /// The raw query string ("" if none).
    pub query: String,
    /// Headers, names lower-cased (last value wins).
    pub headers: BTreeMap<String, String>,
    /// The whole body.
    pub body: Bytes,
}

impl FakeRequest {
    /// A header's value, or "".
    pub fn header(&self, name: &str) -> &str {
        self.headers.get(name).map(String::as_str).unwrap_or("")
    }
}

/// A fake's answer: status, content type, body.
pub type FakeResponse = (u16, &'static str, String);

/// What a fake does with a request.
pub type Handler = Arc<dyn Fn(FakeRequest) -> FakeResponse + Send + Sync>;

/// An HTTP/1.1 server on a thread that joined a network namespace; stops on drop.
pub struct HttpFake {
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl HttpFake {
    /// Serves `handler` on every address of `addrs` inside `ns`; returns once all listen.
    pub fn start(ns: &NetNs, addrs: &[SocketAddr], handler: Handler) -> Self {
        let path = PathBuf::from(format!("/run/netns/{}", ns.name()));
        let addrs = addrs.to_vec();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            if let Err(e) = crate::netns::enter_netns(&path) {
                let _ = ready_tx.send(Err(format!("entering {}: {e}", path.display())));
                return;
            }
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("tokio runtime");
            rt.block_on(async move {
                let mut listeners = vec![];
                for a in &addrs {
                    match tokio::net::TcpListener::bind(a).await {
                        Ok(l) => listeners.push(l),
                        Err(e) => {
                            let _ = ready_tx.send(Err(format!("bind {a}: {e}")));
                            return;
                        }
                    }
                }
                let _ = ready_tx.send(Ok(()));
                let mut tasks = tokio::task::JoinSet::new();
                for l in listeners {
                    let handler = handler.clone();
                    tasks.spawn(async move {
                        let port = l.local_addr().map(|a| a.port()).unwrap_or(0);
                        loop {
                            let Ok((stream, peer)) = l.accept().await else {
                                continue;
                            };
                            let handler = handler.clone();
                            tokio::spawn(async move {
                                let svc = hyper::service::service_fn(move |req| {
                                    let handler = handler.clone();
                                    async move {
                                        Ok::<_, Infallible>(
                                            handle(handler, peer.ip(), port, req).await,
                                        )
                                    }
                                });
                                let _ = hyper::server::conn::http1::Builder::new()
                                    .serve_connection(TokioIo::new(stream), svc)
                                    .await;
                            });
                        }
                    });
                }
                let _ = stop_rx.await;
                tasks.abort_all();
            });
        });
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("fake cloud server: {e}"),
            Err(_) => panic!("fake cloud server thread died during start"),
        }
        HttpFake {
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }
}

impl Drop for HttpFake {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn handle(
    handler: Handler,
    peer: IpAddr,
    port: u16,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let headers = parts
        .headers
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_ascii_lowercase(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let is_gce_metadata = parts.uri.path().starts_with("/computeMetadata/");
    let fr = FakeRequest {
        peer,
        port,
        method: parts.method.to_string(),
        path: parts.uri.path().to_string(),
        query: parts.uri.query().unwrap_or("").to_string(),
        headers,
        body,
    };
    // A handler may block briefly (it only takes locks); run it off the accept loop.
    let (status, ctype, text) = tokio::task::spawn_blocking(move || handler(fr))
        .await
        .unwrap_or((500, "text/plain", "handler panicked".into()));
    let mut b = Response::builder()
        .status(status)
        .header("content-type", ctype);
    if is_gce_metadata {
        // Google's metadata server marks every answer; its client libraries check it.
        b = b.header("metadata-flavor", "Google");
    }
    b.body(Full::new(Bytes::from(text)))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

/// A namespace attached to a cluster's underlay bridge `br0` with `ip`/24 (where the fake
/// clouds run, reachable from every host like a cloud's metadata and API endpoints).
pub fn cloud_host(underlay: &NetNs, ip: Ipv4Addr) -> NetNs {
    let ns = NetNs::new("cloud");
    crate::cluster::plug_into_underlay(
        underlay,
        &ns,
        &format!("veth-c{}", ip.octets()[3]),
        &format!("{ip}/24"),
    );
    ns
}

/// `/etc/netns/<ns>/hosts` for a namespace (what `ip netns exec` bind-mounts over
/// `/etc/hosts`), removed with its directory on drop.
pub struct NetnsHosts {
    dir: PathBuf,
}

impl NetnsHosts {
    /// Makes `names` resolve to `ip` inside `ns` (plus the usual localhost lines).
    pub fn write(ns: &NetNs, ip: Ipv4Addr, names: &[&str]) -> Self {
        remove_dead_runs_hosts();
        let dir = PathBuf::from(format!("/etc/netns/{}", ns.name()));
        std::fs::create_dir_all(&dir).expect("create /etc/netns/<ns>");
        let text = format!(
            "127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n{ip} {}\n",
            names.join(" ")
        );
        std::fs::write(dir.join("hosts"), text).expect("write netns hosts");
        NetnsHosts { dir }
    }
}

/// Removes `/etc/netns/frs-<pid>-...` directories of test runs whose process is gone (a
/// killed run never reached its `Drop`).
fn remove_dead_runs_hosts() {
    let Ok(entries) = std::fs::read_dir("/etc/netns") else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let pid = name
            .strip_prefix(&format!("{}-", crate::PREFIX))
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<u32>().ok());
        if let Some(pid) = pid {
            if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

impl Drop for NetnsHosts {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One route of the fake route table (the API's `Route` fields that matter).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcRoute {
    /// `RouteId`.
    pub id: u64,
    /// `DestinationCidrBlock`.
    pub cidr: String,
    /// `GatewayType`.
    pub gateway_type: String,
    /// `GatewayId`.
    pub gateway_id: String,
    /// `Enabled`.
    pub enabled: bool,
    /// `RouteType` (`USER` for created routes, `NETD` for the VPC's local route).
    pub route_type: String,
}

/// One API call as the fake received it (after signature checks).
#[derive(Debug, Clone)]
pub struct TcCall {
    /// `X-TC-Action`.
    pub action: String,
    /// The SecretId it was signed with.
    pub secret_id: String,
    /// The JSON body.
    pub params: Value,
    /// The error code answered, if any.
    pub error: Option<String>,
}

struct TcState {
    keys: HashMap<String, String>,
    region: String,
    vpc_id: String,
    table_id: String,
    routes: Vec<TcRoute>,
    next_id: u64,
    calls: Vec<TcCall>,
    faults: Vec<(String, String, String)>,
    metadata_hits: usize,
    request_seq: u64,
}

/// The fake Tencent Cloud: metadata on port 80, VPC API on port 8080 of one address.
pub struct FakeTencent {
    state: Arc<Mutex<TcState>>,
    addr: Ipv4Addr,
    _server: HttpFake,
}

/// The region every fake instance is in.
pub const REGION: &str = "ap-guangzhou";
/// The fake VPC.
pub const VPC_ID: &str = "vpc-frs00001";
/// Its route table.
pub const ROUTE_TABLE_ID: &str = "rtb-frs00001";
/// The VPC's CIDR (its local route).
pub const VPC_CIDR: &str = "192.168.100.0/24";

impl FakeTencent {
    /// Starts the fake in `ns` on `addr` (ports 80 and 8080), accepting the key pair
    /// (`secret_id`, `secret_key`).
    pub fn start(ns: &NetNs, addr: Ipv4Addr, secret_id: &str, secret_key: &str) -> Self {
        let state = Arc::new(Mutex::new(TcState {
            keys: HashMap::from([(secret_id.to_string(), secret_key.to_string())]),
            region: REGION.into(),
            vpc_id: VPC_ID.into(),
            table_id: ROUTE_TABLE_ID.into(),
            routes: vec![TcRoute {
                id: 1,
                cidr: VPC_CIDR.into(),
                gateway_type: "LOCAL".into(),
                gateway_id: "local".into(),
                enabled: true,
                route_type: "NETD".into(),
            }],
            next_id: 100,
            calls: vec![],
            faults: vec![],
            metadata_hits: 0,
            request_seq: 0,
        }));
        let s = state.clone();
        let handler: Handler = Arc::new(move |req| {
            let mut st = s.lock().unwrap();
            if req.port == 80 {
                metadata(&mut st, &req)
            } else {
                api(&mut st, &req)
            }
        });
        let server = HttpFake::start(
            ns,
            &[SocketAddr::from((addr, 80)), SocketAddr::from((addr, 8080))],
            handler,
        );
        FakeTencent {
            state,
            addr,
            _server: server,
        }
    }

    /// The API endpoint as `TENCENTCLOUD_VPC_ENDPOINT` takes it.
    pub fn endpoint(&self) -> String {
        format!("http://{}:8080", self.addr)
    }

    /// The API's `host:port` (for the Python SDK's `HttpProfile(endpoint=...)`).
    pub fn api_authority(&self) -> String {
        format!("{}:8080", self.addr)
    }

    /// The routes of the table now.
    pub fn routes(&self) -> Vec<TcRoute> {
        self.state.lock().unwrap().routes.clone()
    }

    /// Every API call so far.
    pub fn calls(&self) -> Vec<TcCall> {
        self.state.lock().unwrap().calls.clone()
    }

    /// How many metadata requests were answered.
    pub fn metadata_hits(&self) -> usize {
        self.state.lock().unwrap().metadata_hits
    }

    /// Makes the next call of `action` fail with `code` / `message` (once per call of this).
    pub fn fail_next(&self, action: &str, code: &str, message: &str) {
        self.state
            .lock()
            .unwrap()
            .faults
            .push((action.into(), code.into(), message.into()));
    }
}

/// The MAC the fake metadata gives the host with underlay address `ip`.
pub fn host_mac(ip: Ipv4Addr) -> String {
    let o = ip.octets();
    format!("52:54:00:{:02x}:{:02x}:{:02x}", o[1], o[2], o[3])
}

fn metadata(st: &mut TcState, req: &FakeRequest) -> FakeResponse {
    st.metadata_hits += 1;
    let IpAddr::V4(peer) = req.peer else {
        return (404, "text/plain", "not found".into());
    };
    let mac = host_mac(peer);
    let path = req.path.trim_end_matches('/');
    let value = match path.strip_prefix("/latest/meta-data/") {
        Some("placement/region") => Some(st.region.clone()),
        Some("mac") => Some(mac.clone()),
        Some("local-ipv4") => Some(peer.to_string()),
        Some(p) if p == format!("network/interfaces/macs/{mac}/vpc-id") => Some(st.vpc_id.clone()),
        _ => None,
    };
    match (req.method.as_str(), value) {
        ("GET", Some(v)) => (200, "text/plain", v),
        _ => (
            404,
            "text/html",
            "<html><head><title>404 - Not Found</title></head></html>".into(),
        ),
    }
}

fn hmac256(key: &[u8], data: &[u8]) -> Vec<u8> {
    let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
    ring::hmac::sign(&k, data).as_ref().to_vec()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn sha256_hex(b: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, b).as_ref())
}

fn utc_date(secs: u64) -> String {
    // Days to civil date (proleptic Gregorian).
    let z = (secs / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

/// Checks a TC3-HMAC-SHA256 signature as the service does; returns the SecretId or the
/// service's (code, message).
fn verify_tc3(
    keys: &HashMap<String, String>,
    req: &FakeRequest,
) -> Result<String, (&'static str, String)> {
    let fail = |code: &'static str, msg: &str| Err((code, msg.to_string()));
    let auth = req.header("authorization");
    let Some(rest) = auth.strip_prefix("TC3-HMAC-SHA256 ") else {
        return fail(
            "AuthFailure.SignatureFailure",
            "The provided credentials could not be validated. Please check your signature is correct.",
        );
    };
    let mut credential = "";
    let mut signed_headers = "";
    let mut signature = "";
    for part in rest.split(',') {
        let part = part.trim();
        if let Some(v) = part.strip_prefix("Credential=") {
            credential = v;
        } else if let Some(v) = part.strip_prefix("SignedHeaders=") {
            signed_headers = v;
        } else if let Some(v) = part.strip_prefix("Signature=") {
            signature = v;
        }
    }
    let cred: Vec<&str> = credential.split('/').collect();
    if cred.len() != 4 || cred[3] != "tc3_request" {
        return fail(
            "AuthFailure.InvalidAuthorization",
            "Credential is malformed.",
        );
    }
    let (secret_id, date, service) = (cred[0], cred[1], cred[2]);
    let Some(secret_key) = keys.get(secret_id) else {
        return fail(
            "AuthFailure.SecretIdNotFound",
            "The SecretId is not found, please ensure that your SecretId is correct.",
        );
    };
    let Ok(ts) = req.header("x-tc-timestamp").parse::<u64>() else {
        return fail("MissingParameter", "The request is missing X-TC-Timestamp.");
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    if now.abs_diff(ts) > 300 {
        return fail(
            "AuthFailure.SignatureExpire",
            "Signature expired. Timestamp and server time cannot differ by more than 5 minutes.",
        );
    }
    if date != utc_date(ts) || service != "vpc" {
        return fail(
            "AuthFailure.InvalidAuthorization",
            "Credential scope does not match the request date or service.",
        );
    }
    let mut canonical_headers = String::new();
    for h in signed_headers.split(';') {
        canonical_headers.push_str(&format!(
            "{h}:{}\n",
            req.header(h).trim().to_ascii_lowercase()
        ));
    }
    let query = if req.method == "GET" { &req.query } else { "" };
    let canonical = format!(
        "{}\n{}\n{query}\n{canonical_headers}\n{signed_headers}\n{}",
        req.method,
        req.path,
        sha256_hex(&req.body)
    );
    let to_sign = format!(
        "TC3-HMAC-SHA256\n{ts}\n{date}/{service}/tc3_request\n{}",
        sha256_hex(canonical.as_bytes())
    );
    let k = hmac256(format!("TC3{secret_key}").as_bytes(), date.as_bytes());
    let k = hmac256(&k, service.as_bytes());
    let k = hmac256(&k, b"tc3_request");
    if hex(&hmac256(&k, to_sign.as_bytes())) != signature {
        return fail(
            "AuthFailure.SignatureFailure",
            "The provided credentials could not be validated. Please check your signature is correct.",
        );
    }
    Ok(secret_id.to_string())
}

fn route_json(table: &str, r: &TcRoute) -> Value {
    json!({
        "DestinationCidrBlock": r.cidr,
        "GatewayType": r.gateway_type,
        "GatewayId": r.gateway_id,
        "RouteId": r.id,
        "RouteDescription": "",
        "Enabled": r.enabled,
        "RouteType": r.route_type,
        "RouteTableId": table,
        "DestinationIpv6CidrBlock": "",
        "RouteItemId": format!("rti-{:08x}", r.id),
        "PublishedToVbc": false,
        "CreatedTime": "2024-01-01 00:00:00",
    })
}

fn table_json(st: &TcState) -> Value {
    json!({
        "VpcId": st.vpc_id,
        "RouteTableId": st.table_id,
        "RouteTableName": "default",
        "AssociationSet": [],
        "RouteSet": st.routes.iter().map(|r| route_json(&st.table_id, r)).collect::<Vec<_>>(),
        "Main": true,
        "CreatedTime": "2024-01-01 00:00:00",
        "TagSet": [],
        "LocalCidrForCcn": [],
    })
}

fn api(st: &mut TcState, req: &FakeRequest) -> FakeResponse {
    st.request_seq += 1;
    let request_id = format!("frs-req-{:06}", st.request_seq);
    let error = |code: &str, message: &str| -> FakeResponse {
        (
            200,
            "application/json",
            json!({"Response": {"Error": {"Code": code, "Message": message}, "RequestId": request_id}})
                .to_string(),
        )
    };
    if req.method != "POST" || req.path != "/" {
        return error("UnsupportedOperation", "Only POST / is served here.");
    }
    let action = req.header("x-tc-action").to_string();
    if req.header("x-tc-version") != "2017-03-12" {
        return error(
            "NoSuchVersion",
            "The requested version does not exist or is not supported.",
        );
    }
    if req.header("x-tc-region") != st.region {
        return error(
            "InvalidParameterValue",
            &format!(
                "The region `{}` is not supported.",
                req.header("x-tc-region")
            ),
        );
    }
    let secret_id = match verify_tc3(&st.keys, req) {
        Ok(id) => id,
        Err((code, msg)) => {
            st.calls.push(TcCall {
                action,
                secret_id: String::new(),
                params: Value::Null,
                error: Some(code.into()),
            });
            return error(code, &msg);
        }
    };
    let params: Value = serde_json::from_slice(&req.body).unwrap_or(Value::Null);
    let mut call = TcCall {
        action: action.clone(),
        secret_id,
        params: params.clone(),
        error: None,
    };
    if let Some(i) = st.faults.iter().position(|(a, _, _)| *a == action) {
        let (_, code, msg) = st.faults.remove(i);
        call.error = Some(code.clone());
        st.calls.push(call);
        return error(&code, &msg);
    }
    let result = run_action(st, &action, &params);
    call.error = result.as_ref().err().map(|(c, _)| c.to_string());
    st.calls.push(call);
    match result {
        Ok(mut v) => {
            v["RequestId"] = json!(request_id);
            (
                200,
                "application/json",
                json!({ "Response": v }).to_string(),
            )
        }
        Err((code, msg)) => error(code, &msg),
    }
}

type ApiResult = Result<Value, (&'static str, String)>;

fn run_action(st: &mut TcState, action: &str, p: &Value) -> ApiResult {
    let table_ok = |st: &TcState| -> Result<(), (&'static str, String)> {
        match p.get("RouteTableId").and_then(Value::as_str) {
            Some(t) if t == st.table_id => Ok(()),
            Some(t) => Err((
                "ResourceNotFound",
                format!("The specified route table `{t}` does not exist."),
            )),
            None => Err((
                "MissingParameter",
                "The request is missing a required parameter `RouteTableId`.".into(),
            )),
        }
    };
    match action {
        "DescribeRouteTables" => {
            let mut matches = true;
            for f in p
                .get("Filters")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let name = f.get("Name").and_then(Value::as_str).unwrap_or("");
                let values: Vec<&str> = f
                    .get("Values")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                    .collect();
                let ours = match name {
                    "vpc-id" => &st.vpc_id,
                    "route-table-id" => &st.table_id,
                    other => {
                        return Err((
                            "InvalidParameter.FilterInvalidKey",
                            format!("The filter key `{other}` is invalid."),
                        ))
                    }
                };
                matches &= values.iter().any(|v| v == ours);
            }
            let set: Vec<Value> = if matches {
                vec![table_json(st)]
            } else {
                vec![]
            };
            Ok(json!({"TotalCount": set.len(), "RouteTableSet": set}))
        }
        "CreateRoutes" => {
            table_ok(st)?;
            let routes = p.get("Routes").and_then(Value::as_array).cloned();
            let Some(routes) = routes.filter(|r| !r.is_empty()) else {
                return Err((
                    "MissingParameter",
                    "The request is missing a required parameter `Routes`.".into(),
                ));
            };
            let mut new = vec![];
            for r in &routes {
                let s = |k: &str| r.get(k).and_then(Value::as_str).unwrap_or("").to_string();
                let cidr = s("DestinationCidrBlock");
                if cidr.parse::<ipnet::Ipv4Net>().is_err() {
                    return Err((
                        "InvalidParameterValue.Malformed",
                        format!("The DestinationCidrBlock `{cidr}` is malformed."),
                    ));
                }
                if st.routes.iter().chain(new.iter()).any(|x| x.cidr == cidr) {
                    return Err((
                        "InvalidParameterValue.Duplicate",
                        format!("The route for destination `{cidr}` already exists."),
                    ));
                }
                let gateway_type = s("GatewayType");
                if gateway_type != "NORMAL_CVM" {
                    return Err((
                        "InvalidParameterValue",
                        format!("The GatewayType `{gateway_type}` is not supported here."),
                    ));
                }
                st.next_id += 1;
                new.push(TcRoute {
                    id: st.next_id,
                    cidr,
                    gateway_type,
                    gateway_id: s("GatewayId"),
                    enabled: r.get("Enabled").and_then(Value::as_bool).unwrap_or(true),
                    route_type: "USER".into(),
                });
            }
            st.routes.extend(new);
            Ok(json!({"TotalCount": 1, "RouteTableSet": [table_json(st)]}))
        }
        "DeleteRoutes" => {
            table_ok(st)?;
            let ids: Vec<u64> = p
                .get("Routes")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|r| r.get("RouteId").and_then(Value::as_u64))
                .collect();
            if ids.is_empty() {
                return Err((
                    "MissingParameter",
                    "The request is missing a required parameter `Routes.RouteId`.".into(),
                ));
            }
            let mut removed = vec![];
            for id in ids {
                let Some(i) = st.routes.iter().position(|r| r.id == id) else {
                    return Err((
                        "ResourceNotFound",
                        format!("The specified route `{id}` does not exist."),
                    ));
                };
                removed.push(route_json(&st.table_id, &st.routes.remove(i)));
            }
            Ok(json!({ "RouteSet": removed }))
        }
        "DisableRoutes" | "EnableRoutes" => {
            table_ok(st)?;
            let enable = action == "EnableRoutes";
            for id in p
                .get("RouteIds")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(Value::as_u64)
            {
                match st.routes.iter_mut().find(|r| r.id == id) {
                    Some(r) => r.enabled = enable,
                    None => {
                        return Err((
                            "ResourceNotFound",
                            format!("The specified route `{id}` does not exist."),
                        ))
                    }
                }
            }
            Ok(json!({}))
        }
        other => Err((
            "InvalidAction",
            format!("The requested action `{other}` does not exist."),
        )),
    }
}
