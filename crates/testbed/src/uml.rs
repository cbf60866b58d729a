//! A kernel with ipip, ESP and XFRM for tests: Debian's user-mode-linux kernel as a process.
//!
//! The host kernel of the CI machines lacks some modules (ipip, esp4), so tests that need them
//! run one command inside a UML guest: [`run_in_guest`] boots `linux.uml` with the host's root
//! through hostfs under an overlay (the guest's writes go to guest memory, never to the host's
//! disk), loads the modules, switches iptables to the legacy backend (the UML kernel has no
//! nf_tables for ip/inet) and runs the current test executable with the given arguments and
//! `FRS_IN_GUEST=1`. The guest part of a test is a normal `#[test]` that returns early unless
//! [`in_guest`] is true. The guest has one CPU and slow process creation: keep guest tests lean.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::TempDir;

/// The guest's PID 1 (overlay, mounts, modules, payload, exit code, power-off).
const INIT_SCRIPT: &str = include_str!("../uml/init.sh");

/// LD_PRELOAD shim that lets UML 6.1 write FPU state on hosts with large XSAVE areas (AMX).
const XSTATE_SHIM: &str = include_str!("../uml/xstate_shim.c");

/// The UML kernel binary of Debian's `user-mode-linux` package.
pub const KERNEL: &str = "/usr/bin/linux.uml";

/// The environment variable that marks a test process running inside the guest.
pub const GUEST_ENV: &str = "FRS_IN_GUEST";

/// Whether this process runs inside the UML guest (the guest half of a test).
pub fn in_guest() -> bool {
    std::env::var_os(GUEST_ENV).is_some()
}

/// What the guest run produced.
#[derive(Debug)]
pub struct GuestRun {
    /// Exit code of the command (`None` if the guest never reported one: boot failure or
    /// timeout).
    pub code: Option<i32>,
    /// The command's combined stdout and stderr.
    pub output: String,
    /// The guest kernel's console (boot messages), for diagnosing a failed boot.
    pub console: String,
    /// From starting `linux.uml` to the payload starting (boot, overlay, modules).
    pub boot_time: Option<Duration>,
    /// From starting `linux.uml` to its exit.
    pub total_time: Duration,
    /// Whether the watchdog had to kill the guest.
    pub timed_out: bool,
    /// The run's result directory (removed by now; it names the guest's processes on the
    /// kernel command line, which lets a test check none survived).
    pub result_dir: PathBuf,
}

impl GuestRun {
    /// Panics with the guest's output unless the command exited 0.
    pub fn assert_success(&self) {
        assert_eq!(
            self.code,
            Some(0),
            "guest command failed (timed out: {})\n--- output ---\n{}\n--- console (tail) ---\n{}",
            self.timed_out,
            self.output,
            tail(&self.console, 40)
        );
    }
}

