//! Server-side printing: `meta.k8s.io` `Table` responses for clients that ask for them in
//! `Accept` (kubectl's human-readable `get`), with the columns kube-apiserver prints for nodes
//! and pods. Every other resource, and every other client, gets plain JSON.

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};

use super::objects::parse_rfc3339;
use super::store::{ApiError, NODES, PODS};

/// What a `rows[].object` holds (the `includeObject` query parameter).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Include {
    None,
    Metadata,
    Object,
}

/// A negotiated Table response.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TableFormat {
    /// `meta.k8s.io/v1` or `meta.k8s.io/v1beta1`.
    pub api_version: &'static str,
    pub include: Include,
}

impl TableFormat {
    /// The response Content-Type.
    pub fn content_type(&self) -> &'static str {
        if self.api_version.ends_with("v1beta1") {
            "application/json;as=Table;v=v1beta1;g=meta.k8s.io"
        } else {
            "application/json;as=Table;v=v1;g=meta.k8s.io"
        }
    }
}

/// True if resource `res` has a table printer here.
fn printable(res: usize) -> bool {
    matches!(res, NODES | PODS)
}

/// The first entry of `accept` this server can produce: a Table (for nodes and pods) or plain
/// JSON (`None`). Entries it cannot produce (protobuf, YAML, other `as=` targets, Tables of
/// other resources) are skipped; with none usable the answer is plain JSON, as before.
pub(crate) fn negotiate(
    accept: Option<&str>,
    res: usize,
    include_object: Option<&str>,
) -> Result<Option<TableFormat>, ApiError> {
    let Some(accept) = accept else {
        return Ok(None);
    };
    let mut api_version = None;
    for entry in accept.split(',') {
        let mut parts = entry.split(';').map(str::trim);
        let media = parts.next().unwrap_or("").to_ascii_lowercase();
        if !matches!(media.as_str(), "application/json" | "application/*" | "*/*") {
            continue;
        }
        let (mut as_, mut g, mut v) = ("", "", "");
        for p in parts {
            match p.split_once('=').map(|(k, v)| (k.trim(), v.trim())) {
                Some(("as", x)) => as_ = x,
                Some(("g", x)) => g = x,
                Some(("v", x)) => v = x,
                _ => {}
            }
        }
        match (as_, g, v) {
            ("", _, _) => break,
            ("Table", "meta.k8s.io", "v1") if printable(res) => {
                api_version = Some("meta.k8s.io/v1");
                break;
            }
            ("Table", "meta.k8s.io", "v1beta1") if printable(res) => {
                api_version = Some("meta.k8s.io/v1beta1");
                break;
            }
            _ => {}
        }
    }
    let Some(api_version) = api_version else {
        return Ok(None);
    };
    let include = match include_object.unwrap_or("") {
        "" | "Metadata" => Include::Metadata,
        "None" => Include::None,
        "Object" => Include::Object,
        other => {
            return Err(ApiError::from_code(
                400,
                format!(
                    "unable to parse table options: includeObject: Unsupported value: \"{other}\": \
                     supported values: \"Metadata\", \"None\", \"Object\""
                ),
            ))
        }
    };
    Ok(Some(TableFormat {
        api_version,
        include,
    }))
}

fn col(name: &str, format: &str, priority: u32, description: &str) -> Value {
    json!({
        "name": name,
        "type": "string",
        "format": format,
        "description": description,
        "priority": priority,
    })
}

