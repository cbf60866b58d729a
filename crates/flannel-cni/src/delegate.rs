//! Building, saving and running the delegate (bridge + host-local by default).

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::{json, Map, Value};

use crate::conf::NetConf;
use crate::error::CniError;
use crate::gojson::{delegate_to_go_json, ROUTE_FIELDS};
use crate::subnet_env::FlannelEnv;

/// Checks the user's `delegate` object the way the reference does (order matters).
pub fn validate_delegate(d: &Map<String, Value>) -> Result<(), String> {
    if let Some(t) = d.get("type") {
        if !t.is_string() {
            return Err(
                "'delegate' dictionary, if present, must have (string) 'type' field".into(),
            );
        }
    }
    if d.contains_key("name") {
        return Err(
            "'delegate' dictionary must not have 'name' field, it'll be set by flannel".into(),
        );
    }
    if d.contains_key("ipam") {
        return Err(
            "'delegate' dictionary must not have 'ipam' field, it'll be set by flannel".into(),
        );
    }
    Ok(())
}

fn route_error(e: impl std::fmt::Display) -> String {
    format!("failed to assemble Delegate IPAM: failed to read IPAM routes: failed to parse ipam.routes: {e}")
}

/// Re-encodes user routes through the CNI Route type: known fields only, `dst` must be a CIDR.
fn user_routes(v: Option<&Value>) -> Result<Vec<Value>, String> {
    let items = match v {
        None | Some(Value::Null) => return Ok(vec![]),
        Some(Value::Array(items)) => items,
        Some(Value::String(_)) => {
            return Err(route_error(
                "json: cannot unmarshal string into Go value of type []types.Route",
            ))
        }
        Some(other) => {
            return Err(route_error(format!(
                "json: cannot unmarshal {} into Go value of type []types.Route",
                flannel_types::gojson::go_kind(other)
            )))
        }
    };
    let mut out = vec![];
    for item in items {
        let Value::Object(m) = item else {
            return Err(route_error(format!(
                "json: cannot unmarshal {} into Go value of type types.Route",
                flannel_types::gojson::go_kind(item)
            )));
        };
        let mut r = Map::new();
        for f in ROUTE_FIELDS {
            if let Some(v) = m.get(f).filter(|v| !v.is_null()) {
                r.insert(f.to_string(), v.clone());
            }
        }
        match r.get("dst") {
            Some(Value::String(d)) => {
                // The CNI library keeps the host bits of dst as written.
                if d.parse::<ipnet::IpNet>().is_err() {
                    return Err(route_error(format!("invalid CIDR address: {d}")));
                }
            }
            Some(_) => return Err(route_error("dst must be a string")),
            None => return Err(route_error("invalid CIDR address: ")),
        }
        if r.get("gw").is_some_and(|g| {
            g.as_str()
                .is_none_or(|g| g.parse::<std::net::IpAddr>().is_err())
        }) {
            return Err(route_error(format!("invalid IP address: {}", r["gw"])));
        }
        out.push(Value::Object(r));
    }
    Ok(out)
}

/// The delegate's `ipam` section: the user's ipam (type defaults to host-local), flannel's
/// ranges, and the user's routes followed by the flannel networks.
pub fn delegate_ipam(
    ipam: Option<&Map<String, Value>>,
    env: &FlannelEnv,
) -> Result<Map<String, Value>, String> {
    let mut m = ipam.cloned().unwrap_or_default();
    if !m.contains_key("type") {
        m.insert("type".into(), "host-local".into());
    }
    let mut ranges = vec![];
    if let Some(s) = env.subnet {
        ranges.push(json!([{ "subnet": s.to_string() }]));
    }
    if let Some(s) = env.ipv6_subnet {
        ranges.push(json!([{ "subnet": s.to_string() }]));
    }
    m.insert("ranges".into(), Value::Array(ranges));
    let mut routes = user_routes(m.get("routes"))?;
    for n in env.networks.iter().chain(&env.ipv6_networks) {
        routes.push(json!({ "dst": n.to_string() }));
    }
    m.insert("routes".into(), Value::Array(routes));
    Ok(m)
}

