//! A real `flanneld` process inside a test namespace, with its log captured to a file.

use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use crate::netns::NetNs;
use crate::{binary, unique_name, wait_for};

/// A running flanneld; killed on drop.
pub struct Flanneld {
    ns: Arc<NetNs>,
    child: Option<Child>,
    log: PathBuf,
    status: Option<ExitStatus>,
}

impl Flanneld {
    /// Starts `flanneld <args>` in `ns`, logging to a file in `dir`.
    pub fn start<S: AsRef<str>>(ns: &Arc<NetNs>, dir: &Path, args: &[S]) -> Self {
        Self::start_env(ns, dir, args, &[])
    }

    /// Like [`Self::start`], with extra environment variables.
    pub fn start_env<S: AsRef<str>>(
        ns: &Arc<NetNs>,
        dir: &Path,
        args: &[S],
        env: &[(&str, &str)],
    ) -> Self {
        let log = dir.join(format!("{}.log", unique_name("flanneld")));
        let file = std::fs::File::create(&log).expect("flanneld log");
        // `TESTBED_PRIVATE_RUN=1`: flanneld gets its own mount namespace with a tmpfs on /run,
        // like a real host (e.g. its own /run/flannel/wgkey and /var/run/wireguard sockets);
        // reach it with `nsenter -t <pid> -m -n`.
        let private_run = env
            .iter()
            .any(|(k, v)| *k == "TESTBED_PRIVATE_RUN" && *v == "1");
        let mut cmd = if private_run {
            let mut c = ns.command("unshare");
            c.args([
                "-m",
                "--propagation",
                "private",
                "sh",
                "-c",
                "mount -t tmpfs -o mode=755 tmpfs /run && exec \"$0\" \"$@\"",
            ])
            .arg(binary("flanneld"));
            c
        } else {
            ns.command(binary("flanneld"))
        };
        cmd.args(args.iter().map(|a| a.as_ref()))
            .env("RUST_LOG", "info,flanneld=debug")
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log fd"))
            .stderr(file);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = ns.spawn(cmd);
        Flanneld {
            ns: ns.clone(),
            child: Some(child),
            log,
            status: None,
        }
    }

    /// The namespace it runs in.
    pub fn ns(&self) -> &NetNs {
        &self.ns
    }

    /// The process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Resident memory of the process in KiB (from /proc), if it is running.
    pub fn rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()?)).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
    }

    /// Everything logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log contains `needle`; panics (showing the log) on timeout or early exit.
    pub fn wait_log(&mut self, needle: &str, timeout: Duration) {
        let what = format!("flanneld to log {needle:?}");
        let mut exited = None;
        wait_for(timeout, &what, || {
            if self.log().contains(needle) {
                return Some(());
            }
            if let Some(st) = self.try_status() {
                exited = Some(st);
                return Some(());
            }
            None
        });
        if let Some(st) = exited {
            if !self.log().contains(needle) {
                panic!(
                    "flanneld exited ({st}) before logging {needle:?}:\n{}",
                    self.log()
                );
            }
        }
    }

    /// Waits for the subnet file to exist and returns its contents.
    pub fn wait_subnet_env(&mut self, path: &Path, timeout: Duration) -> String {
        let what = format!("{} to be written", path.display());
        let log = self.log.clone();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            wait_for(timeout, &what, || {
                if let Some(st) = self.try_status() {
                    panic!(
                        "flanneld exited ({st}) before writing {}:\n{}",
                        path.display(),
                        std::fs::read_to_string(&log).unwrap_or_default()
                    );
                }
                std::fs::read_to_string(path).ok()
            })
        }));
        match result {
            Ok(v) => v,
            Err(e) => {
                eprintln!("flanneld log:\n{}", self.log());
                std::panic::resume_unwind(e)
            }
        }
    }

    /// The exit status if the process has ended.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    self.status = Some(st);
                }
            }
        }
        self.status
    }

    /// Sends a signal.
    pub fn signal(&self, sig: i32) {
        if let Some(pid) = self.pid() {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe {
                libc::kill(pid as i32, sig);
            }
        }
    }

    /// Waits for the process to exit; panics (with the log) on timeout.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let log = self.log.clone();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            wait_for(timeout, "flanneld to exit", || self.try_status())
        }));
        r.unwrap_or_else(|e| {
            eprintln!(
                "flanneld log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::panic::resume_unwind(e)
        })
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        self.wait_exit(Duration::from_secs(10))
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            if let Ok(st) = c.wait() {
                self.status = Some(st);
            }
        }
    }

    /// Lease events the backend received, replayed from the log: the remote subnets it knows.
    pub fn known_leases(&self) -> Vec<String> {
        let mut known = std::collections::BTreeSet::new();
        for line in self.log().lines() {
            if let Some(rest) = line.split("lease added: ").nth(1) {
                known.insert(rest.split_whitespace().next().unwrap_or("").to_string());
            } else if let Some(rest) = line.split("lease removed: ").nth(1) {
                known.remove(rest.split_whitespace().next().unwrap_or(""));
            }
        }
        known.into_iter().collect()
    }
}

impl Drop for Flanneld {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "--- flanneld log ({}) ---\n{}",
                self.log.display(),
                self.log()
            );
        }
    }
}