/// The `columnDefinitions` of resource `res` (wide columns have priority 1).
pub(crate) fn columns(res: usize) -> Value {
    const NAME: &str = "Name must be unique within a namespace.";
    const AGE: &str = "CreationTimestamp is when the object was created, in UTC.";
    match res {
        NODES => json!([
            col("Name", "name", 0, NAME),
            col("Status", "", 0, "The status of the node"),
            col("Roles", "", 0, "The roles of the node"),
            col("Age", "", 0, AGE),
            col("Version", "", 0, "Kubelet Version reported by the node."),
            col("Internal-IP", "", 1, "The node's first InternalIP address."),
            col("External-IP", "", 1, "The node's first ExternalIP address."),
            col("OS-Image", "", 1, "OS Image reported by the node."),
            col("Kernel-Version", "", 1, "Kernel Version reported by the node."),
            col("Container-Runtime", "", 1, "Container runtime version reported by the node."),
        ]),
        PODS => json!([
            col("Name", "name", 0, NAME),
            col("Ready", "", 0, "The aggregate readiness state of this pod for accepting traffic."),
            col("Status", "", 0, "The aggregate status of the containers in this pod."),
            col("Restarts", "", 0, "The number of times the containers in this pod have been restarted and when the last container in this pod has restarted."),
            col("Age", "", 0, AGE),
            col("IP", "", 1, "The first IP address of the pod."),
            col("Node", "", 1, "The node the pod is scheduled on."),
            col("Nominated Node", "", 1, "The node the scheduler nominated for this pod."),
            col("Readiness Gates", "", 1, "How many of the pod's readiness gates are met."),
        ]),
        _ => json!([]),
    }
}

/// Go's `duration.HumanDuration` (k8s.io/apimachinery): the AGE text kube-apiserver prints.
pub(crate) fn human_duration(secs: i64) -> String {
    if secs < -1 {
        return "<invalid>".into();
    }
    if secs < 0 {
        return "0s".into();
    }
    if secs < 120 {
        return format!("{secs}s");
    }
    let minutes = secs / 60;
    if minutes < 10 {
        return match secs % 60 {
            0 => format!("{minutes}m"),
            s => format!("{minutes}m{s}s"),
        };
    }
    if minutes < 180 {
        return format!("{minutes}m");
    }
    let hours = minutes / 60;
    if hours < 8 {
        return match minutes % 60 {
            0 => format!("{hours}h"),
            m => format!("{hours}h{m}m"),
        };
    }
    if hours < 48 {
        return format!("{hours}h");
    }
    let days = hours / 24;
    if hours < 24 * 8 {
        return match hours % 24 {
            0 => format!("{days}d"),
            h => format!("{days}d{h}h"),
        };
    }
    if hours < 24 * 365 * 2 {
        return format!("{days}d");
    }
    let years = days / 365;
    if hours < 24 * 365 * 8 {
        return match days % 365 {
            0 => format!("{years}y"),
            d => format!("{years}y{d}d"),
        };
    }
    format!("{years}y")
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// How long ago timestamp `t` was (`<unknown>` without one).
fn since(t: Option<&Value>, now: i64) -> String {
    match t.and_then(Value::as_str).and_then(parse_rfc3339) {
        Some(t) => human_duration(now - t as i64),
        None => "<unknown>".into(),
    }
}

fn str_at<'a>(obj: &'a Value, ptr: &str) -> &'a str {
    obj.pointer(ptr).and_then(Value::as_str).unwrap_or("")
}

fn or_else<'a>(s: &'a str, dflt: &'a str) -> &'a str {
    if s.is_empty() {
        dflt
    } else {
        s
    }
}

fn node_address<'a>(node: &'a Value, typ: &str) -> &'a str {
    node.pointer("/status/addresses")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .find(|a| a["type"] == typ)
        .and_then(|a| a["address"].as_str())
        .unwrap_or("<none>")
}

