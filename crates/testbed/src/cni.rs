//! Invoking CNI plugins the way a container runtime does (environment + stdin, in a host
//! namespace), for the plugin tests, the cluster's pods and the CNI benchmark.

use std::io::Write;
use std::path::PathBuf;
use std::process::Stdio;

use crate::netns::NetNs;

/// Where Debian's reference CNI plugins live.
pub const DEBIAN_CNI_PATH: &str = "/usr/lib/cni";

/// What a plugin call produced.
#[derive(Debug, Clone)]
pub struct CniOutcome {
    /// Exit code.
    pub code: i32,
    /// stdout (result or error JSON).
    pub stdout: String,
    /// stderr (logs).
    pub stderr: String,
}

impl CniOutcome {
    /// Whether the plugin exited 0.
    pub fn ok(&self) -> bool {
        self.code == 0
    }

    /// stdout parsed as JSON (panics with the output if it is not).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("plugin output is not JSON ({e}): {self:?}"))
    }
}

/// One CNI call's parameters.
#[derive(Debug, Clone)]
pub struct CniCall<'a> {
    /// CNI_COMMAND.
    pub command: &'a str,
    /// CNI_CONTAINERID.
    pub container_id: &'a str,
    /// Pod namespace name (CNI_NETNS = /run/netns/<name>), or empty.
    pub pod_ns: &'a str,
    /// CNI_IFNAME.
    pub ifname: &'a str,
    /// The config on stdin.
    pub stdin: &'a str,
}

/// Runs `plugin` in `host` with the given CNI call; `cni_path` is CNI_PATH.
pub fn invoke(host: &NetNs, plugin: &PathBuf, cni_path: &str, call: &CniCall) -> CniOutcome {
    let mut cmd = host.command(plugin);
    cmd.env("CNI_COMMAND", call.command)
        .env("CNI_CONTAINERID", call.container_id)
        .env(
            "CNI_NETNS",
            if call.pod_ns.is_empty() {
                String::new()
            } else {
                format!("/run/netns/{}", call.pod_ns)
            },
        )
        .env("CNI_IFNAME", call.ifname)
        .env("CNI_PATH", cni_path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("run CNI plugin");
    if let Some(mut pipe) = child.stdin.take() {
        let _ = pipe.write_all(call.stdin.as_bytes());
    }
    let out = child.wait_with_output().expect("CNI plugin output");
    CniOutcome {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// CNI_PATH with our plugins first and Debian's delegates after.
pub fn our_cni_path() -> String {
    format!("{}:{DEBIAN_CNI_PATH}", crate::bin_dir().display())
}

/// Our `flannel` plugin binary.
pub fn flannel_plugin() -> PathBuf {
    crate::binary("flannel")
}
