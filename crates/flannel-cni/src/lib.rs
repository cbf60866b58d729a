//! The `flannel` CNI plugin, drop-in compatible with the Go plugin.
//!
//! A meta plugin: reads flanneld's subnet.env, builds a config for a delegate (bridge +
//! host-local by default), saves it per container so DEL can replay it, and runs the delegate.
//! Synchronous and small on purpose: it runs once per pod start and stop.
//!
//! Better than the reference: the saved file is kept when the delegate's DEL fails; a failed ADD
//! undoes the delegate; the result is converted to the requested cniVersion; CHECK is forwarded
//! to the delegate; STATUS reports 50 while subnet.env is missing; GC removes saved files of
//! containers that no longer exist; a malformed subnet.env is an error, never a crash.

pub mod conf;
pub mod delegate;
pub mod error;
pub mod gojson;
pub mod result;
pub mod subnet_env;

use std::path::Path;

use serde_json::Value;

use conf::NetConf;
use error::{code, CniError};
use result::{version_key, SUPPORTED};
use subnet_env::FlannelEnv;

/// The CNI_* environment of one invocation.
#[derive(Debug, Clone, Default)]
pub struct CniEnv {
    /// CNI_COMMAND.
    pub command: String,
    /// CNI_CONTAINERID.
    pub container_id: String,
    /// CNI_NETNS.
    pub netns: String,
    /// CNI_IFNAME.
    pub ifname: String,
    /// CNI_PATH.
    pub path: String,
}

impl CniEnv {
    /// Reads the process environment.
    pub fn from_process() -> Self {
        let var = |k: &str| std::env::var(k).unwrap_or_default();
        CniEnv {
            command: var("CNI_COMMAND"),
            container_id: var("CNI_CONTAINERID"),
            netns: var("CNI_NETNS"),
            ifname: var("CNI_IFNAME"),
            path: var("CNI_PATH"),
        }
    }
}

/// The VERSION reply.
pub fn version_reply() -> String {
    let list: Vec<String> = SUPPORTED.iter().map(|v| format!("{v:?}")).collect();
    format!(
        "{{\"cniVersion\":\"1.1.0\",\"supportedVersions\":[{}]}}\n",
        list.join(",")
    )
}