fn node_cells(node: &Value, now: i64) -> Vec<Value> {
    let conditions = node.pointer("/status/conditions").and_then(Value::as_array);
    let ready = conditions
        .into_iter()
        .flatten()
        .rfind(|c| c["type"] == "Ready");
    let mut status = vec![match ready {
        Some(c) if c["status"] == "True" => "Ready",
        Some(_) => "NotReady",
        None => "Unknown",
    }];
    if node.pointer("/spec/unschedulable") == Some(&Value::Bool(true)) {
        status.push("SchedulingDisabled");
    }
    let mut roles: Vec<&str> = node
        .pointer("/metadata/labels")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
        .filter_map(|(k, v)| match k.strip_prefix("node-role.kubernetes.io/") {
            Some(role) => Some(role),
            None if k == "kubernetes.io/role" => v.as_str(),
            None => None,
        })
        .filter(|r| !r.is_empty())
        .collect();
    roles.sort_unstable();
    roles.dedup();
    let roles = if roles.is_empty() {
        "<none>".to_string()
    } else {
        roles.join(",")
    };
    let info = |f: &str| or_else(str_at(node, &format!("/status/nodeInfo/{f}")), "<unknown>");
    vec![
        str_at(node, "/metadata/name").into(),
        status.join(",").into(),
        roles.into(),
        since(node.pointer("/metadata/creationTimestamp"), now).into(),
        str_at(node, "/status/nodeInfo/kubeletVersion").into(),
        node_address(node, "InternalIP").into(),
        node_address(node, "ExternalIP").into(),
        info("osImage").into(),
        info("kernelVersion").into(),
        info("containerRuntimeVersion").into(),
    ]
}

/// The pod columns, as kube-apiserver computes them for regular containers (init containers
/// are not looked at).
fn pod_cells(pod: &Value, now: i64) -> Vec<Value> {
    let phase = str_at(pod, "/status/phase");
    let mut reason = or_else(str_at(pod, "/status/reason"), phase).to_string();
    let total = pod
        .pointer("/spec/containers")
        .and_then(Value::as_array)
        .map_or(0, Vec::len);
    let statuses = pod
        .pointer("/status/containerStatuses")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[]);
    let (mut ready, mut restarts, mut last_restart) = (0, 0, None::<u64>);
    let mut running = false;
    for c in statuses.iter().rev() {
        restarts += c["restartCount"].as_u64().unwrap_or(0);
        if let Some(t) = c
            .pointer("/lastState/terminated/finishedAt")
            .and_then(Value::as_str)
            .and_then(parse_rfc3339)
        {
            last_restart = Some(last_restart.map_or(t, |l| l.max(t)));
        }
        let waiting = str_at(c, "/state/waiting/reason");
        let terminated = c.pointer("/state/terminated");
        if !waiting.is_empty() {
            reason = waiting.to_string();
        } else if let Some(t) = terminated {
            reason = match t["reason"].as_str().unwrap_or("") {
                "" => match t["signal"].as_i64().unwrap_or(0) {
                    0 => format!("ExitCode:{}", t["exitCode"].as_i64().unwrap_or(0)),
                    s => format!("Signal:{s}"),
                },
                r => r.to_string(),
            };
        } else if c["ready"] == true && c.pointer("/state/running").is_some() {
            running = true;
            ready += 1;
        }
    }
    if reason == "Completed" && running {
        let pod_ready = pod
            .pointer("/status/conditions")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .any(|c| c["type"] == "Ready" && c["status"] == "True");
        reason = if pod_ready { "Running" } else { "NotReady" }.into();
    }
    if pod.pointer("/metadata/deletionTimestamp").is_some() {
        if str_at(pod, "/status/reason") == "NodeLost" {
            reason = "Unknown".into();
        } else if !matches!(phase, "Succeeded" | "Failed") {
            reason = "Terminating".into();
        }
    }
    let restarts = match last_restart {
        Some(t) if restarts > 0 => format!("{restarts} ({} ago)", human_duration(now - t as i64)),
        _ => restarts.to_string(),
    };
    let gates = pod
        .pointer("/spec/readinessGates")
        .and_then(Value::as_array)
        .filter(|g| !g.is_empty());
    let gates = match gates {
        None => "<none>".to_string(),
        Some(g) => {
            let conds = pod.pointer("/status/conditions").and_then(Value::as_array);
            let met = g
                .iter()
                .filter(|gate| {
                    conds
                        .into_iter()
                        .flatten()
                        .any(|c| c["type"] == gate["conditionType"] && c["status"] == "True")
                })
                .count();
            format!("{met}/{}", g.len())
        }
    };
    vec![
        str_at(pod, "/metadata/name").into(),
        format!("{ready}/{total}").into(),
        reason.into(),
        restarts.into(),
        since(pod.pointer("/metadata/creationTimestamp"), now).into(),
        or_else(str_at(pod, "/status/podIPs/0/ip"), "<none>").into(),
        or_else(str_at(pod, "/spec/nodeName"), "<none>").into(),
        or_else(str_at(pod, "/status/nominatedNodeName"), "<none>").into(),
        gates.into(),
    ]
}

