//! The object store: resource table, one global resourceVersion, the event history watchers
//! replay from, and the create/update/delete semantics of the real registry.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use serde_json::{json, Map, Value};

use super::objects::{new_uid, now_rfc3339};

/// How many events the history keeps; older ones are compacted away.
pub(crate) const HISTORY: usize = 10_000;

/// One kind of object the server stores.
#[derive(Debug)]
pub(crate) struct ResDef {
    pub group: &'static str,
    pub version: &'static str,
    pub plural: &'static str,
    pub singular: &'static str,
    pub kind: &'static str,
    pub namespaced: bool,
    pub short: &'static [&'static str],
    /// Has a `status` subresource (main updates keep status, status updates keep spec).
    pub status: bool,
    pub categories: &'static [&'static str],
}

impl ResDef {
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// `nodes`, `daemonsets.apps`: how the real server names a resource in messages.
    pub fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.plural.to_string()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }
}

macro_rules! res {
    ($g:expr, $p:expr, $s:expr, $k:expr, $ns:expr, $short:expr, $status:expr, $cat:expr) => {
        ResDef {
            group: $g,
            version: "v1",
            plural: $p,
            singular: $s,
            kind: $k,
            namespaced: $ns,
            short: $short,
            status: $status,
            categories: $cat,
        }
    };
}

pub(crate) const RBAC: &str = "rbac.authorization.k8s.io";

/// Every stored resource. Index 0 is nodes, 1 namespaces, 2 pods (see the constants below).
pub(crate) static RESOURCES: &[ResDef] = &[
    res!("", "nodes", "node", "Node", false, &["no"], true, &[]),
    res!(
        "",
        "namespaces",
        "namespace",
        "Namespace",
        false,
        &["ns"],
        true,
        &[]
    ),
    res!("", "pods", "pod", "Pod", true, &["po"], true, &["all"]),
    res!(
        "",
        "configmaps",
        "configmap",
        "ConfigMap",
        true,
        &["cm"],
        false,
        &[]
    ),
    res!(
        "",
        "serviceaccounts",
        "serviceaccount",
        "ServiceAccount",
        true,
        &["sa"],
        false,
        &[]
    ),
    res!(
        "",
        "services",
        "service",
        "Service",
        true,
        &["svc"],
        true,
        &["all"]
    ),
    res!("", "secrets", "secret", "Secret", true, &[], false, &[]),
    res!(
        RBAC,
        "clusterroles",
        "clusterrole",
        "ClusterRole",
        false,
        &[],
        false,
        &[]
    ),
    res!(
        RBAC,
        "clusterrolebindings",
        "clusterrolebinding",
        "ClusterRoleBinding",
        false,
        &[],
        false,
        &[]
    ),
    res!(RBAC, "roles", "role", "Role", true, &[], false, &[]),
    res!(
        RBAC,
        "rolebindings",
        "rolebinding",
        "RoleBinding",
        true,
        &[],
        false,
        &[]
    ),
    res!(
        "apps",
        "daemonsets",
        "daemonset",
        "DaemonSet",
        true,
        &["ds"],
        true,
        &["all"]
    ),
    res!(
        "apps",
        "deployments",
        "deployment",
        "Deployment",
        true,
        &["deploy"],
        true,
        &["all"]
    ),
];

pub(crate) const NODES: usize = 0;
pub(crate) const NAMESPACES: usize = 1;
pub(crate) const PODS: usize = 2;

/// The "subresource" of a direct write that bypasses the update strategies.
pub(crate) const RAW: &str = "*";

/// The API groups served under /apis (group, version).
pub(crate) const GROUPS: &[&str] = &["apps", RBAC];

pub(crate) fn res_by_path(group: &str, version: &str, plural: &str) -> Option<usize> {
    RESOURCES
        .iter()
        .position(|r| r.group == group && r.version == version && r.plural == plural)
}

pub(crate) fn res_by_kind(api_version: &str, kind: &str) -> Option<usize> {
    RESOURCES
        .iter()
        .position(|r| r.kind == kind && r.api_version() == api_version)
}

