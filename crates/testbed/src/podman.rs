//! Containers for tests: the flannel-rs image (built by `scripts/image.sh`) run with podman,
//! the way a kubelet runs the DaemonSet's containers: a manifest's `command` + `args`, env,
//! bind mounts of host directories, the network namespace of a test host (`hostNetwork`), and
//! privileges or capabilities.
//!
//! Safety rules: a container only ever joins a test namespace (`--net=ns:/run/netns/<name>`) or
//! no network at all (`--net=none`), so podman never creates a bridge or rule in the root
//! namespace; every container is named `frs-<pid>-<n>-<tag>` and removed on drop (also on
//! panic), and containers left by a test process that died are removed by the next one.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Mutex, Once};
use std::time::{Duration, Instant};

use crate::netns::NetNs;
use crate::{unique_name, wait_for, TempDir, PREFIX};

/// The image `scripts/image.sh` builds.
pub const IMAGE: &str = "localhost/flannel-rs:dev";

/// Where Kubernetes mounts a pod's service-account credentials.
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// `podman` with the options this kind of machine needs (no crun, no systemd cgroups).
pub fn podman() -> Command {
    let mut c = Command::new("podman");
    c.args(["--runtime", "runc", "--cgroup-manager=cgroupfs"]);
    c
}

fn podman_output(args: &[&str]) -> Output {
    podman()
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run podman (run scripts/install-deps.sh): {e}"))
}

static IMAGE_ID: Mutex<Option<String>> = Mutex::new(None);

/// Makes sure [`IMAGE`] is current and returns its id: runs `scripts/image.sh` once per test
/// process (it builds the binaries, and rebuilds the image only when the binaries, the
/// Containerfile or the base changed; a no-op run takes about half a second). Panics with the
/// script's output if it fails.
pub fn ensure_image() -> String {
    let mut id = IMAGE_ID.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(id) = id.as_ref() {
        return id.clone();
    }
    crate::require_root();
    cleanup_leftover_containers();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/image.sh");
    let started = Instant::now();
    // Tests put the debug binaries the suite has just built into the image (no release build);
    // FLANNEL_RS_IMAGE_PROFILE=release tests the release build instead.
    let profile = std::env::var("FLANNEL_RS_IMAGE_PROFILE").unwrap_or_else(|_| "debug".into());
    let out = Command::new("bash")
        .arg(&script)
        .env("FLANNEL_RS_IMAGE_PROFILE", profile)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", script.display()));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{} failed ({}):\n{stderr}",
        script.display(),
        out.status
    );
    let image = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap_or("")
        .trim()
        .to_string();
    assert!(!image.is_empty(), "image.sh printed no image id:\n{stderr}");
    eprintln!(
        "image {IMAGE} = {} (ensured in {:.1?})",
        &image[..12.min(image.len())],
        started.elapsed()
    );
    *id = Some(image.clone());
    image
}

static CLEANUP: Once = Once::new();

/// Removes containers named by test processes that are gone (once per process).
pub fn cleanup_leftover_containers() {
    CLEANUP.call_once(|| {
        let Ok(out) = podman()
            .args(["ps", "-a", "--format", "{{.Names}}"])
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
        else {
            return;
        };
        for name in String::from_utf8_lossy(&out.stdout).lines() {
            let pid = name
                .strip_prefix(&format!("{PREFIX}-"))
                .and_then(|r| r.split('-').next())
                .and_then(|p| p.parse::<u32>().ok());
            if let Some(pid) = pid {
                if !Path::new(&format!("/proc/{pid}")).exists() {
                    let _ = podman_output(&["rm", "-f", "-t", "0", name]);
                }
            }
        }
    });
}

/// A bind mount of a host path into the container.
#[derive(Debug, Clone)]
pub struct Mount {
    /// The host file or directory (must exist).
    pub host: PathBuf,
    /// Where it appears in the container.
    pub container: String,
    /// Mounted read-only.
    pub read_only: bool,
}

impl Mount {
    /// A read-write bind mount.
    pub fn rw(host: impl Into<PathBuf>, container: &str) -> Self {
        Mount {
            host: host.into(),
            container: container.to_string(),
            read_only: false,
        }
    }

    /// A read-only bind mount.
    pub fn ro(host: impl Into<PathBuf>, container: &str) -> Self {
        Mount {
            read_only: true,
            ..Self::rw(host, container)
        }
    }
}

