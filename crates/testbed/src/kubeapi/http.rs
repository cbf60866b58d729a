//! The HTTP side: accept loop, TLS, authentication, RBAC, routing, discovery, list streaming
//! and watch streams.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::{Frame, Incoming};
use hyper::header::{HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::ser::{SerializeMap, Serializer};
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio_rustls::rustls;

use super::patch;
use super::store::{event_line, ApiError, ResDef, State, GROUPS, RESOURCES};
use super::table::{self, TableFormat};
use super::{Inner, RequestRecord, ADMIN_USER, FLANNEL_USER};

type Body = BoxBody<Bytes, io::Error>;

/// An authenticated user.
#[derive(Debug, Clone)]
pub(crate) struct User {
    name: String,
    groups: Vec<String>,
}

/// A response body fed from a channel (list pages and watch streams). An `Err` item aborts the
/// response, which makes hyper close the connection mid-stream.
struct ChanBody(mpsc::Receiver<Result<Bytes, io::Error>>);

impl hyper::body::Body for ChanBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        self.0.poll_recv(cx).map(|o| o.map(|r| r.map(Frame::data)))
    }
}

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|e| match e {}).boxed()
}

fn response(code: u16, body: Body) -> Response<Body> {
    let mut r = Response::new(body);
    *r.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r.headers_mut().insert(
        "cache-control",
        HeaderValue::from_static("no-cache, private"),
    );
    r
}

fn json_response(code: u16, v: &Value) -> Response<Body> {
    response(code, full(serde_json::to_vec(v).expect("serialise")))
}

/// A Table answer, with the Content-Type kube-apiserver gives it.
fn table_response(v: &Value, fmt: &TableFormat) -> Response<Body> {
    let mut r = json_response(200, v);
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(fmt.content_type()));
    r
}

fn error_response(e: &ApiError) -> Response<Body> {
    json_response(e.code, &e.status())
}