/// One `rows[]` entry for `obj` (a stored object of resource `res`).
pub(crate) fn row(res: usize, obj: &Value, fmt: &TableFormat) -> Value {
    let now = now_secs();
    let cells = match res {
        NODES => node_cells(obj, now),
        PODS => pod_cells(obj, now),
        _ => vec![str_at(obj, "/metadata/name").into()],
    };
    let mut row = Map::new();
    row.insert("cells".into(), cells.into());
    if res == PODS {
        let done = match str_at(obj, "/status/phase") {
            "Succeeded" => Some(("Succeeded", "The pod has completed successfully.")),
            "Failed" => Some(("Failed", "The pod failed.")),
            _ => None,
        };
        if let Some((reason, message)) = done {
            row.insert(
                "conditions".into(),
                json!([{"type": "Completed", "status": "True", "reason": reason, "message": message}]),
            );
        }
    }
    let object = match fmt.include {
        Include::None => Value::Null,
        Include::Object => obj.clone(),
        Include::Metadata => json!({
            "kind": "PartialObjectMetadata",
            "apiVersion": fmt.api_version,
            "metadata": obj.get("metadata").cloned().unwrap_or_else(|| json!({})),
        }),
    };
    row.insert("object".into(), object);
    Value::Object(row)
}

/// A whole Table: `metadata` as given, the column definitions if `headers`, and `rows`.
pub(crate) fn table(
    res: usize,
    fmt: &TableFormat,
    metadata: Value,
    headers: bool,
    rows: Vec<Value>,
) -> Value {
    json!({
        "kind": "Table",
        "apiVersion": fmt.api_version,
        "metadata": metadata,
        "columnDefinitions": if headers { columns(res) } else { Value::Null },
        "rows": rows,
    })
}

