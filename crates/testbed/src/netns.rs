//! Network namespaces as test hosts.

use std::net::Ipv4Addr;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Once};

use crate::{unique_name, PREFIX};

static CLEANUP: Once = Once::new();

fn pid_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

fn owner_pid(name: &str) -> Option<u32> {
    name.strip_prefix(&format!("{PREFIX}-"))?
        .split('-')
        .next()?
        .parse()
        .ok()
}

/// Removes namespaces and temp dirs left by test runs whose process is gone (once per process).
pub fn cleanup_leftovers() {
    CLEANUP.call_once(|| {
        if let Ok(out) = Command::new("ip").args(["netns", "list"]).output() {
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                let name = line.split_whitespace().next().unwrap_or("");
                if let Some(pid) = owner_pid(name) {
                    if !pid_alive(pid) {
                        kill_all_in(name);
                        let _ = Command::new("ip").args(["netns", "del", name]).status();
                    }
                }
            }
        }
        if let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if let Some(pid) = owner_pid(&name) {
                    if !pid_alive(pid) {
                        let _ = std::fs::remove_dir_all(e.path());
                    }
                }
            }
        }
    });
}

fn kill_all_in(ns: &str) {
    if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            if let Ok(pid) = pid.parse::<i32>() {
                // SAFETY: sending a signal has no memory-safety preconditions.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
        }
    }
}

/// Moves the calling thread into the network namespace at `path` (`/run/netns/<name>`), for
/// in-process servers and sockets that must live in a test namespace.
pub fn enter_netns(path: &Path) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path)?;
    // SAFETY: setns on a valid namespace fd only changes this thread's network namespace.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A named network namespace, deleted (with every process in it) on drop.
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Creates a namespace with loopback up.
    pub fn new(tag: &str) -> Self {
        crate::require_root();
        cleanup_leftovers();
        let name = unique_name(tag);
        run_checked(Command::new("ip").args(["netns", "add", &name]));
        let ns = NetNs { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// The namespace name (as `ip netns` knows it).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A command that will run inside the namespace; the child dies with the test thread.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        // SAFETY: prctl is async-signal-safe; it only sets the parent-death signal.
        unsafe {
            c.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        c
    }

    /// An HTTP/1.1 GET from inside the namespace (as a kubelet probe or a Prometheus scrape
    /// does); returns the whole response, head and body, or "" if nothing answered in 5 s.
    pub fn http_get(&self, host: &str, port: u16, path: &str) -> String {
        let script = format!(
            "exec 3<>/dev/tcp/{host}/{port} || exit 1; \
             printf 'GET {path} HTTP/1.1\\r\\nHost: {host}\\r\\nConnection: close\\r\\n\\r\\n' >&3; \
             timeout 5 cat <&3"
        );
        let out = self.exec("bash", &["-c", &script]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs a command in the namespace and returns its output (whatever the exit status).
    pub fn exec(&self, program: &str, args: &[&str]) -> Output {
        self.command(program)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("failed to run {program} in {}: {e}", self.name))
    }

    /// Runs a command in the namespace, panicking with its stderr if it fails; returns stdout.
    pub fn run(&self, program: &str, args: &[&str]) -> String {
        let out = self.exec(program, args);
        assert!(
            out.status.success(),
            "`{program} {}` in {} failed: {}",
            args.join(" "),
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `ip <args>` in the namespace (test set-up only; the product uses netlink).
    pub fn ip(&self, args: &[&str]) -> String {
        self.run("ip", args)
    }

    /// Sends one UDP datagram from inside the namespace (a thread joins it with setns).
    pub fn udp_send(&self, to: std::net::SocketAddrV4, payload: &[u8]) {
        let path = format!("/run/netns/{}", self.name);
        let payload = payload.to_vec();
        std::thread::spawn(move || {
            enter_netns(Path::new(&path))
                .unwrap_or_else(|e| panic!("entering network namespace {path}: {e}"));
            let sock = std::net::UdpSocket::bind("0.0.0.0:0").expect("bind");
            sock.send_to(&payload, to).expect("send");
        })
        .join()
        .expect("udp_send thread");
    }

    /// Runs `f` on a thread that has joined the namespace (for in-process netlink: a netlink
    /// socket stays bound to the namespace it was opened in) and returns its result; a panic
    /// in `f` is re-raised here.
    pub fn run_in<R: Send + 'static>(&self, f: impl FnOnce() -> R + Send + 'static) -> R {
        let path = format!("/run/netns/{}", self.name);
        let joined = std::thread::spawn(move || {
            enter_netns(Path::new(&path))
                .unwrap_or_else(|e| panic!("entering network namespace {path}: {e}"));
            f()
        })
        .join();
        match joined {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }

    /// Spawns a long-running process in the namespace.
    pub fn spawn(&self, mut cmd: Command) -> Child {
        cmd.spawn()
            .unwrap_or_else(|e| panic!("failed to spawn in {}: {e}", self.name))
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        kill_all_in(&self.name);
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn run_checked(cmd: &mut Command) {
    let out = cmd.output().expect("run command");
    assert!(
        out.status.success(),
        "{:?} failed: {}",
        cmd,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A stand-alone host: a namespace whose `eth0` (a veth; its peer `eth0p` stays in the same
/// namespace) has `ip/24` and a default route, enough for interface selection and a local etcd.
pub struct Host {
    /// The host's namespace.
    pub ns: Arc<NetNs>,
    /// The address of `eth0`.
    pub ip: Ipv4Addr,
}

impl Host {
    /// Creates the host with `eth0` = `ip`/24 and a default route via `.1` of that /24.
    pub fn standalone(tag: &str, ip: Ipv4Addr) -> Self {
        let ns = NetNs::new(tag);
        ns.ip(&[
            "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p",
        ]);
        ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
        ns.ip(&["link", "set", "eth0", "up"]);
        ns.ip(&["link", "set", "eth0p", "up"]);
        let o = ip.octets();
        let gw = Ipv4Addr::new(o[0], o[1], o[2], 1);
        ns.ip(&["route", "add", "default", "via", &gw.to_string()]);
        Host {
            ns: Arc::new(ns),
            ip,
        }
    }

    /// Adds a second veth interface `name` with `addr` (CIDR) for multi-NIC tests.
    pub fn add_interface(&self, name: &str, cidr: &str) {
        let peer = format!("{name}p");
        self.ns
            .ip(&["link", "add", name, "type", "veth", "peer", "name", &peer]);
        self.ns.ip(&["addr", "add", cidr, "dev", name]);
        self.ns.ip(&["link", "set", name, "up"]);
        self.ns.ip(&["link", "set", &peer, "up"]);
    }
}