/// What the container may do.
#[derive(Debug, Clone)]
pub enum Security {
    /// podman's default capability set.
    Default,
    /// `privileged: true`.
    Privileged,
    /// `capabilities.add` (e.g. `NET_ADMIN`, `NET_RAW`), not privileged.
    Caps(Vec<String>),
}

/// The downward-API values of a pod (what `fieldRef`s resolve to).
#[derive(Debug, Clone)]
pub struct PodIdentity {
    /// `metadata.name`.
    pub name: String,
    /// `metadata.namespace`.
    pub namespace: String,
    /// `spec.nodeName`.
    pub node_name: String,
    /// `status.hostIP` (and `status.podIP`, the pod uses the host's network).
    pub host_ip: String,
}

impl PodIdentity {
    /// The value of a `fieldRef.fieldPath`, if it is one we know.
    pub fn field(&self, path: &str) -> Option<String> {
        match path {
            "metadata.name" => Some(self.name.clone()),
            "metadata.namespace" => Some(self.namespace.clone()),
            "spec.nodeName" => Some(self.node_name.clone()),
            "status.hostIP" | "status.podIP" => Some(self.host_ip.clone()),
            _ => None,
        }
    }
}

/// A pod's service-account credentials as Kubernetes mounts them (`token`, `ca.crt`,
/// `namespace`), written to a temp dir that is removed on drop.
pub struct ServiceAccount {
    dir: TempDir,
}

impl ServiceAccount {
    /// Writes the three files.
    pub fn new(token: &str, ca_pem: &str, namespace: &str) -> Self {
        let dir = TempDir::new("sa");
        for (name, body) in [
            ("token", token),
            ("ca.crt", ca_pem),
            ("namespace", namespace),
        ] {
            std::fs::write(dir.join(name), body).expect("write service-account file");
        }
        ServiceAccount { dir }
    }

    /// The host directory.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Its read-only mount at [`SERVICE_ACCOUNT_DIR`].
    pub fn mount(&self) -> Mount {
        Mount::ro(self.dir.path(), SERVICE_ACCOUNT_DIR)
    }
}

/// The environment a kubelet gives every container for the in-cluster API server address.
pub fn in_cluster_env(host: &str, port: u16) -> Vec<(String, String)> {
    vec![
        ("KUBERNETES_SERVICE_HOST".into(), host.to_string()),
        ("KUBERNETES_SERVICE_PORT".into(), port.to_string()),
    ]
}

/// What to run: build it, then [`Container::run`] it.
#[derive(Debug, Clone)]
pub struct Spec {
    tag: String,
    image: String,
    command: Vec<String>,
    args: Vec<String>,
    env: Vec<(String, String)>,
    mounts: Vec<Mount>,
    net: Option<String>,
    security: Security,
}

impl Spec {
    /// A container of `image`; `tag` ends its name (`frs-<pid>-<n>-<tag>`). No network until
    /// [`Self::host_network`] is called.
    pub fn new(tag: &str, image: &str) -> Self {
        Spec {
            tag: tag.to_string(),
            image: image.to_string(),
            command: vec![],
            args: vec![],
            env: vec![],
            mounts: vec![],
            net: None,
            security: Security::Default,
        }
    }

    /// The manifest's `command` (replaces the image's ENTRYPOINT; empty keeps it).
    pub fn command<S: AsRef<str>>(mut self, command: &[S]) -> Self {
        self.command = command.iter().map(|s| s.as_ref().to_string()).collect();
        self
    }

    /// The manifest's `args` (replace the image's CMD).
    pub fn args<S: AsRef<str>>(mut self, args: &[S]) -> Self {
        self.args = args.iter().map(|s| s.as_ref().to_string()).collect();
        self
    }

    /// One environment variable.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    /// Several environment variables.
    pub fn envs(mut self, vars: impl IntoIterator<Item = (String, String)>) -> Self {
        self.env.extend(vars);
        self
    }

    /// A bind mount.
    pub fn mount(mut self, m: Mount) -> Self {
        self.mounts.push(m);
        self
    }

    /// In-cluster credentials: `KUBERNETES_SERVICE_HOST`/`PORT` and the service account mounted
    /// at [`SERVICE_ACCOUNT_DIR`], as a kubelet provides them.
    pub fn in_cluster(self, sa: &ServiceAccount, host: &str, port: u16) -> Self {
        self.envs(in_cluster_env(host, port)).mount(sa.mount())
    }

    /// `hostNetwork: true` on a test host: the container joins that namespace.
    pub fn host_network(mut self, ns: &NetNs) -> Self {
        self.net = Some(format!("ns:/run/netns/{}", ns.name()));
        self
    }