/// The Table of one object (a GET, or a watch event's object).
pub(crate) fn single(res: usize, obj: &Value, fmt: &TableFormat, headers: bool) -> Value {
    let rv = str_at(obj, "/metadata/resourceVersion");
    table(
        res,
        fmt,
        json!({"resourceVersion": rv}),
        headers,
        vec![row(res, obj, fmt)],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const KUBECTL: &str = "application/json;as=Table;v=v1;g=meta.k8s.io,\
                           application/json;as=Table;v=v1beta1;g=meta.k8s.io,application/json";

    #[test]
    fn durations_like_go() {
        for (secs, text) in [
            (-5, "<invalid>"),
            (-1, "0s"),
            (0, "0s"),
            (119, "119s"),
            (120, "2m"),
            (312, "5m12s"),
            (600, "10m"),
            (179 * 60 + 59, "179m"),
            (3 * 3600, "3h"),
            (3 * 3600 + 25 * 60, "3h25m"),
            (8 * 3600, "8h"),
            (47 * 3600, "47h"),
            (3 * 86_400, "3d"),
            (3 * 86_400 + 5 * 3600, "3d5h"),
            (8 * 86_400, "8d"),
            (729 * 86_400, "729d"),
            (730 * 86_400, "2y"),
            (731 * 86_400, "2y1d"),
            (8 * 365 * 86_400 + 40 * 86_400, "8y"),
        ] {
            assert_eq!(human_duration(secs), text, "{secs}");
        }
    }

    #[test]
    fn negotiation() {
        let t = negotiate(Some(KUBECTL), NODES, None).unwrap().unwrap();
        assert_eq!(t.api_version, "meta.k8s.io/v1");
        assert_eq!(t.include, Include::Metadata);
        let beta = "application/json;as=Table;v=v1beta1;g=meta.k8s.io";
        let t = negotiate(Some(beta), PODS, Some("Object"))
            .unwrap()
            .unwrap();
        assert_eq!(t.api_version, "meta.k8s.io/v1beta1");
        assert_eq!(t.include, Include::Object);
        assert!(
            negotiate(Some(KUBECTL), super::super::store::NAMESPACES, None)
                .unwrap()
                .is_none()
        );
        assert!(negotiate(Some("application/json"), NODES, None)
            .unwrap()
            .is_none());
        assert!(negotiate(None, NODES, None).unwrap().is_none());
        assert!(negotiate(
            Some("application/json, application/json;as=Table;v=v1;g=meta.k8s.io"),
            NODES,
            None
        )
        .unwrap()
        .is_none());
        assert!(negotiate(Some(KUBECTL), NODES, Some("All")).is_err());
    }

    #[test]
    fn node_row() {
        let mut n = super::super::kubelet_like_node(
            "node-1",
            "10.244.1.0/24",
            std::net::Ipv4Addr::new(10, 0, 0, 7),
            &[],
        );
        n["metadata"]["creationTimestamp"] = "2020-01-01T00:00:00Z".into();
        n["metadata"]["labels"]["node-role.kubernetes.io/worker"] = "".into();
        n["metadata"]["labels"]["node-role.kubernetes.io/control-plane"] = "".into();
        n["spec"]["unschedulable"] = true.into();
        let fmt = TableFormat {
            api_version: "meta.k8s.io/v1",
            include: Include::Metadata,
        };
        let r = row(NODES, &n, &fmt);
        let cells = r["cells"].as_array().unwrap();
        assert_eq!(cells.len(), columns(NODES).as_array().unwrap().len());
        assert_eq!(cells[0], "node-1");
        assert_eq!(cells[1], "Ready,SchedulingDisabled");
        assert_eq!(cells[2], "control-plane,worker");
        assert!(cells[3].as_str().unwrap().contains('y'), "{}", cells[3]);
        assert_eq!(cells[4], "v1.32.6");
        assert_eq!(cells[5], "10.0.0.7");
        assert_eq!(cells[6], "<none>");
        assert_eq!(cells[7], "Debian GNU/Linux 12 (bookworm)");
        assert_eq!(cells[8], "6.1.0-37-amd64");
        assert_eq!(cells[9], "containerd://1.7.24");
        assert_eq!(r["object"]["kind"], "PartialObjectMetadata");
        assert_eq!(r["object"]["metadata"]["name"], "node-1");
        let bare = json!({"metadata": {"name": "b"}, "status": {"conditions": [
            {"type": "Ready", "status": "Unknown"}]}});
        let cells = row(NODES, &bare, &fmt)["cells"].clone();
        assert_eq!(
            cells,
            json!([
                "b",
                "NotReady",
                "<none>",
                "<unknown>",
                "",
                "<none>",
                "<none>",
                "<unknown>",
                "<unknown>",
                "<unknown>"
            ])
        );
    }

    #[test]
    fn pod_row() {
        let fmt = TableFormat {
            api_version: "meta.k8s.io/v1",
            include: Include::None,
        };
        let pod = json!({
            "metadata": {"name": "p"},
            "spec": {"nodeName": "n1", "containers": [{"name": "a"}, {"name": "b"}]},
            "status": {"phase": "Running", "podIPs": [{"ip": "10.244.1.5"}], "containerStatuses": [
                {"name": "a", "ready": true, "restartCount": 0, "state": {"running": {}}},
                {"name": "b", "ready": false, "restartCount": 2,
                 "state": {"waiting": {"reason": "CrashLoopBackOff"}}},
            ]},
        });
        let r = row(PODS, &pod, &fmt);
        assert_eq!(
            r["cells"],
            json!([
                "p",
                "1/2",
                "CrashLoopBackOff",
                "2",
                "<unknown>",
                "10.244.1.5",
                "n1",
                "<none>",
                "<none>"
            ])
        );
        assert_eq!(r["object"], Value::Null);
        let done = json!({"metadata": {"name": "d"}, "status": {"phase": "Succeeded"}});
        assert_eq!(row(PODS, &done, &fmt)["conditions"][0]["type"], "Completed");
    }
}
