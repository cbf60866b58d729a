//! A fake Google Cloud for the `gce` backend's tests: the metadata server
//! (`/computeMetadata/v1/...`, `Metadata-Flavor: Google`, answering per calling host) and the
//! Compute Engine v1 API (networks and instances get; routes list/get/insert/delete returning
//! Operations that progress PENDING -> RUNNING -> DONE one step per globalOperations get or
//! wait, and take effect only when DONE), with bearer-token checks and an event log that shows
//! the order of calls. Tests drive it with Google's own Python client, so it cannot drift.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};

use crate::cloud_tencent::{FakeRequest, FakeResponse, Handler, HttpFake};
use crate::netns::NetNs;

/// The fake project.
pub const PROJECT: &str = "frs-project";
/// Its number.
pub const PROJECT_NUMBER: &str = "123456789012";
/// The zone of every instance.
pub const ZONE: &str = "us-central1-a";
/// The VPC network.
pub const NETWORK: &str = "default";
/// The default service account's access token.
pub const TOKEN: &str = "ya29.frs-gce-token-never-logged";
/// The default service account.
pub const SA_EMAIL: &str = "frs-sa@frs-project.iam.gserviceaccount.com";
/// An instance that exists but runs no flanneld (a next hop for conflicting routes).
pub const OTHER_INSTANCE: &str = "frs-other";
/// Where selfLinks point (as the real API writes them).
pub const LINK_BASE: &str = "https://www.googleapis.com/compute/v1";

/// The instance name of the host with underlay address `ip`.
pub fn instance_name(ip: Ipv4Addr) -> String {
    format!("frs-host-{}", ip.octets()[3])
}

/// The selfLink of an instance.
pub fn instance_link(name: &str) -> String {
    format!("{LINK_BASE}/projects/{PROJECT}/zones/{ZONE}/instances/{name}")
}

/// The selfLink of the network.
pub fn network_link() -> String {
    format!("{LINK_BASE}/projects/{PROJECT}/global/networks/{NETWORK}")
}

enum Effect {
    Insert(Value),
    Delete(String),
}

struct Op {
    json: Value,
    effect: Option<Effect>,
}

struct GceState {
    routes: BTreeMap<String, Value>,
    ops: HashMap<String, Op>,
    events: Vec<String>,
    seq: u64,
    faults: Vec<(String, u16, String, String)>,
}

/// The fake: metadata on port 80, Compute on port 8081 of one address.
pub struct FakeGce {
    state: Arc<Mutex<GceState>>,
    addr: Ipv4Addr,
    _server: HttpFake,
}

impl FakeGce {
    /// Starts the fake in `ns` on `addr`.
    pub fn start(ns: &NetNs, addr: Ipv4Addr) -> Self {
        let state = Arc::new(Mutex::new(GceState {
            routes: BTreeMap::new(),
            ops: HashMap::new(),
            events: vec![],
            seq: 0,
            faults: vec![],
        }));
        let s = state.clone();
        let handler: Handler = Arc::new(move |req| {
            let mut st = s.lock().unwrap();
            if req.port == 80 {
                metadata(&req)
            } else {
                compute(&mut st, &req)
            }
        });
        let server = HttpFake::start(
            ns,
            &[SocketAddr::from((addr, 80)), SocketAddr::from((addr, 8081))],
            handler,
        );
        FakeGce {
            state,
            addr,
            _server: server,
        }
    }

    /// `GCE_METADATA_HOST` for the hosts.
    pub fn metadata_host(&self) -> String {
        self.addr.to_string()
    }

    /// `CLOUDSDK_API_ENDPOINT_OVERRIDES_COMPUTE` for the hosts (and the Python client's
    /// `api_endpoint`).
    pub fn compute_base(&self) -> String {
        format!("http://{}:8081/compute/v1/", self.addr)
    }

    /// The routes now, by name.
    pub fn routes(&self) -> BTreeMap<String, Value> {
        self.state.lock().unwrap().routes.clone()
    }