fn valid_id(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

fn check_env(env: &CniEnv) -> Result<(), CniError> {
    let needed: &[(&str, &str)] = match env.command.as_str() {
        "ADD" | "CHECK" => &[
            ("CNI_CONTAINERID", &env.container_id),
            ("CNI_NETNS", &env.netns),
            ("CNI_IFNAME", &env.ifname),
            ("CNI_PATH", &env.path),
        ],
        "DEL" => &[
            ("CNI_CONTAINERID", &env.container_id),
            ("CNI_IFNAME", &env.ifname),
            ("CNI_PATH", &env.path),
        ],
        _ => &[("CNI_PATH", &env.path)],
    };
    let missing: Vec<&str> = needed
        .iter()
        .filter(|(_, v)| v.is_empty())
        .map(|(k, _)| *k)
        .collect();
    if !missing.is_empty() {
        return Err(CniError::new(
            code::INVALID_ENV,
            format!("required env variables [{}] missing", missing.join(",")),
        ));
    }
    if matches!(env.command.as_str(), "ADD" | "CHECK" | "DEL") {
        if !valid_id(&env.container_id) {
            return Err(
                CniError::new(code::INVALID_ENV, "invalid characters in containerID")
                    .with_details(env.container_id.clone()),
            );
        }
        let i = &env.ifname;
        if i.len() > 15 {
            return Err(
                CniError::new(code::INVALID_ENV, "interface name is too long")
                    .with_details("interface name should be less than 16 characters"),
            );
        }
        if i == "." || i == ".." {
            return Err(CniError::new(
                code::INVALID_ENV,
                "interface name is . or ..",
            ));
        }
        if i.chars().any(|c| c == '/' || c == ':' || c.is_whitespace()) {
            return Err(CniError::new(
                code::INVALID_ENV,
                "interface name contains / or : or whitespace characters",
            ));
        }
    }
    Ok(())
}

/// Generic checks of the stdin config (as the Go `skel` does before the plugin runs).
fn check_config(command: &str, stdin: &[u8]) -> Result<(String, String), CniError> {
    let v: Value = serde_json::from_slice(stdin).map_err(|e| {
        CniError::new(
            code::DECODE,
            format!(
                "error unmarshall network config: {}",
                flannel_types::gojson::go_syntax_error(&e)
            ),
        )
    })?;
    let name = v.get("name").and_then(Value::as_str).unwrap_or("");
    if name.is_empty() {
        return Err(CniError::new(
            code::INVALID_NETWORK_CONFIG,
            "missing network name",
        ));
    }
    if !valid_id(name) {
        return Err(CniError::new(
            code::INVALID_NETWORK_CONFIG,
            "invalid characters found in network name",
        )
        .with_details(name));
    }
    let version = v
        .get("cniVersion")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let effective = if version.is_empty() {
        "0.1.0"
    } else {
        &version
    };
    if !SUPPORTED.contains(&effective) {
        let list: Vec<String> = SUPPORTED.iter().map(|s| format!("{s:?}")).collect();
        return Err(
            CniError::new(code::INCOMPATIBLE_VERSION, "incompatible CNI versions").with_details(
                format!(
                    "config is {effective:?}, plugin supports [{}]",
                    list.join(" ")
                ),
            ),
        );
    }
    let min = match command {
        "CHECK" => Some((0, 4, 0)),
        "STATUS" | "GC" => Some((1, 1, 0)),
        _ => None,
    };
    if let Some(min) = min {
        if version_key(effective) < min {
            return Err(CniError::new(
                code::INCOMPATIBLE_VERSION,
                format!("config version does not allow {command}"),
            ));
        }
    }
    Ok((name.to_string(), version))
}

/// Handles one invocation; `Ok(Some(text))` is printed on stdout.
pub fn handle(env: &CniEnv, stdin: &[u8]) -> Result<Option<String>, CniError> {
    match env.command.as_str() {
        "VERSION" => return Ok(Some(version_reply())),
        "ADD" | "DEL" | "CHECK" | "STATUS" | "GC" => {}
        other => {
            return Err(CniError::new(
                code::INVALID_ENV,
                format!("unknown CNI_COMMAND: {other}"),
            ))
        }
    }
    check_env(env)?;
    check_config(&env.command, stdin)?;
    match env.command.as_str() {
        "ADD" => cmd_add(env, stdin).map(Some),
        "DEL" => cmd_del(env, stdin).map(|_| None),
        "CHECK" => cmd_check(env, stdin).map(|_| None),
        "STATUS" => cmd_status(env, stdin).map(|_| None),
        _ => cmd_gc(env, stdin).map(|_| None),
    }
}

fn cmd_add(env: &CniEnv, stdin: &[u8]) -> Result<String, CniError> {
    let conf = NetConf::parse(stdin).map_err(|e| {
        CniError::internal(format!(
            "failed to load flannel netconf file: failed to load netconf: {e}"
        ))
    })?;
    let fenv = FlannelEnv::load(Path::new(&conf.subnet_file)).map_err(CniError::internal)?;
    let delegate = delegate::build_delegate(&conf, &fenv).map_err(CniError::internal)?;
    let bytes = delegate::serialize(&delegate);
    eprintln!("delegateAdd: netconf sent to delegate plugin:\n{bytes}");
    delegate::save(&conf.data_dir, &env.container_id, bytes.as_bytes())
        .map_err(CniError::internal)?;
    let dtype = delegate
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or("bridge");
    let plugin = delegate::find_plugin(dtype, &env.path)
        .map_err(|e| CniError::internal(format!("failed to delegate add: {e}")))?;
    let out = match delegate::run(&plugin, "ADD", bytes.as_bytes(), "failed to delegate add") {
        Ok(out) => out,
        Err(e) => {
            // Undo whatever the delegate did before failing; the saved file stays for DEL.
            let _ = delegate::run(&plugin, "DEL", bytes.as_bytes(), "undo");
            return Err(e);
        }
    };
    let result: Value = serde_json::from_slice(&out).map_err(|e| {
        let _ = delegate::run(&plugin, "DEL", bytes.as_bytes(), "undo");
        CniError::internal(format!(
            "failed to delegate add: failed to parse the delegate's result: {e}"
        ))
    })?;
    let requested = if conf.cni_version.is_empty() {
        "0.1.0"
    } else {
        &conf.cni_version
    };
    let converted = result::convert(&result, requested, requested);
    Ok(gojson::to_indented(&converted))
}

fn cmd_del(env: &CniEnv, stdin: &[u8]) -> Result<(), CniError> {
    let conf = NetConf::parse(stdin)
        .map_err(|e| CniError::internal(format!("failed to load netconf: {e}")))?;
    let path = delegate::saved_path(&conf.data_dir, &env.container_id);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(CniError::internal(format!("open {}: {e}", path.display()))),
    };
    let saved: Value = match serde_json::from_slice(&bytes) {
        Ok(v) => v,
        Err(e) => {
            // Never block pod deletion on a damaged file; keep it for inspection.
            eprintln!("failed to parse netconf: {e}");
            return Ok(());
        }
    };
    let dtype = saved
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or("bridge");
    let plugin = delegate::find_plugin(dtype, &env.path).map_err(CniError::internal)?;
    delegate::run(&plugin, "DEL", &bytes, "failed to delegate del")?;
    let _ = std::fs::remove_file(&path);
    Ok(())
}

