//! The flannel-rs test-bed: hosts as network namespaces, a real etcd, real flanneld processes.
//!
//! Every end-to-end test builds its world through this crate, so set-up, clean-up (also after a
//! panic, through `Drop`) and the removal of a crashed run's leftovers live in one place. Nothing
//! here adds links, routes, addresses or rules to the root namespace.

pub mod bench;
pub mod capture;
pub mod cloud_aws;
pub mod cloud_gce;
pub mod cloud_tencent;
pub mod cluster;
pub mod cni;
pub mod etcd;
pub mod fixture;
pub mod flanneld;
pub mod golike;
pub mod kube_cluster;
pub mod kubeapi;
pub mod netns;
pub mod podman;
pub mod qemu;
pub mod soak;
pub mod tls;
pub mod uml;
pub mod wggo;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

pub use cluster::{Cluster, Pod};
pub use etcd::Etcd;
pub use fixture::EtcdHost;
pub use flanneld::Flanneld;
pub use kubeapi::{KubeApiOptions, KubeApiServer};
pub use netns::{Host, NetNs};

/// Prefix of every namespace and temp dir the test-bed creates (with the creating pid after it).
pub const PREFIX: &str = "frs";

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A name unique in this run and across concurrent runs: `frs-<pid>-<n>-<tag>`.
pub fn unique_name(tag: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    format!("{PREFIX}-{}-{n}-{tag}", std::process::id())
}

/// Fails the test loudly unless it runs as root (network namespaces need it).
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "these tests create network namespaces and must run as root"
    );
}

/// Polls `check` every 50 ms until it returns `Some`, or panics after `timeout` naming `what`.
pub fn wait_for<T>(timeout: Duration, what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Polls `check` every 50 ms until it returns true or `timeout` passes; says which.
pub fn poll_until(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if check() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Polls `check` every 100 ms until it returns `Ok` or `timeout` passes; then its last error.
pub fn poll_until_ok(
    timeout: Duration,
    mut check: impl FnMut() -> Result<(), String>,
) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        match check() {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// The host's own subnet recorded in a subnet.env (`FLANNEL_SUBNET`, network form).
pub fn env_subnet(path: &Path) -> ipnet::Ipv4Net {
    env_value(path, "FLANNEL_SUBNET")
        .parse::<ipnet::Ipv4Net>()
        .expect("FLANNEL_SUBNET")
        .trunc()
}

/// The host's own IPv6 subnet recorded in a subnet.env, if any.
pub fn env_subnet6(path: &Path) -> Option<ipnet::Ipv6Net> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("FLANNEL_IPV6_SUBNET="))
        .and_then(|v| v.parse::<ipnet::Ipv6Net>().ok())
        .map(|n| n.trunc())
}

/// One value of a subnet.env (panics, naming the file, if absent).
pub fn env_value(path: &Path, key: &str) -> String {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("{key} missing in {}", path.display()))
        .to_string()
}

/// The etcd key of a lease on these subnets, under the default prefix.
pub fn lease_key(v4: ipnet::Ipv4Net, v6: Option<ipnet::Ipv6Net>) -> String {
    let mut k = format!(
        "{}/subnets/{}-{}",
        fixture::PREFIX,
        v4.network(),
        v4.prefix_len()
    );
    if let Some(v6) = v6 {
        k.push_str(&format!("&{}-{}", v6.network(), v6.prefix_len()));
    }
    k
}

/// A directory removed on drop.
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates `/tmp/frs-<pid>-<n>-<tag>`.
    pub fn new(tag: &str) -> Self {
        netns::cleanup_leftovers();
        let path = std::env::temp_dir().join(unique_name(tag));
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir { path }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A path inside the directory.
    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// The directory holding the workspace's built binaries (`target/<profile>`).
pub fn bin_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("FLANNEL_RS_BIN_DIR") {
        return PathBuf::from(dir);
    }
    // Test executables live in target/<profile>/deps, other binaries in target/<profile>.
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().expect("exe dir");
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().expect("profile dir").to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

/// Path of a workspace binary, checked to exist.
pub fn binary(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} not built; run `cargo build` first (looked in {})",
        name,
        p.display()
    );
    p
}