    /// The event log: `routes.insert <name> <op>`, `routes.delete <name> <op>`,
    /// `<op> RUNNING`, `<op> DONE`, `! <call> <status>` for injected faults.
    pub fn events(&self) -> Vec<String> {
        self.state.lock().unwrap().events.clone()
    }

    /// Makes the next `call` (`routes.get`, `routes.insert`, ...) answer `status` with the
    /// Google error `reason` / `message`.
    pub fn fail_next(&self, call: &str, status: u16, reason: &str, message: &str) {
        self.state.lock().unwrap().faults.push((
            call.into(),
            status,
            reason.into(),
            message.into(),
        ));
    }
}

fn google_error(status: u16, reason: &str, message: &str) -> FakeResponse {
    (
        status,
        "application/json; charset=UTF-8",
        json!({"error": {"code": status, "message": message,
                "errors": [{"message": message, "domain": "global", "reason": reason}]}})
        .to_string(),
    )
}

fn ok(v: Value) -> FakeResponse {
    (200, "application/json; charset=UTF-8", v.to_string())
}

fn metadata(req: &FakeRequest) -> FakeResponse {
    if req.header("metadata-flavor") != "Google" {
        return (
            403,
            "text/html",
            "Missing required header: Metadata-Flavor".into(),
        );
    }
    let IpAddr::V4(peer) = req.peer else {
        return (404, "text/html", "not found".into());
    };
    let name = instance_name(peer);
    let path = req
        .path
        .strip_prefix("/computeMetadata/v1/")
        .unwrap_or("")
        .trim_end_matches('/');
    let text = |s: String| (200, "application/text", s);
    let sa = path
        .strip_prefix("instance/service-accounts/")
        .map(|rest| rest.split_once('/').unwrap_or((rest, "")));
    match (path, sa) {
        ("project/project-id", _) => text(PROJECT.into()),
        ("project/numeric-project-id", _) => text(PROJECT_NUMBER.into()),
        ("instance/zone", _) => text(format!("projects/{PROJECT_NUMBER}/zones/{ZONE}")),
        ("instance/hostname", _) => text(format!("{name}.{ZONE}.c.{PROJECT}.internal")),
        ("instance/name", _) => text(name),
        ("instance/network-interfaces/0/network", _) => {
            text(format!("projects/{PROJECT_NUMBER}/networks/{NETWORK}"))
        }
        ("instance/network-interfaces/0/ip", _) => text(peer.to_string()),
        (_, Some((acct, rest))) if acct == "default" || acct == SA_EMAIL => match rest {
            "" => (
                200,
                "application/json",
                json!({"aliases": ["default"], "email": SA_EMAIL,
                       "scopes": ["https://www.googleapis.com/auth/cloud-platform"]})
                .to_string(),
            ),
            "email" => text(SA_EMAIL.into()),
            "token" => (
                200,
                "application/json",
                json!({"access_token": TOKEN, "expires_in": 3599, "token_type": "Bearer"})
                    .to_string(),
            ),
            _ => (404, "text/html", "not found".into()),
        },
        _ => (404, "text/html", "not found".into()),
    }
}

fn valid_name(n: &str) -> bool {
    let b = n.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_lowercase()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && !n.ends_with('-')
}

fn known_instance(name: &str) -> bool {
    name == OTHER_INSTANCE
        || name
            .strip_prefix("frs-host-")
            .is_some_and(|n| n.parse::<u8>().is_ok())
}

fn new_op(st: &mut GceState, kind: &str, target: &str, effect: Effect) -> Value {
    st.seq += 1;
    let name = format!("operation-{}-frs", st.seq);
    let op = json!({
        "kind": "compute#operation",
        "id": format!("{}", 7_000_000_000_000_000_000u64 + st.seq),
        "name": name,
        "operationType": kind,
        "targetLink": target,
        "targetId": format!("{}", 5_000_000_000_000_000_000u64 + st.seq),
        "status": "PENDING",
        "user": SA_EMAIL,
        "progress": 0,
        "insertTime": "2024-01-01T00:00:00.000-07:00",
        "selfLink": format!("{LINK_BASE}/projects/{PROJECT}/global/operations/{name}"),
    });
    st.ops.insert(
        name,
        Op {
            json: op.clone(),
            effect: Some(effect),
        },
    );
    op
}