/// An error answered as a `Status` object.
#[derive(Debug, Clone)]
pub(crate) struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
    pub details: Option<Value>,
}

impl ApiError {
    pub fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            code,
            reason,
            message: message.into(),
            details: None,
        }
    }

    /// The reason the real server uses for a bare status code.
    pub fn from_code(code: u16, message: impl Into<String>) -> Self {
        let reason = match code {
            400 => "BadRequest",
            401 => "Unauthorized",
            403 => "Forbidden",
            404 => "NotFound",
            405 => "MethodNotAllowed",
            409 => "Conflict",
            410 => "Expired",
            415 => "UnsupportedMediaType",
            422 => "Invalid",
            429 => "TooManyRequests",
            503 => "ServiceUnavailable",
            504 => "Timeout",
            _ => "InternalError",
        };
        ApiError::new(code, reason, message)
    }

    fn with_details(mut self, def: &ResDef, name: &str) -> Self {
        let mut d = Map::new();
        if !name.is_empty() {
            d.insert("name".into(), name.into());
        }
        if !def.group.is_empty() {
            d.insert("group".into(), def.group.into());
        }
        d.insert("kind".into(), def.plural.into());
        self.details = Some(Value::Object(d));
        self
    }

    pub fn not_found(def: &ResDef, name: &str) -> Self {
        ApiError::new(
            404,
            "NotFound",
            format!("{} \"{name}\" not found", def.qualified()),
        )
        .with_details(def, name)
    }

    pub fn already_exists(def: &ResDef, name: &str) -> Self {
        ApiError::new(
            409,
            "AlreadyExists",
            format!("{} \"{name}\" already exists", def.qualified()),
        )
        .with_details(def, name)
    }

    pub fn conflict(def: &ResDef, name: &str) -> Self {
        ApiError::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; \
                 please apply your changes to the latest version and try again",
                def.qualified()
            ),
        )
        .with_details(def, name)
    }

    pub fn invalid(def: &ResDef, name: &str, msg: &str) -> Self {
        ApiError::new(
            422,
            "Invalid",
            format!("{} \"{name}\" is invalid: {msg}", def.kind),
        )
        .with_details(def, name)
    }

    pub fn forbidden(
        def: &ResDef,
        name: Option<&str>,
        sub: Option<&str>,
        user: &str,
        verb: &str,
        ns: Option<&str>,
    ) -> Self {
        let what = match name {
            Some(n) => format!("{} \"{n}\"", def.qualified()),
            None => def.qualified(),
        };
        let res = match sub {
            Some(s) => format!("{}/{s}", def.plural),
            None => def.plural.to_string(),
        };
        let scope = match ns {
            Some(ns) => format!("in the namespace \"{ns}\""),
            None => "at the cluster scope".to_string(),
        };
        ApiError::new(
            403,
            "Forbidden",
            format!(
                "{what} is forbidden: User \"{user}\" cannot {verb} resource \"{res}\" in API group \"{}\" {scope}",
                def.group
            ),
        )
        .with_details(def, name.unwrap_or(""))
    }

    pub fn expired(msg: impl Into<String>) -> Self {
        ApiError::new(410, "Expired", msg)
    }

    pub fn status(&self) -> Value {
        let mut s = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
        });
        if let Some(d) = &self.details {
            s["details"] = d.clone();
        }
        s["code"] = self.code.into();
        s
    }
}

/// One change, kept in the history for watchers.
#[derive(Debug)]
pub(crate) struct Event {
    pub rv: u64,
    pub res: usize,
    pub ns: String,
    pub typ: &'static str,
    pub obj: Arc<Value>,
    line: OnceLock<Bytes>,
}

impl Event {
    /// `{"type":..,"object":..}\n`, serialised once for all watchers.
    pub fn line(&self) -> Bytes {
        self.line
            .get_or_init(|| event_line(self.typ, &self.obj))
            .clone()
    }
}