fn tail(s: &str, lines: usize) -> String {
    let v: Vec<&str> = s.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

/// Single-quotes a string for the guest's `sh`.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Kills the guest's whole process group on drop (linux.uml forks helper processes).
struct Guest {
    child: Child,
}

impl Drop for Guest {
    fn drop(&mut self) {
        let pid = self.child.id() as i32;
        // SAFETY: signalling a process group we created has no memory-safety preconditions.
        unsafe {
            libc::kill(-pid, libc::SIGKILL);
        }
        let _ = self.child.wait();
    }
}

/// Host halves of guest tests: `uml_guest_tests!(timeout; three_hosts_in_uml => "guest_three_hosts", ...)`
/// defines one `#[test]` per pair that boots a guest and runs the named guest half there (and does
/// nothing when already inside a guest).
#[macro_export]
macro_rules! uml_guest_tests {
    ($timeout:expr; $($host:ident => $guest:literal),+ $(,)?) => {
        $(
            #[test]
            fn $host() {
                if !$crate::uml::in_guest() {
                    $crate::uml::run_guest_test($guest, $timeout);
                }
            }
        )+
    };
}

/// Runs the calling test binary's test `name` (its guest half) in a fresh guest, prints the
/// timings and asserts it passed.
pub fn run_guest_test(name: &str, timeout: Duration) {
    let t = std::time::Instant::now();
    let run = run_in_guest(&["--exact", name], timeout);
    eprintln!(
        "{name}: guest boot {:?}, guest total {:?}, wall {:?}",
        run.boot_time,
        run.total_time,
        t.elapsed()
    );
    run.assert_success();
    assert!(
        run.output.contains("test result: ok. 1 passed"),
        "{}",
        run.output
    );
}

/// Boots a guest and runs the current test executable in it with `args` (e.g. `["--exact",
/// "ipip_guest"]`; `--nocapture --test-threads=1` are added) and `FRS_IN_GUEST=1`, killing the
/// guest after `timeout`.
pub fn run_in_guest(args: &[&str], timeout: Duration) -> GuestRun {
    let exe = std::env::current_exe().expect("current exe");
    let mut argv: Vec<String> = vec![exe.display().to_string()];
    argv.extend(args.iter().map(|a| a.to_string()));
    argv.extend(["--nocapture".into(), "--test-threads=1".into()]);
    run_command_in_guest(&argv, timeout)
}

/// Boots a guest and runs `argv` in it (in the current directory, with this process's
/// environment plus `FRS_IN_GUEST=1`), killing the guest after `timeout`.
pub fn run_command_in_guest(argv: &[String], timeout: Duration) -> GuestRun {
    crate::require_root();
    assert!(
        Path::new(KERNEL).exists(),
        "{KERNEL} missing: run scripts/install-deps.sh (package user-mode-linux)"
    );
    let dir = TempDir::new("uml");
    let init = dir.join("init.sh");
    std::fs::write(&init, INIT_SCRIPT).expect("write init script");
    std::fs::set_permissions(&init, std::fs::Permissions::from_mode(0o755)).expect("chmod init");
    write_payload(&dir.join("payload.sh"), argv);
    let shim = build_shim(&dir);

    let console = dir.join("console.log");
    let started = Instant::now();
    let started_wall = std::time::SystemTime::now();
    let guest_cmdline = format!(
        "LD_PRELOAD={} exec {KERNEL} mem=1536M rootfstype=hostfs rootflags=/ rw quiet init={} \
         con=null ssl=null con0=null,fd:4 con1=null,fd:3 FRS_RESULT={} \
         </dev/null 3>>{} 4>>{} >>{} 2>&1",
        shim.display(),
        init.display(),
        dir.path().display(),
        console.display(),
        console.display(),
        console.display()
    );
    let child = Command::new("sh")
        .args(["-c", &guest_cmdline])
        .stdin(Stdio::null())
        .process_group(0)
        .spawn()
        .expect("start linux.uml");
    let mut guest = Guest { child };
    let mut timed_out = false;
    loop {
        match guest.child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if started.elapsed() > timeout => {
                let _ = writeln!(
                    std::io::stderr(),
                    "uml: guest timed out after {timeout:?}, killing it"
                );
                timed_out = true;
                break;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(100)),
            Err(e) => panic!("waiting for linux.uml: {e}"),
        }
    }
    drop(guest);
    let total_time = started.elapsed();
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap_or_default();
    let boot_time = read("payload-start")
        .trim()
        .parse::<f64>()
        .ok()
        .and_then(|t| {
            let start = started_wall.duration_since(std::time::UNIX_EPOCH).ok()?;
            Some(Duration::from_secs_f64((t - start.as_secs_f64()).max(0.0)))
        });
    GuestRun {
        code: read("rc").trim().parse().ok(),
        output: read("output"),
        console: read("console.log"),
        boot_time,
        total_time,
        timed_out,
        result_dir: dir.path().to_path_buf(),
    }
}

/// The guest's payload: this process's environment, `FRS_IN_GUEST=1`, the working directory and
/// the command, as one `sh` script.
fn write_payload(path: &Path, argv: &[String]) {
    let mut s = String::new();
    for (k, v) in std::env::vars() {
        let valid = !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if valid && !matches!(k.as_str(), "PWD" | "OLDPWD" | "SHLVL" | "_") {
            s.push_str(&format!("export {k}={}\n", sh_quote(&v)));
        }
    }
    s.push_str(&format!("export {GUEST_ENV}=1\n"));
    let cwd = std::env::current_dir().expect("cwd");
    s.push_str(&format!("cd {}\n", sh_quote(&cwd.display().to_string())));
    let cmd: Vec<String> = argv.iter().map(|a| sh_quote(a)).collect();
    s.push_str(&format!("exec {}\n", cmd.join(" ")));
    std::fs::write(path, s).expect("write payload");
}

/// Compiles the XSAVE shim (C, with the `cc` every Rust toolchain needs for linking).
fn build_shim(dir: &TempDir) -> PathBuf {
    let src = dir.join("xstate_shim.c");
    let so = dir.join("xstate_shim.so");
    std::fs::write(&src, XSTATE_SHIM).expect("write shim source");
    let out = Command::new("cc")
        .args(["-shared", "-fPIC", "-O2", "-o"])
        .arg(&so)
        .arg(&src)
        .arg("-ldl")
        .output()
        .expect("run cc for the UML XSAVE shim");
    assert!(
        out.status.success(),
        "cc failed on the UML XSAVE shim: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    so
}