/// The accept loop: serves until `stop`, closing and reopening the listener on `set_down`.
pub(crate) async fn serve(
    inner: Arc<Inner>,
    listener: TcpListener,
    addr: SocketAddr,
    tls: Option<Arc<rustls::ServerConfig>>,
    mut stop: oneshot::Receiver<()>,
) {
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let mut down_rx = inner.down_tx.subscribe();
    let mut listener = Some(listener);
    loop {
        let down = *down_rx.borrow_and_update();
        if down && listener.is_some() {
            listener = None;
            inner.listening.store(false, Ordering::SeqCst);
            inner.conn_epoch.send_modify(|e| *e += 1);
        } else if !down && listener.is_none() {
            match TcpListener::bind(addr).await {
                Ok(l) => {
                    listener = Some(l);
                    inner.listening.store(true, Ordering::SeqCst);
                }
                Err(e) => {
                    eprintln!("kube-apiserver: re-bind {addr}: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            }
        }
        let accept = async {
            match &listener {
                Some(l) => l.accept().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = &mut stop => return,
            _ = down_rx.changed() => {}
            r = accept => {
                let Ok((stream, _peer)) = r else { continue };
                let _ = stream.set_nodelay(true);
                let inner = inner.clone();
                let acceptor = acceptor.clone();
                inner.conns.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut epoch = inner.conn_epoch.subscribe();
                    epoch.borrow_and_update();
                    let i2 = inner.clone();
                    let work = async move {
                        match acceptor {
                            None => serve_conn(i2, stream, None).await,
                            Some(acc) => {
                                let Ok(tls) = acc.accept(stream).await else { return };
                                let user = tls
                                    .get_ref()
                                    .1
                                    .peer_certificates()
                                    .and_then(|c| c.first())
                                    .and_then(|c| super::tls::subject_names(c))
                                    .map(|(name, groups)| User { name, groups });
                                serve_conn(i2, tls, user).await
                            }
                        }
                    };
                    tokio::select! {
                        _ = work => {}
                        _ = epoch.changed() => {}
                    }
                    inner.conns.fetch_sub(1, Ordering::SeqCst);
                });
            }
        }
    }
}

async fn serve_conn<I>(inner: Arc<Inner>, io: I, cert_user: Option<User>)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let svc = hyper::service::service_fn(move |req| {
        let inner = inner.clone();
        let user = cert_user.clone();
        async move { Ok::<_, Infallible>(handle(inner, user, req).await) }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(io), svc)
        .await;
}

async fn handle(
    inner: Arc<Inner>,
    cert_user: Option<User>,
    req: Request<Incoming>,
) -> Response<Body> {
    let method = req.method().to_string();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let content_type = req
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let (user, resp) = route(&inner, cert_user, req).await;
    inner.requests.lock().unwrap().push(RequestRecord {
        method,
        path,
        query,
        content_type,
        user,
        status: resp.status().as_u16(),
    });
    resp
}

fn authenticate(
    req: &Request<Incoming>,
    cert_user: Option<User>,
) -> Result<Option<User>, ApiError> {
    if cert_user.is_some() {
        return Ok(cert_user);
    }
    let Some(auth) = req.headers().get(AUTHORIZATION) else {
        return Ok(None);
    };
    let token = auth
        .to_str()
        .ok()
        .and_then(|a| {
            a.strip_prefix("Bearer ")
                .or_else(|| a.strip_prefix("bearer "))
        })
        .map(str::trim);
    match token {
        Some(super::KubeApiServer::ADMIN_TOKEN) => Ok(Some(User {
            name: ADMIN_USER.into(),
            groups: vec!["system:masters".into(), "system:authenticated".into()],
        })),
        Some(super::KubeApiServer::FLANNEL_TOKEN) => Ok(Some(User {
            name: FLANNEL_USER.into(),
            groups: vec![
                "system:serviceaccounts".into(),
                "system:serviceaccounts:kube-flannel".into(),
                "system:authenticated".into(),
            ],
        })),
        _ => Err(ApiError::new(401, "Unauthorized", "Unauthorized")),
    }
}

/// What RBAC allows: admin (or system:masters) everything, the flannel service account the
/// reference ClusterRole, nobody else anything.
fn authorized(user: &User, def: &ResDef, sub: Option<&str>, verb: &str) -> bool {
    if user.name == ADMIN_USER || user.groups.iter().any(|g| g == "system:masters") {
        return true;
    }
    if user.name == FLANNEL_USER && def.group.is_empty() {
        return matches!(
            (def.plural, sub, verb),
            ("pods", None, "get")
                | ("nodes", None, "get" | "list" | "watch")
                | ("nodes", Some("status"), "patch")
        );
    }
    false
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 3 <= b.len() => {
                match std::str::from_utf8(&b[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                {
                    Some(v) => {
                        out.push(v);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The query parameters (empty pairs, as from kube-rs' leading `&`, skipped).
fn query_pairs(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (percent_decode(k), percent_decode(v)),
            None => (percent_decode(p), String::new()),
        })
        .collect()
}

/// Go's strconv.ParseBool.
fn parse_bool(v: &str) -> Option<bool> {
    match v {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// A boolean query parameter: None if absent, Some(false) if unparsable.
pub(crate) fn query_bool(q: &str, name: &str) -> Option<bool> {
    query_pairs(q)
        .into_iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| parse_bool(&v).unwrap_or(false))
}

struct Query(Vec<(String, String)>);

impl Query {
    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn bool(&self, name: &str) -> Result<bool, ApiError> {
        match self.get(name) {
            None | Some("") => Ok(false),
            Some(v) => parse_bool(v).ok_or_else(|| {
                ApiError::from_code(400, format!("invalid value {v:?} for parameter {name}"))
            }),
        }
    }

    fn u64(&self, name: &str) -> Result<Option<u64>, ApiError> {
        match self.get(name) {
            None | Some("") => Ok(None),
            Some(v) => v.parse().map(Some).map_err(|_| {
                ApiError::from_code(400, format!("invalid value {v:?} for parameter {name}"))
            }),
        }
    }

    fn dry_run(&self) -> bool {
        self.0.iter().any(|(k, v)| k == "dryRun" && v == "All")
    }
}

struct Target {
    res: usize,
    ns: String,
    name: Option<String>,
    sub: Option<String>,
}

fn not_found_path() -> ApiError {
    ApiError::from_code(404, "the server could not find the requested resource")
}

/// `/api/v1/...` or `/apis/<group>/<version>/...` → the resource addressed.
fn parse_target(segs: &[&str]) -> Result<Target, ApiError> {
    let (group, version, rest) = match segs {
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => return Err(not_found_path()),
    };
    let (ns, rest) = if rest.len() >= 3
        && rest[0] == "namespaces"
        && !(rest.len() == 3 && matches!(rest[2], "status" | "finalize"))
    {
        (rest[1].to_string(), &rest[2..])
    } else {
        (String::new(), rest)
    };
    if rest.is_empty() || rest.len() > 3 {
        return Err(not_found_path());
    }
    let res = super::store::res_by_path(group, version, rest[0]).ok_or_else(not_found_path)?;
    let def = &RESOURCES[res];
    if !ns.is_empty() && !def.namespaced {
        return Err(not_found_path());
    }
    let sub = rest.get(2).map(|s| s.to_string());
    if let Some(s) = &sub {
        if !(s == "status" && def.status) {
            return Err(not_found_path());
        }
    }
    Ok(Target {
        res,
        ns,
        name: rest.get(1).map(|s| s.to_string()),
        sub,
    })
}

async fn route(
    inner: &Arc<Inner>,
    cert_user: Option<User>,
    req: Request<Incoming>,
) -> (Option<String>, Response<Body>) {
    let user = match authenticate(&req, cert_user) {
        Ok(u) => u,
        Err(e) => return (None, error_response(&e)),
    };
    let uname = user.as_ref().map(|u| u.name.clone());
    let path = req.uri().path().to_string();
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let public = matches!(
        segs.first().copied(),
        Some("version" | "healthz" | "livez" | "readyz")
    );
    if public {
        let body = if segs == ["version"] {
            let minor = inner.opts.version_minor;
            json!({
                "major": "1",
                "minor": minor.to_string(),
                "gitVersion": format!("v1.{minor}.6"),
                "gitCommit": "0000000000000000000000000000000000000000",
                "gitTreeState": "clean",
                "buildDate": "2025-06-17T18:00:00Z",
                "goVersion": "go1.23.10",
                "compiler": "gc",
                "platform": "linux/amd64",
            })
        } else {
            return (uname, response(200, full("ok")));
        };
        return (uname, json_response(200, &body));
    }
    let Some(user) = user else {
        return (
            None,
            error_response(&ApiError::new(401, "Unauthorized", "Unauthorized")),
        );
    };
    {
        let mut fail = inner.fail.lock().unwrap();
        if fail.0 > 0 {
            fail.0 -= 1;
            let code = fail.1;
            drop(fail);
            let e = ApiError::from_code(code, format!("injected failure ({code})"));
            return (uname, error_response(&e));
        }
    }
    let query = Query(query_pairs(req.uri().query().unwrap_or("")));
    let resp = match (req.method(), segs.as_slice()) {
        (&Method::GET, ["api"]) => Ok(json_response(
            200,
            &json!({
                "kind": "APIVersions",
                "versions": ["v1"],
                "serverAddressByClientCIDRs": [{
                    "clientCIDR": "0.0.0.0/0",
                    "serverAddress": inner.addr.lock().unwrap().map(|a| a.to_string()).unwrap_or_default(),
                }],
            }),
        )),
        (&Method::GET, ["api", "v1"]) => Ok(json_response(200, &resource_list("", "v1"))),
        (&Method::GET, ["apis"]) => Ok(json_response(
            200,
            &json!({
                "kind": "APIGroupList",
                "apiVersion": "v1",
                "groups": GROUPS.iter().map(|g| api_group(g)).collect::<Vec<_>>(),
            }),
        )),
        (&Method::GET, ["apis", g]) if GROUPS.contains(g) => Ok(json_response(200, &api_group(g))),
        (&Method::GET, ["apis", g, "v1"]) if GROUPS.contains(g) => {
            Ok(json_response(200, &resource_list(g, "v1")))
        }
        (_, ["api", ..] | ["apis", ..]) => match parse_target(&segs) {
            Ok(t) => resource_request(inner, &user, t, query, req).await,
            Err(e) => Err(e),
        },
        _ => Err(not_found_path()),
    };
    (uname, resp.unwrap_or_else(|e| error_response(&e)))
}

fn api_group(g: &str) -> Value {
    let gv = json!({"groupVersion": format!("{g}/v1"), "version": "v1"});
    json!({"kind": "APIGroup", "apiVersion": "v1", "name": g, "versions": [gv], "preferredVersion": gv})
}

fn resource_list(group: &str, version: &str) -> Value {
    let gv = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    let mut resources = Vec::new();
    for d in RESOURCES
        .iter()
        .filter(|d| d.group == group && d.version == version)
    {
        let mut r = json!({
            "name": d.plural,
            "singularName": d.singular,
            "namespaced": d.namespaced,
            "kind": d.kind,
            "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"],
        });
        if !d.short.is_empty() {
            r["shortNames"] = json!(d.short);
        }
        if !d.categories.is_empty() {
            r["categories"] = json!(d.categories);
        }
        resources.push(r);
        if d.status {
            resources.push(json!({
                "name": format!("{}/status", d.plural),
                "singularName": "",
                "namespaced": d.namespaced,
                "kind": d.kind,
                "verbs": ["get", "patch", "update"],
            }));
        }
    }
    json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources})
}

/// The JSON body of a create/update (415 for other encodings, such as protobuf or CBOR).
async fn read_json(req: Request<Incoming>, check_type: bool) -> Result<Value, ApiError> {
    let ct = req
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if check_type && !matches!(ct.as_str(), "" | "application/json" | "*/*") {
        return Err(ApiError::from_code(
            415,
            format!(
                "the body of the request was in an unknown format ({ct}) - accepted media types include: application/json"
            ),
        ));
    }
    let body = req
        .into_body()
        .collect()
        .await
        .map_err(|e| ApiError::from_code(400, format!("reading the request body: {e}")))?
        .to_bytes();
    serde_json::from_slice(&body).map_err(|e| {
        ApiError::from_code(
            400,
            format!("couldn't get version/kind; json parse error: {e}"),
        )
    })
}

async fn resource_request(
    inner: &Arc<Inner>,
    user: &User,
    t: Target,
    q: Query,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let def = &RESOURCES[t.res];
    let watch = q.bool("watch")?;
    let verb = match (req.method(), &t.name) {
        (&Method::GET, Some(_)) => "get",
        (&Method::GET, None) if watch => "watch",
        (&Method::GET, None) => "list",
        (&Method::POST, None) => "create",
        (&Method::PUT, Some(_)) => "update",
        (&Method::PATCH, Some(_)) => "patch",
        (&Method::DELETE, Some(_)) => "delete",
        (m, _) => {
            return Err(ApiError::from_code(
                405,
                format!("the server does not allow this method on the requested resource ({m})"),
            ))
        }
    };
    if t.sub.is_some() && !matches!(verb, "get" | "update" | "patch") {
        return Err(ApiError::from_code(
            405,
            "the server does not allow this method on the requested resource",
        ));
    }
    if !authorized(user, def, t.sub.as_deref(), verb) {
        let ns = (!t.ns.is_empty()).then_some(t.ns.as_str());
        return Err(ApiError::forbidden(
            def,
            t.name.as_deref(),
            t.sub.as_deref(),
            &user.name,
            verb,
            ns,
        ));
    }
    let name = t.name.clone().unwrap_or_default();
    let dry = q.dry_run();
    // Server-side printing (kubectl get): a Table instead of the object(s), if asked for.
    let table = match verb {
        "get" | "list" | "watch" if t.sub.is_none() => table::negotiate(
            req.headers().get(ACCEPT).and_then(|v| v.to_str().ok()),
            t.res,
            q.get("includeObject"),
        )?,
        _ => None,
    };
    match verb {
        "get" => {
            let st = inner.lock();
            match (st.get(t.res, &t.ns, &name), &table) {
                (Some(o), None) => Ok(json_response(200, o)),
                (Some(o), Some(fmt)) => {
                    Ok(table_response(&table::single(t.res, o, fmt, true), fmt))
                }
                (None, _) => Err(ApiError::not_found(def, &name)),
            }
        }
        "list" => list(inner, &t, &q, table),
        "watch" => watch_stream(inner, &t, &q, table),
        "create" => {
            let body = read_json(req, true).await?;
            let obj = inner.mutate(|st| st.create(t.res, &t.ns, body, dry))?;
            Ok(json_response(201, &obj))
        }
        "update" => {
            let body = read_json(req, true).await?;
            let obj =
                inner.mutate(|st| st.update(t.res, &t.ns, &name, body, t.sub.as_deref(), dry))?;
            Ok(json_response(200, &obj))
        }
        "patch" => {
            let ct = req
                .headers()
                .get(CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_string();
            type Apply = fn(&mut Value, &Value) -> Result<(), String>;
            let apply: Apply = match ct.as_str() {
                "application/json-patch+json" => patch::json_patch,
                "application/merge-patch+json" => |t, p| {
                    patch::merge_patch(t, p);
                    Ok(())
                },
                "application/strategic-merge-patch+json" => patch::strategic_merge,
                other => {
                    return Err(ApiError::from_code(
                        415,
                        format!(
                            "the body of the request was in an unknown format ({other}) - accepted media types include: \
                             application/json-patch+json, application/merge-patch+json, \
                             application/strategic-merge-patch+json"
                        ),
                    ))
                }
            };
            let body = read_json(req, false).await?;
            let obj = inner.mutate(|st| {
                let cur = st
                    .get(t.res, &t.ns, &name)
                    .ok_or_else(|| ApiError::not_found(def, &name))?;
                let mut obj = (**cur).clone();
                apply(&mut obj, &body).map_err(|e| ApiError::invalid(def, &name, &e))?;
                st.update(t.res, &t.ns, &name, obj, t.sub.as_deref(), dry)
            })?;
            Ok(json_response(200, &obj))
        }
        "delete" => {
            let obj = inner.mutate(|st| st.delete(t.res, &t.ns, &name, dry))?;
            if matches!(def.plural, "pods" | "namespaces") {
                return Ok(json_response(200, &obj));
            }
            let mut details = json!({"name": name, "kind": def.plural});
            if !def.group.is_empty() {
                details["group"] = def.group.into();
            }
            if let Some(uid) = obj.pointer("/metadata/uid") {
                details["uid"] = uid.clone();
            }
            Ok(json_response(
                200,
                &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "details": details}),
            ))
        }
        _ => unreachable!("verb {verb}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Selectors

enum LabelOp {
    Eq(String),
    Ne(String),
    Exists,
    NotExists,
    In(Vec<String>),
    NotIn(Vec<String>),
}

struct Selectors {
    labels: Vec<(String, LabelOp)>,
    fields: Vec<(String, bool, String)>,
}

fn split_top(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut depth, mut start) = (0, 0);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(s[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(s[start..].trim());
    out.into_iter().filter(|p| !p.is_empty()).collect()
}

fn set_values(s: &str) -> Option<Vec<String>> {
    let inner = s.trim().strip_prefix('(')?.strip_suffix(')')?;
    Some(inner.split(',').map(|v| v.trim().to_string()).collect())
}

impl Selectors {
    fn parse(q: &Query) -> Result<Self, ApiError> {
        let bad = |s: &str| ApiError::from_code(400, format!("unable to parse requirement: {s}"));
        let mut labels = Vec::new();
        for req in split_top(q.get("labelSelector").unwrap_or("")) {
            let r = if let Some(k) = req.strip_prefix('!') {
                (k.trim().to_string(), LabelOp::NotExists)
            } else if let Some((k, v)) = req.split_once("!=") {
                (k.trim().to_string(), LabelOp::Ne(v.trim().to_string()))
            } else if let Some((k, v)) = req.split_once("==").or_else(|| req.split_once('=')) {
                (k.trim().to_string(), LabelOp::Eq(v.trim().to_string()))
            } else if let Some((k, v)) = req.split_once(" notin ") {
                (
                    k.trim().to_string(),
                    LabelOp::NotIn(set_values(v).ok_or_else(|| bad(req))?),
                )
            } else if let Some((k, v)) = req.split_once(" in ") {
                (
                    k.trim().to_string(),
                    LabelOp::In(set_values(v).ok_or_else(|| bad(req))?),
                )
            } else if req.contains(' ') {
                return Err(bad(req));
            } else {
                (req.to_string(), LabelOp::Exists)
            };
            labels.push(r);
        }
        let mut fields = Vec::new();
        for req in split_top(q.get("fieldSelector").unwrap_or("")) {
            let f = if let Some((k, v)) = req.split_once("!=") {
                (k.trim().to_string(), false, v.trim().to_string())
            } else if let Some((k, v)) = req.split_once("==").or_else(|| req.split_once('=')) {
                (k.trim().to_string(), true, v.trim().to_string())
            } else {
                return Err(bad(req));
            };
            fields.push(f);
        }
        Ok(Selectors { labels, fields })
    }

    fn matches(&self, obj: &Value) -> bool {
        let labels = obj.pointer("/metadata/labels");
        let label = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        let labels_ok = self.labels.iter().all(|(k, op)| match op {
            LabelOp::Eq(v) => label(k) == Some(v.as_str()),
            LabelOp::Ne(v) => label(k) != Some(v.as_str()),
            LabelOp::Exists => label(k).is_some(),
            LabelOp::NotExists => label(k).is_none(),
            LabelOp::In(vs) => label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            LabelOp::NotIn(vs) => !label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
        });
        labels_ok
            && self.fields.iter().all(|(path, eq, v)| {
                let ptr = format!("/{}", path.replace('.', "/"));
                let actual = match obj.pointer(&ptr) {
                    Some(Value::String(s)) => s.clone(),
                    Some(Value::Null) | None => String::new(),
                    Some(other) => other.to_string(),
                };
                (actual == *v) == *eq
            })
    }
}

// ---------------------------------------------------------------------------------------------
// List

/// A list item: the object without `kind`/`apiVersion`.
struct Item<'a>(&'a Value);

impl serde::Serialize for Item<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            Value::Object(m) => {
                let mut map = s.serialize_map(None)?;
                for (k, v) in m {
                    if k != "kind" && k != "apiVersion" {
                        map.serialize_entry(k, v)?;
                    }
                }
                map.end()
            }
            other => other.serialize(s),
        }
    }
}

fn hex(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<String> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect();
    String::from_utf8(bytes?).ok()
}

fn too_old(rv: u64, st: &State) -> ApiError {
    ApiError::expired(format!("too old resource version: {rv} ({})", st.compacted))
}

/// Appends list entry `o`: the object (without kind/apiVersion), or its Table row.
fn write_entry(buf: &mut Vec<u8>, res: usize, o: &Value, table: Option<&TableFormat>) {
    match table {
        None => serde_json::to_writer(buf, &Item(o)),
        Some(fmt) => serde_json::to_writer(buf, &table::row(res, o, fmt)),
    }
    .expect("serialise")
}

fn list(
    inner: &Arc<Inner>,
    t: &Target,
    q: &Query,
    table: Option<TableFormat>,
) -> Result<Response<Body>, ApiError> {
    let def = &RESOURCES[t.res];
    let sel = Selectors::parse(q)?;
    let limit = q.u64("limit")?.unwrap_or(0) as usize;
    let st = inner.lock();
    let (list_rv, after) = match q.get("continue").filter(|c| !c.is_empty()) {
        Some(tok) => {
            let bad = || ApiError::from_code(400, "continue key is not valid: invalid token");
            let text = unhex(tok).ok_or_else(bad)?;
            let mut parts = text.splitn(3, '\0');
            let rv: u64 = parts.next().and_then(|r| r.parse().ok()).ok_or_else(bad)?;
            let ns = parts.next().ok_or_else(bad)?.to_string();
            let name = parts.next().ok_or_else(bad)?.to_string();
            if rv < st.compacted {
                return Err(ApiError::expired(
                    "The provided continue parameter is too old to display a consistent list result. \
                     You can start a new list without the continue parameter, or use the continue \
                     token in this response to retrieve the remainder of the results.",
                ));
            }
            (rv, Some((ns, name)))
        }
        None => {
            if q.get("resourceVersionMatch") == Some("Exact") {
                let rv = q.u64("resourceVersion")?.unwrap_or(0);
                if rv < st.compacted {
                    return Err(too_old(rv, &st));
                }
            }
            (st.rv, None)
        }
    };
    let mut items: Vec<Arc<Value>> = st
        .list(t.res, &t.ns, after.as_ref())
        .into_iter()
        .filter(|o| sel.matches(o))
        .collect();
    drop(st);
    let mut meta = json!({"resourceVersion": list_rv.to_string()});
    if limit > 0 && items.len() > limit {
        let remaining = items.len() - limit;
        items.truncate(limit);
        let last = items.last().expect("non-empty");
        let ns = last
            .pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .unwrap_or("");
        let name = last
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or("");
        meta["continue"] = hex(&format!("{list_rv}\0{ns}\0{name}")).into();
        meta["remainingItemCount"] = remaining.into();
    }
    let res = t.res;
    let mut head = match &table {
        None => format!(
            "{{\"kind\":\"{}List\",\"apiVersion\":\"{}\",\"metadata\":",
            def.kind,
            def.api_version()
        ),
        Some(fmt) => format!(
            "{{\"kind\":\"Table\",\"apiVersion\":\"{}\",\"metadata\":",
            fmt.api_version
        ),
    }
    .into_bytes();
    serde_json::to_writer(&mut head, &meta).expect("serialise");
    match &table {
        None => head.extend_from_slice(b",\"items\":["),
        Some(_) => {
            head.extend_from_slice(b",\"columnDefinitions\":");
            serde_json::to_writer(&mut head, &table::columns(res)).expect("serialise");
            head.extend_from_slice(b",\"rows\":[");
        }
    }
    let resp_of = |body: Body| {
        let mut r = response(200, body);
        if let Some(fmt) = &table {
            r.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static(fmt.content_type()));
        }
        r
    };
    if items.len() <= 64 {
        for (i, o) in items.iter().enumerate() {
            if i > 0 {
                head.push(b',');
            }
            write_entry(&mut head, res, o, table.as_ref());
        }
        head.extend_from_slice(b"]}");
        return Ok(resp_of(full(head)));
    }
    // Large lists are serialised in pieces by a task, so other connections are served meanwhile.
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        let mut buf = head;
        for (i, o) in items.iter().enumerate() {
            if i > 0 {
                buf.push(b',');
            }
            write_entry(&mut buf, res, o, table.as_ref());
            if buf.len() >= 256 * 1024 {
                if tx
                    .send(Ok(Bytes::from(std::mem::take(&mut buf))))
                    .await
                    .is_err()
                {
                    return;
                }
                tokio::task::yield_now().await;
            }
        }
        buf.extend_from_slice(b"]}");
        let _ = tx.send(Ok(Bytes::from(buf))).await;
    });
    Ok(resp_of(ChanBody(rx).boxed()))
}

// ---------------------------------------------------------------------------------------------
// Watch

fn bookmark_line(def: &ResDef, rv: u64, initial_end: bool) -> Bytes {
    let mut meta = json!({"resourceVersion": rv.to_string()});
    if initial_end {
        meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    event_line(
        "BOOKMARK",
        &json!({"kind": def.kind, "apiVersion": def.api_version(), "metadata": meta}),
    )
}

fn error_line(e: &ApiError) -> Bytes {
    event_line("ERROR", &e.status())
}

/// Turns watch events into lines: as stored, or (server-side printing) each object as a
/// one-row Table, the first of them with the column definitions.
struct EventWriter {
    res: usize,
    table: Option<TableFormat>,
    headers_sent: bool,
}

impl EventWriter {
    fn line(&mut self, typ: &str, obj: &Value) -> Bytes {
        match &self.table {
            None => event_line(typ, obj),
            Some(fmt) => {
                let headers = !std::mem::replace(&mut self.headers_sent, true);
                event_line(typ, &table::single(self.res, obj, fmt, headers))
            }
        }
    }
}

fn watch_stream(
    inner: &Arc<Inner>,
    t: &Target,
    q: &Query,
    table: Option<TableFormat>,
) -> Result<Response<Body>, ApiError> {
    let sel = Selectors::parse(q)?;
    let bookmarks = q.bool("allowWatchBookmarks")?;
    let initial_events = q.bool("sendInitialEvents")?;
    let timeout = match q.u64("timeoutSeconds")? {
        Some(s) if s > 0 => Duration::from_secs(s),
        _ => inner.opts.watch_timeout,
    };
    let from = match q.get("resourceVersion") {
        None | Some("") | Some("0") => None,
        Some(v) => Some(
            v.parse::<u64>()
                .map_err(|_| ApiError::from_code(400, format!("invalid resource version: {v}")))?,
        ),
    };
    if let Some(name) = &t.name {
        // Not reached (GET with a name is a get), kept for clarity.
        return Err(ApiError::not_found(&RESOURCES[t.res], name));
    }
    let (tx, rx) = mpsc::channel::<Result<Bytes, io::Error>>(16);
    let inner = inner.clone();
    let (res, ns) = (t.res, t.ns.clone());
    let def = &RESOURCES[res];
    let mut rv_rx = inner.rv_tx.subscribe();
    let mut bm_rx = inner.bookmark_tx.subscribe();
    let mut drop_rx = inner.drop_watches_tx.subscribe();
    bm_rx.borrow_and_update();
    drop_rx.borrow_and_update();
    rv_rx.borrow_and_update();
    // The starting point, taken now so that changes after the request are never missed.
    let start = {
        let st = inner.lock();
        if from.is_none() || initial_events {
            let objs: Vec<Arc<Value>> = st
                .list(res, &ns, None)
                .into_iter()
                .filter(|o| sel.matches(o))
                .collect();
            Ok((objs, st.rv))
        } else {
            let rv = from.unwrap_or(0);
            if rv < st.compacted {
                Err(too_old(rv, &st))
            } else {
                Ok((Vec::new(), rv))
            }
        }
    };
    let mut writer = EventWriter {
        res,
        table,
        headers_sent: false,
    };
    tokio::spawn(async move {
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        let mut ticker = tokio::time::interval(inner.opts.bookmark_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await;
        let mut cursor = match start {
            Err(e) => {
                let _ = tx.send(Ok(error_line(&e))).await;
                return;
            }
            Ok((objs, rv)) => {
                let mut buf = BytesMut::new();
                for o in &objs {
                    buf.extend_from_slice(&writer.line("ADDED", o));
                    if buf.len() >= 64 * 1024 && tx.send(Ok(buf.split().freeze())).await.is_err() {
                        return;
                    }
                }
                if initial_events && bookmarks {
                    buf.extend_from_slice(&bookmark_line(def, rv, true));
                }
                if !buf.is_empty() && tx.send(Ok(buf.freeze())).await.is_err() {
                    return;
                }
                rv
            }
        };
        loop {
            // Everything after the cursor, then wait for more.
            rv_rx.borrow_and_update();
            let batch = {
                let st = inner.lock();
                match st.events_after(cursor) {
                    None => Err(too_old(cursor, &st)),
                    Some(evs) => Ok((evs, st.rv.max(cursor))),
                }
            };
            match batch {
                Err(e) => {
                    let _ = tx.send(Ok(error_line(&e))).await;
                    return;
                }
                Ok((evs, rv)) => {
                    let mut buf = BytesMut::new();
                    for ev in evs {
                        if ev.res != res || !(ns.is_empty() || ev.ns == ns) || !sel.matches(&ev.obj)
                        {
                            continue;
                        }
                        if writer.table.is_some() {
                            buf.extend_from_slice(&writer.line(ev.typ, &ev.obj));
                        } else {
                            buf.extend_from_slice(&ev.line());
                        }
                    }
                    cursor = rv;
                    if !buf.is_empty() && tx.send(Ok(buf.freeze())).await.is_err() {
                        return;
                    }
                }
            }
            let send_bookmark = tokio::select! {
                _ = &mut deadline => return,
                _ = tx.closed() => return,
                r = drop_rx.changed() => {
                    if r.is_ok() {
                        let _ = tx
                            .send(Err(io::Error::new(io::ErrorKind::ConnectionAborted, "watch dropped")))
                            .await;
                    }
                    return;
                }
                _ = rv_rx.changed() => false,
                _ = bm_rx.changed() => bookmarks,
                _ = ticker.tick() => bookmarks,
            };
            if send_bookmark
                && tx
                    .send(Ok(bookmark_line(def, cursor, false)))
                    .await
                    .is_err()
            {
                return;
            }
        }
    });
    let mut resp = response(200, ChanBody(rx).boxed());
    if let Some(fmt) = &table {
        resp.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static(fmt.content_type()));
    }
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parsing() {
        let q = Query(query_pairs(
            "&watch=True&resourceVersion=12&labelSelector=a%3Db%2Cc&x",
        ));
        assert!(q.bool("watch").unwrap());
        assert_eq!(q.get("resourceVersion"), Some("12"));
        assert_eq!(q.get("labelSelector"), Some("a=b,c"));
        assert_eq!(q.get("x"), Some(""));
        assert!(Query(query_pairs("watch=yes")).bool("watch").is_err());
        assert_eq!(unhex(&hex("1\0ns\0n")).unwrap(), "1\0ns\0n");
        assert_eq!(percent_decode("100%"), "100%");
    }
}