pub(crate) fn event_line(typ: &str, obj: &Value) -> Bytes {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(b"{\"type\":\"");
    out.extend_from_slice(typ.as_bytes());
    out.extend_from_slice(b"\",\"object\":");
    serde_json::to_writer(&mut out, obj).expect("serialise object");
    out.extend_from_slice(b"}\n");
    Bytes::from(out)
}

type Key = (String, String);

/// Everything stored.
pub(crate) struct State {
    pub rv: u64,
    /// Watches (and continue tokens) from a version older than this get 410 Expired.
    pub compacted: u64,
    pub objects: Vec<BTreeMap<Key, Arc<Value>>>,
    pub history: VecDeque<Arc<Event>>,
}

fn meta(obj: &Value, field: &str) -> Option<String> {
    obj.get("metadata")?
        .get(field)?
        .as_str()
        .map(str::to_string)
}

fn meta_mut(obj: &mut Value) -> &mut Map<String, Value> {
    let o = obj.as_object_mut().expect("object");
    let m = o
        .entry("metadata")
        .or_insert_with(|| Value::Object(Map::new()));
    if !m.is_object() {
        *m = Value::Object(Map::new());
    }
    m.as_object_mut().expect("metadata object")
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name.as_bytes()[name.len() - 1].is_ascii_alphanumeric()
}