/// The full delegate config for an ADD, with the reference's defaults and precedence.
pub fn build_delegate(conf: &NetConf, env: &FlannelEnv) -> Result<Map<String, Value>, String> {
    let mut d = conf.delegate.clone().unwrap_or_default();
    validate_delegate(&d)?;
    if let Some(rc) = &conf.runtime_config {
        d.insert("runtimeConfig".into(), rc.clone());
    }
    d.insert("name".into(), conf.name.clone().into());
    if !d.contains_key("type") {
        d.insert("type".into(), "bridge".into());
    }
    if !d.contains_key("ipMasq") {
        d.insert("ipMasq".into(), (!env.ipmasq.unwrap_or(false)).into());
    }
    if !d.contains_key("mtu") {
        d.insert("mtu".into(), env.mtu.unwrap_or(0).into());
    }
    if d.get("type").and_then(Value::as_str) == Some("bridge") && !d.contains_key("isGateway") {
        d.insert("isGateway".into(), true.into());
    }
    if !conf.cni_version.is_empty() {
        d.insert("cniVersion".into(), conf.cni_version.clone().into());
    }
    d.insert(
        "ipam".into(),
        Value::Object(delegate_ipam(conf.ipam.as_ref(), env)?),
    );
    Ok(d)
}

/// Serialises a delegate config as the Go plugin writes it.
pub fn serialize(d: &Map<String, Value>) -> String {
    delegate_to_go_json(&Value::Object(d.clone()))
}

/// Path of the saved config of a container.
pub fn saved_path(data_dir: &str, container_id: &str) -> PathBuf {
    Path::new(data_dir).join(container_id)
}

/// Saves the delegate config (dir 0700, file 0600, fsync'd) before the delegate runs.
pub fn save(data_dir: &str, container_id: &str, bytes: &[u8]) -> Result<(), String> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(data_dir)
        .map_err(|e| format!("mkdir {data_dir}: {e}"))?;
    let path = saved_path(data_dir, container_id);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| format!("open {}: {e}", path.display()))?;
    f.write_all(bytes)
        .and_then(|_| f.set_permissions(std::fs::Permissions::from_mode(0o600)))
        .and_then(|_| f.sync_all())
        .map_err(|e| format!("write {}: {e}", path.display()))
}

/// Finds a plugin binary in `CNI_PATH` (a name with `/` is refused).
pub fn find_plugin(name: &str, cni_path: &str) -> Result<PathBuf, String> {
    let dirs: Vec<&str> = cni_path.split(':').filter(|d| !d.is_empty()).collect();
    let not_found = || {
        format!(
            "failed to find plugin {name:?} in path [{}]",
            dirs.join(" ")
        )
    };
    if name.contains('/') || name.is_empty() {
        return Err(not_found());
    }
    for d in &dirs {
        let p = Path::new(d).join(name);
        if p.metadata().map(|m| m.is_file()).unwrap_or(false) {
            return Ok(p);
        }
    }
    Err(not_found())
}

/// Runs a delegate with `CNI_COMMAND=command` and `stdin`; returns its stdout on success, or the
/// CNI error it reported (passed through unchanged, like the Go library v1.3 does).
pub fn run(plugin: &Path, command: &str, stdin: &[u8], wrap: &str) -> Result<Vec<u8>, CniError> {
    let mut attempt = 0;
    let child = loop {
        let spawned = Command::new(plugin)
            .env("CNI_COMMAND", command)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn();
        match spawned {
            Ok(c) => break c,
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && attempt < 5 => {
                attempt += 1;
                std::thread::sleep(std::time::Duration::from_secs(1));
            }
            Err(e) => {
                return Err(CniError::internal(format!(
                    "{wrap}: failed to run {}: {e}",
                    plugin.display()
                )))
            }
        }
    };
    let mut child = child;
    if let Some(mut pipe) = child.stdin.take() {
        let _ = pipe.write_all(stdin);
    }
    let out = child
        .wait_with_output()
        .map_err(|e| CniError::internal(format!("{wrap}: {e}")))?;
    let _ = std::io::stderr().write_all(&out.stderr);
    if out.status.success() {
        return Ok(out.stdout);
    }
    let stdout = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if stdout.is_empty() {
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
        return Err(CniError::internal(if stderr.is_empty() {
            format!(
                "{wrap}: netplugin failed with no error message: {}",
                out.status
            )
        } else {
            format!("{wrap}: netplugin failed: {stderr:?}")
        }));
    }
    match serde_json::from_str::<Value>(&stdout) {
        Ok(Value::Object(m)) if m.get("code").and_then(Value::as_u64).is_some() => {
            let code = m["code"].as_u64().unwrap_or(999) as u32;
            let msg = m
                .get("msg")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            let details = m.get("details").and_then(Value::as_str).unwrap_or("");
            Err(CniError::new(code, msg).with_details(details))
        }
        Ok(_) | Err(_) => {
            let why = serde_json::from_str::<Value>(&stdout)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_else(|| "not a CNI error object".into());
            Err(CniError::internal(format!(
                "{wrap}: netplugin failed but error parsing its diagnostic message {stdout:?}: {why}"
            )))
        }
    }
}