/// One step of an operation's life; applies its effect when it reaches DONE.
fn advance(st: &mut GceState, name: &str) -> Option<Value> {
    let op = st.ops.get_mut(name)?;
    let next = match op.json["status"].as_str() {
        Some("PENDING") => "RUNNING",
        _ => "DONE",
    };
    let changed = op.json["status"] != next;
    op.json["status"] = json!(next);
    let effect = if next == "DONE" {
        op.json["progress"] = json!(100);
        op.json["endTime"] = json!("2024-01-01T00:00:01.000-07:00");
        op.effect.take()
    } else {
        None
    };
    let v = op.json.clone();
    if changed {
        st.events.push(format!("{name} {next}"));
    }
    match effect {
        Some(Effect::Insert(route)) => {
            let n = route["name"].as_str().unwrap_or_default().to_string();
            st.routes.insert(n, route);
        }
        Some(Effect::Delete(n)) => {
            st.routes.remove(&n);
        }
        None => {}
    }
    Some(v)
}

fn compute(st: &mut GceState, req: &FakeRequest) -> FakeResponse {
    if req.header("authorization") != format!("Bearer {TOKEN}") {
        return (
            401,
            "application/json; charset=UTF-8",
            json!({"error": {"code": 401,
                "message": "Request is missing required authentication credential. Expected OAuth 2 access token, login cookie or other valid authentication credential.",
                "errors": [{"message": "Login Required.", "domain": "global", "reason": "required"}],
                "status": "UNAUTHENTICATED"}})
            .to_string(),
        );
    }
    let prefix = format!("/compute/v1/projects/{PROJECT}/");
    let Some(path) = req.path.strip_prefix(&prefix) else {
        return google_error(
            404,
            "notFound",
            &format!("The resource '{}' was not found", req.path),
        );
    };
    let parts: Vec<&str> = path.split('/').collect();
    let method = req.method.as_str();
    let call = match (method, parts.as_slice()) {
        ("GET", ["global", "networks", _]) => "networks.get",
        ("GET", ["zones", _, "instances", _]) => "instances.get",
        ("GET", ["global", "routes"]) => "routes.list",
        ("POST", ["global", "routes"]) => "routes.insert",
        ("GET", ["global", "routes", _]) => "routes.get",
        ("DELETE", ["global", "routes", _]) => "routes.delete",
        ("GET", ["global", "operations", _]) => "globalOperations.get",
        ("POST", ["global", "operations", _, "wait"]) => "globalOperations.wait",
        _ => {
            return google_error(
                404,
                "notFound",
                &format!("The resource '{}' was not found", req.path),
            )
        }
    };
    if let Some(i) = st.faults.iter().position(|(c, ..)| c == call) {
        let (_, status, reason, message) = st.faults.remove(i);
        st.events.push(format!("! {call} {status}"));
        return google_error(status, &reason, &message);
    }
    let not_found = |what: &str| {
        google_error(
            404,
            "notFound",
            &format!("The resource 'projects/{PROJECT}/{what}' was not found"),
        )
    };
    match (call, parts.as_slice()) {
        ("networks.get", [_, _, n]) if *n == NETWORK => ok(json!({
            "kind": "compute#network", "id": "4000000000000000001", "name": NETWORK,
            "selfLink": network_link(), "autoCreateSubnetworks": true,
            "routingConfig": {"routingMode": "REGIONAL"},
        })),
        ("networks.get", [_, _, n]) => not_found(&format!("global/networks/{n}")),
        ("instances.get", [_, z, _, n]) if *z == ZONE && known_instance(n) => ok(json!({
            "kind": "compute#instance", "id": "3000000000000000001", "name": n,
            "zone": format!("{LINK_BASE}/projects/{PROJECT}/zones/{ZONE}"),
            "status": "RUNNING", "canIpForward": true, "selfLink": instance_link(n),
            "networkInterfaces": [{"network": network_link(), "name": "nic0"}],
        })),
        ("instances.get", [_, z, _, n]) => not_found(&format!("zones/{z}/instances/{n}")),
        ("routes.list", _) => ok(json!({
            "kind": "compute#routeList",
            "id": format!("projects/{PROJECT}/global/routes"),
            "items": st.routes.values().cloned().collect::<Vec<_>>(),
            "selfLink": format!("{LINK_BASE}/projects/{PROJECT}/global/routes"),
        })),
        ("routes.get", [_, _, n]) => match st.routes.get(*n) {
            Some(r) => ok(r.clone()),
            None => not_found(&format!("global/routes/{n}")),
        },
        ("routes.delete", [_, _, n]) => {
            if !st.routes.contains_key(*n) {
                return not_found(&format!("global/routes/{n}"));
            }
            let target = format!("{LINK_BASE}/projects/{PROJECT}/global/routes/{n}");
            let op = new_op(st, "delete", &target, Effect::Delete(n.to_string()));
            st.events.push(format!(
                "routes.delete {n} {}",
                op["name"].as_str().unwrap_or("")
            ));
            ok(op)
        }
        ("routes.insert", _) => insert(st, req),
        ("globalOperations.get" | "globalOperations.wait", [_, _, n, ..]) => match advance(st, n) {
            Some(v) => ok(v),
            None => not_found(&format!("global/operations/{n}")),
        },
        _ => google_error(400, "badRequest", "Invalid request."),
    }
}