impl State {
    pub fn new() -> Self {
        let mut st = State {
            rv: 0,
            compacted: 0,
            objects: RESOURCES.iter().map(|_| BTreeMap::new()).collect(),
            history: VecDeque::new(),
        };
        for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
            st.create(NAMESPACES, "", json!({"metadata": {"name": ns}}), false)
                .expect("default namespace");
        }
        st
    }

    fn record(&mut self, res: usize, ns: &str, typ: &'static str, obj: Arc<Value>) {
        self.history.push_back(Arc::new(Event {
            rv: self.rv,
            res,
            ns: ns.to_string(),
            typ,
            obj,
            line: OnceLock::new(),
        }));
        while self.history.len() > HISTORY {
            let old = self.history.pop_front().expect("non-empty");
            self.compacted = self.compacted.max(old.rv);
        }
    }

    /// Forgets the history: every watch from a version before now gets 410.
    pub fn compact(&mut self) {
        self.history.clear();
        self.compacted = self.rv;
    }

    /// Events after `rv` in the history (None when `rv` is compacted away).
    pub fn events_after(&self, rv: u64) -> Option<Vec<Arc<Event>>> {
        if rv < self.compacted {
            return None;
        }
        let start = self.history.partition_point(|e| e.rv <= rv);
        Some(self.history.range(start..).cloned().collect())
    }

    pub fn get(&self, res: usize, ns: &str, name: &str) -> Option<&Arc<Value>> {
        self.objects[res].get(&(ns.to_string(), name.to_string()))
    }

    /// Objects of a resource (in one namespace if `ns` is non-empty), in key order, starting
    /// after `after`.
    pub fn list(&self, res: usize, ns: &str, after: Option<&Key>) -> Vec<Arc<Value>> {
        use std::ops::Bound;
        let map = &self.objects[res];
        let lower = match after {
            Some(k) => Bound::Excluded(k.clone()),
            None => Bound::Unbounded,
        };
        map.range((lower, Bound::Unbounded))
            .filter(|((n, _), _)| ns.is_empty() || n == ns)
            .map(|(_, v)| v.clone())
            .collect()
    }

    pub fn create(
        &mut self,
        res: usize,
        ns: &str,
        mut obj: Value,
        dry_run: bool,
    ) -> Result<Arc<Value>, ApiError> {
        let def = &RESOURCES[res];
        if !obj.is_object() {
            return Err(ApiError::from_code(400, "the body must be a JSON object"));
        }
        if let Some(k) = obj.get("kind").and_then(Value::as_str) {
            if !k.is_empty() && k != def.kind {
                return Err(ApiError::from_code(
                    400,
                    format!("the kind {k} does not match the resource {}", def.plural),
                ));
            }
        }
        let mut name = meta(&obj, "name").unwrap_or_default();
        if name.is_empty() {
            if let Some(prefix) = meta(&obj, "generateName") {
                name = format!("{prefix}{}", &new_uid()[..5]);
            }
        }
        if name.is_empty() {
            return Err(ApiError::invalid(
                def,
                "",
                "metadata.name: Required value: name or generateName is required",
            ));
        }
        if !valid_name(&name) {
            return Err(ApiError::invalid(
                def,
                &name,
                &format!(
                    "metadata.name: Invalid value: \"{name}\": a lowercase RFC 1123 subdomain \
                     must consist of lower case alphanumeric characters, '-' or '.'"
                ),
            ));
        }
        let body_ns = meta(&obj, "namespace").unwrap_or_default();
        let ns = if def.namespaced {
            let ns = if ns.is_empty() {
                body_ns.clone()
            } else {
                ns.to_string()
            };
            let ns = if ns.is_empty() {
                "default".to_string()
            } else {
                ns
            };
            if !body_ns.is_empty() && body_ns != ns {
                return Err(ApiError::from_code(
                    400,
                    "the namespace of the provided object does not match the namespace sent on the request",
                ));
            }
            if self.get(NAMESPACES, "", &ns).is_none() {
                return Err(ApiError::not_found(&RESOURCES[NAMESPACES], &ns));
            }
            ns
        } else {
            String::new()
        };
        let key = (ns.clone(), name.clone());
        if self.objects[res].contains_key(&key) {
            return Err(ApiError::already_exists(def, &name));
        }
        {
            let o = obj.as_object_mut().expect("object");
            o.insert("kind".into(), def.kind.into());
            o.insert("apiVersion".into(), def.api_version().into());
        }
        let m = meta_mut(&mut obj);
        m.insert("name".into(), name.clone().into());
        if def.namespaced {
            m.insert("namespace".into(), ns.clone().into());
        } else {
            m.remove("namespace");
        }
        m.insert("uid".into(), new_uid().into());
        m.insert("creationTimestamp".into(), now_rfc3339().into());
        m.remove("resourceVersion");
        m.remove("deletionTimestamp");
        match res {
            NAMESPACES => {
                obj["spec"] = json!({"finalizers": ["kubernetes"]});
                obj["status"] = json!({"phase": "Active"});
                let m = meta_mut(&mut obj);
                let labels = m
                    .entry("labels")
                    .or_insert_with(|| Value::Object(Map::new()));
                if let Some(l) = labels.as_object_mut() {
                    l.insert("kubernetes.io/metadata.name".into(), name.clone().into());
                }
            }
            PODS if obj.pointer("/status/phase").is_none() => {
                obj["status"] = json!({"phase": "Pending", "qosClass": "BestEffort"});
            }
            _ => {}
        }
        if def.group == "apps" {
            meta_mut(&mut obj).insert("generation".into(), 1.into());
            if obj.get("status").is_none() {
                obj["status"] = json!({});
            }
        }
        if dry_run {
            return Ok(Arc::new(obj));
        }
        self.rv += 1;
        meta_mut(&mut obj).insert("resourceVersion".into(), self.rv.to_string().into());
        let obj = Arc::new(obj);
        self.objects[res].insert(key, obj.clone());
        self.record(res, &ns, "ADDED", obj.clone());
        Ok(obj)
    }

    /// A PUT (or the result of a PATCH) of `obj` over the stored object, with the real
    /// strategies: main updates keep status, `status` updates keep spec.
    pub fn update(
        &mut self,
        res: usize,
        ns: &str,
        name: &str,
        mut obj: Value,
        sub: Option<&str>,
        dry_run: bool,
    ) -> Result<Arc<Value>, ApiError> {
        let def = &RESOURCES[res];
        let key = (ns.to_string(), name.to_string());
        let Some(old) = self.objects[res].get(&key).cloned() else {
            return Err(ApiError::not_found(def, name));
        };
        if !obj.is_object() {
            return Err(ApiError::from_code(400, "the body must be a JSON object"));
        }
        let body_name = meta(&obj, "name").unwrap_or_default();
        if !body_name.is_empty() && body_name != name {
            return Err(ApiError::from_code(
                400,
                format!(
                    "the name of the object ({body_name}) does not match the name on the URL ({name})"
                ),
            ));
        }
        if def.namespaced {
            let body_ns = meta(&obj, "namespace").unwrap_or_default();
            if !body_ns.is_empty() && body_ns != ns {
                return Err(ApiError::from_code(
                    400,
                    "the namespace of the provided object does not match the namespace sent on the request",
                ));
            }
        }
        let old_rv = meta(&old, "resourceVersion").unwrap_or_default();
        if let Some(rv) = meta(&obj, "resourceVersion") {
            if !rv.is_empty() && rv != old_rv {
                return Err(ApiError::conflict(def, name));
            }
        }
        {
            let o = obj.as_object_mut().expect("object");
            o.insert("kind".into(), def.kind.into());
            o.insert("apiVersion".into(), def.api_version().into());
            if def.status && sub != Some(RAW) {
                let keep = if sub == Some("status") {
                    "spec"
                } else {
                    "status"
                };
                match old.get(keep) {
                    Some(v) => {
                        o.insert(keep.into(), v.clone());
                    }
                    None => {
                        o.remove(keep);
                    }
                }
            }
        }
        let m = meta_mut(&mut obj);
        m.insert("name".into(), name.into());
        if def.namespaced {
            m.insert("namespace".into(), ns.into());
        }
        for f in ["uid", "creationTimestamp"] {
            match old.pointer(&format!("/metadata/{f}")) {
                Some(v) => m.insert(f.into(), v.clone()),
                None => m.remove(f),
            };
        }
        m.insert("resourceVersion".into(), old_rv.into());
        if def.group == "apps" && sub.is_none() && old.get("spec") != obj.get("spec") {
            let g = old
                .pointer("/metadata/generation")
                .and_then(Value::as_u64)
                .unwrap_or(1);
            meta_mut(&mut obj).insert("generation".into(), (g + 1).into());
        }
        if obj == *old || dry_run {
            // No change: the real server neither bumps the version nor emits an event.
            return Ok(if dry_run { Arc::new(obj) } else { old });
        }
        self.rv += 1;
        meta_mut(&mut obj).insert("resourceVersion".into(), self.rv.to_string().into());
        let obj = Arc::new(obj);
        self.objects[res].insert(key, obj.clone());
        self.record(res, ns, "MODIFIED", obj.clone());
        Ok(obj)
    }

    pub fn delete(
        &mut self,
        res: usize,
        ns: &str,
        name: &str,
        dry_run: bool,
    ) -> Result<Arc<Value>, ApiError> {
        let def = &RESOURCES[res];
        let key = (ns.to_string(), name.to_string());
        let Some(old) = self.objects[res].get(&key).cloned() else {
            return Err(ApiError::not_found(def, name));
        };
        if dry_run {
            return Ok(old);
        }
        if res == NAMESPACES {
            // Cascade: what the namespace controller would do eventually.
            for (r, d) in RESOURCES.iter().enumerate() {
                if !d.namespaced {
                    continue;
                }
                let names: Vec<String> = self.objects[r]
                    .keys()
                    .filter(|(n, _)| n == name)
                    .map(|(_, o)| o.clone())
                    .collect();
                for o in names {
                    let _ = self.delete(r, name, &o, false);
                }
            }
        }
        self.objects[res].remove(&key);
        self.rv += 1;
        let mut last = (*old).clone();
        meta_mut(&mut last).insert("resourceVersion".into(), self.rv.to_string().into());
        let last = Arc::new(last);
        self.record(res, ns, "DELETED", last.clone());
        Ok(last)
    }
}