fn cmd_check(env: &CniEnv, stdin: &[u8]) -> Result<(), CniError> {
    let conf = NetConf::parse(stdin)
        .map_err(|e| CniError::internal(format!("failed to load netconf: {e}")))?;
    let path = delegate::saved_path(&conf.data_dir, &env.container_id);
    let bytes = std::fs::read(&path).map_err(|e| {
        CniError::new(
            code::UNKNOWN_CONTAINER,
            format!(
                "no saved delegate config for container {}",
                env.container_id
            ),
        )
        .with_details(format!("{}: {e}", path.display()))
    })?;
    let mut saved: serde_json::Map<String, Value> = serde_json::from_slice(&bytes)
        .map_err(|e| CniError::internal(format!("failed to parse netconf: {e}")))?;
    if let Some(prev) = conf.raw.get("prevResult") {
        let version = saved
            .get("cniVersion")
            .and_then(Value::as_str)
            .unwrap_or(&conf.cni_version)
            .to_string();
        let mut prev = result::convert(prev, &conf.cni_version, &version);
        result::fill_route_gateways(&mut prev);
        saved.insert("prevResult".into(), prev);
    }
    let dtype = saved
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or("bridge");
    let plugin = delegate::find_plugin(dtype, &env.path).map_err(CniError::internal)?;
    let body = gojson::to_go_json(&Value::Object(saved));
    delegate::run(
        &plugin,
        "CHECK",
        body.as_bytes(),
        "failed to delegate check",
    )
    .map(|_| ())
}

/// Whether a delegate speaks CNI 1.1.0 (STATUS and GC exist only there).
fn delegate_speaks_1_1(plugin: &Path) -> bool {
    delegate::run(plugin, "VERSION", b"{}", "version")
        .ok()
        .and_then(|out| serde_json::from_slice::<Value>(&out).ok())
        .and_then(|v| v.get("supportedVersions").cloned())
        .and_then(|v| v.as_array().cloned())
        .is_some_and(|a| a.iter().any(|x| x == "1.1.0"))
}

/// The delegate config ADD would build now (for STATUS and GC forwarding).
fn current_delegate(conf: &NetConf, env: &CniEnv) -> Option<(std::path::PathBuf, String)> {
    let fenv = FlannelEnv::load(Path::new(&conf.subnet_file)).ok()?;
    let d = delegate::build_delegate(conf, &fenv).ok()?;
    let dtype = d.get("type").and_then(Value::as_str).unwrap_or("bridge");
    let plugin = delegate::find_plugin(dtype, &env.path).ok()?;
    Some((plugin, delegate::serialize(&d)))
}

fn cmd_status(env: &CniEnv, stdin: &[u8]) -> Result<(), CniError> {
    let conf = NetConf::parse(stdin)
        .map_err(|e| CniError::internal(format!("failed to load netconf: {e}")))?;
    if let Err(e) = FlannelEnv::load(Path::new(&conf.subnet_file)) {
        return Err(CniError::new(
            code::PLUGIN_NOT_AVAILABLE,
            "flanneld is not ready on this node",
        )
        .with_details(e));
    }
    if let Some((plugin, body)) = current_delegate(&conf, env) {
        if delegate_speaks_1_1(&plugin) {
            delegate::run(
                &plugin,
                "STATUS",
                body.as_bytes(),
                "failed to delegate status",
            )?;
        }
    }
    Ok(())
}

fn cmd_gc(env: &CniEnv, stdin: &[u8]) -> Result<(), CniError> {
    let conf = NetConf::parse(stdin)
        .map_err(|e| CniError::internal(format!("failed to load netconf: {e}")))?;
    let valid: Vec<String> = conf
        .raw
        .get("cni.dev/valid-attachments")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|x| x.get("containerID").and_then(Value::as_str))
                .map(String::from)
                .collect()
        })
        .unwrap_or_default();
    let mut errors = vec![];
    if let Ok(entries) = std::fs::read_dir(&conf.data_dir) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if e.path().is_file() && valid_id(&name) && !valid.contains(&name) {
                if let Err(err) = std::fs::remove_file(e.path()) {
                    errors.push(format!("remove {}: {err}", e.path().display()));
                }
            }
        }
    }
    if let Some((plugin, body)) = current_delegate(&conf, env) {
        if delegate_speaks_1_1(&plugin) {
            let mut v: serde_json::Map<String, Value> =
                serde_json::from_str(&body).unwrap_or_default();
            if let Some(list) = conf.raw.get("cni.dev/valid-attachments") {
                v.insert("cni.dev/valid-attachments".into(), list.clone());
            }
            let body = gojson::to_go_json(&Value::Object(v));
            if let Err(e) = delegate::run(&plugin, "GC", body.as_bytes(), "failed to delegate gc") {
                errors.push(e.to_string());
            }
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(CniError::internal(errors.join("; ")))
    }
}