fn insert(st: &mut GceState, req: &FakeRequest) -> FakeResponse {
    let Ok(body) = serde_json::from_slice::<Value>(&req.body) else {
        return google_error(400, "parseError", "Parse Error");
    };
    let s = |k: &str| {
        body.get(k)
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    };
    let name = s("name");
    if !valid_name(&name) {
        return google_error(
            400,
            "invalid",
            &format!("Invalid value for field 'resource.name': '{name}'. Must be a match of regex '(?:[a-z](?:[-a-z0-9]{{0,61}}[a-z0-9])?)'"),
        );
    }
    let dest = s("destRange");
    if dest.parse::<ipnet::Ipv4Net>().is_err() {
        return google_error(
            400,
            "invalid",
            &format!("Invalid value for field 'resource.destRange': '{dest}'. Invalid IPv4 CIDR."),
        );
    }
    if s("network") != network_link() {
        return google_error(
            400,
            "invalid",
            &format!(
                "Invalid value for field 'resource.network': '{}'.",
                s("network")
            ),
        );
    }
    let hop = s("nextHopInstance");
    let hop_ok = hop
        .strip_prefix(&format!(
            "{LINK_BASE}/projects/{PROJECT}/zones/{ZONE}/instances/"
        ))
        .is_some_and(known_instance);
    if !hop_ok {
        return google_error(
            400,
            "invalid",
            &format!("Invalid value for field 'resource.nextHopInstance': '{hop}'."),
        );
    }
    let pending_insert = st
        .ops
        .values()
        .any(|o| matches!(&o.effect, Some(Effect::Insert(r)) if r["name"] == name.as_str()));
    if st.routes.contains_key(&name) || pending_insert {
        return google_error(
            409,
            "alreadyExists",
            &format!("The resource 'projects/{PROJECT}/global/routes/{name}' already exists"),
        );
    }
    st.seq += 1;
    let route = json!({
        "kind": "compute#route",
        "id": format!("{}", 6_000_000_000_000_000_000u64 + st.seq),
        "creationTimestamp": "2024-01-01T00:00:00.000-07:00",
        "name": name,
        "network": s("network"),
        "destRange": dest,
        "priority": body.get("priority").and_then(Value::as_u64).unwrap_or(1000),
        "nextHopInstance": hop,
        "tags": body.get("tags").cloned().unwrap_or(json!([])),
        "selfLink": format!("{LINK_BASE}/projects/{PROJECT}/global/routes/{name}"),
    });
    let target = route["selfLink"].as_str().unwrap_or("").to_string();
    let op = new_op(st, "insert", &target, Effect::Insert(route));
    st.events.push(format!(
        "routes.insert {name} {}",
        op["name"].as_str().unwrap_or("")
    ));
    ok(op)
}