    /// Privileges.
    pub fn security(mut self, security: Security) -> Self {
        self.security = security;
        self
    }

    /// The `podman run` arguments after `run`.
    fn run_args(&self, name: &str) -> Vec<String> {
        let mut a: Vec<String> = vec![
            "-d".into(),
            format!("--name={name}"),
            "--pull=never".into(),
            "--log-driver=k8s-file".into(),
            format!("--net={}", self.net.as_deref().unwrap_or("none")),
        ];
        match &self.security {
            Security::Default => {}
            Security::Privileged => a.push("--privileged".into()),
            Security::Caps(caps) if !caps.is_empty() => {
                a.push(format!("--cap-add={}", caps.join(",")));
            }
            Security::Caps(_) => {}
        }
        for (k, v) in &self.env {
            a.push("--env".into());
            a.push(format!("{k}={v}"));
        }
        for m in &self.mounts {
            a.push("--mount".into());
            a.push(format!(
                "type=bind,source={},destination={}{}",
                m.host.display(),
                m.container,
                if m.read_only { ",ro=true" } else { "" }
            ));
        }
        if !self.command.is_empty() {
            a.push(format!(
                "--entrypoint={}",
                serde_json::to_string(&self.command).expect("json")
            ));
        }
        a.push(self.image.clone());
        a.extend(self.args.iter().cloned());
        a
    }
}

/// A container started by [`Container::run`]; `podman rm -f` on drop.
pub struct Container {
    name: String,
    started_in: Duration,
    exit: Option<i32>,
}

impl Container {
    /// Starts the container (detached) and returns once podman reports it started. The image
    /// must exist (see [`ensure_image`]); bind-mounted host paths must exist.
    pub fn run(spec: &Spec) -> Self {
        crate::require_root();
        crate::netns::cleanup_leftovers();
        cleanup_leftover_containers();
        for m in &spec.mounts {
            assert!(m.host.exists(), "mount source {} missing", m.host.display());
        }
        let name = unique_name(&spec.tag);
        let args = spec.run_args(&name);
        let t = Instant::now();
        let out = podman()
            .arg("run")
            .args(&args)
            .stdin(Stdio::null())
            .output()
            .expect("run podman");
        let started_in = t.elapsed();
        // Owns the name from here on, so a failed start is removed too.
        let c = Container {
            name,
            started_in,
            exit: None,
        };
        assert!(
            out.status.success(),
            "podman run {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        c
    }

    /// The container's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// How long `podman run -d` took (create + start).
    pub fn started_in(&self) -> Duration {
        self.started_in
    }

    /// stdout and stderr so far, interleaved as podman recorded them.
    pub fn logs(&self) -> String {
        let out = podman_output(&["logs", &self.name]);
        let mut s = String::from_utf8_lossy(&out.stdout).into_owned();
        s.push_str(&String::from_utf8_lossy(&out.stderr));
        s
    }

    /// The exit code once the container has exited, else `None`.
    pub fn exit_code(&mut self) -> Option<i32> {
        if self.exit.is_none() {
            let out = podman_output(&[
                "inspect",
                "--format",
                "{{.State.Status}} {{.State.ExitCode}}",
                &self.name,
            ]);
            let text = String::from_utf8_lossy(&out.stdout);
            let mut f = text.split_whitespace();
            if let (Some("exited" | "stopped"), Some(code)) = (f.next(), f.next()) {
                self.exit = code.parse().ok();
            }
        }
        self.exit
    }

    /// Whether the container is still running.
    pub fn running(&mut self) -> bool {
        self.exit_code().is_none()
    }

    /// Waits for the container to exit and returns its exit code; panics (with its logs) after
    /// `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> i32 {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            wait_for(timeout, &format!("container {} to exit", self.name), || {
                self.exit_code()
            })
        }));
        r.unwrap_or_else(|e| {
            eprintln!("--- logs of {} ---\n{}", self.name, self.logs());
            std::panic::resume_unwind(e)
        })
    }

    /// SIGTERM (SIGKILL after `grace`), then the exit code.
    pub fn stop(&mut self, grace: Duration) -> i32 {
        let secs = grace.as_secs().max(1).to_string();
        let out = podman_output(&["stop", "-t", &secs, &self.name]);
        assert!(
            out.status.success(),
            "podman stop {}: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        self.wait_exit(Duration::from_secs(5))
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- logs of container {} ---\n{}", self.name, self.logs());
        }
        let _ = podman_output(&["rm", "-f", "-t", "0", &self.name]);
    }
}
