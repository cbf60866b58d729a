//! A QEMU guest running Debian's stock kernel, for kernel features this machine's kernel lacks
//! (WireGuard). The guest sees the host's root file system read-only over virtio-9p under a
//! tmpfs overlay, with private `/run` and `/dev/shm` (`/tmp` is the overlay's), so it runs the host's prebuilt
//! binaries and test executables unchanged while nothing it does reaches the host: it has no
//! network device, and the only host directory it can write is the run's own temp directory.
//!
//! `/dev/kvm` here only runs specially patched guests, so the guest is software-emulated (TCG):
//! correct but slow, good for proving kernel code paths, never for timing them.
//!
//! Pattern for a test that must run in the guest:
//!
//! ```no_run
//! #[test]
//! fn wireguard_in_guest() {
//!     testbed::qemu::run_in_guest(&["--exact", "guest_part"], std::time::Duration::from_secs(300));
//! }
//!
//! #[test]
//! fn guest_part() {
//!     if !testbed::qemu::in_guest() {
//!         return; // only meaningful inside the guest
//!     }
//!     // ... build namespaces, use the kernel's WireGuard ...
//! }
//! ```

use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::TempDir;

/// Environment variable set (to `1`) for the payload inside the guest.
pub const GUEST_ENV: &str = "FRS_IN_GUEST";

/// Where the extracted kernel and the initramfs are cached (override: `FLANNEL_RS_CACHE`).
const DEFAULT_CACHE: &str = "/var/cache/flannel-rs";

/// Modules the initramfs loads before it can mount the host's root (dependencies first).
const INITRAMFS_MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_console",
    "9pnet_virtio",
    "9p",
    "overlay",
];

const STAGE1: &str = include_str!("../guest/init.sh");
const STAGE2: &str = include_str!("../guest/stage2.sh");

/// One guest at a time per test process: each uses two vCPUs, CI has two cores.
static GUEST_LOCK: Mutex<()> = Mutex::new(());

/// Whether this process is the payload inside the guest (a test's guest part returns early
/// when this is false).
pub fn in_guest() -> bool {
    std::env::var(GUEST_ENV).is_ok_and(|v| v == "1")
}

/// What to run in the guest.
#[derive(Debug, Clone)]
pub struct GuestCommand {
    /// Program (an absolute host path; the guest sees the host's files).
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<String>,
    /// Extra environment (besides `PATH` and `FRS_IN_GUEST=1`).
    pub env: Vec<(String, String)>,
    /// Working directory.
    pub cwd: PathBuf,
}

/// How a guest run ended.
#[derive(Debug)]
pub struct GuestRun {
    /// The payload's exit code; `None` if it never finished (timeout, boot failure).
    pub exit_code: Option<i32>,
    /// The payload's stdout and stderr.
    pub output: String,
    /// The guest's serial console (kernel messages, init failures).
    pub console: String,
    /// Launch to payload start, if the payload started.
    pub boot_time: Option<Duration>,
    /// Launch to power-off (or kill).
    pub total_time: Duration,
    /// Whether the watchdog had to kill the guest.
    pub timed_out: bool,
}

impl GuestRun {
    /// Whether the payload ran and exited 0.
    pub fn success(&self) -> bool {
        self.exit_code == Some(0)
    }

    /// Everything known about the run, for a failure message.
    pub fn report(&self) -> String {
        format!(
            "guest exit code {:?}, timed out {}, boot {:?}, total {:?}\n--- payload output ---\n{}\n--- console ---\n{}",
            self.exit_code, self.timed_out, self.boot_time, self.total_time, self.output, self.console
        )
    }
}

/// Runs tests of the current test executable in the guest (`args` are libtest arguments, e.g.
/// `["--exact", "name_of_guest_part"]`; `--nocapture --test-threads=1` are added) and panics
/// with the guest's output and console unless they ran and passed. At least one test must have
/// run, so a filter that matches nothing fails instead of passing silently. Returns the run
/// (boot and total time are printed too).
pub fn run_in_guest(args: &[&str], timeout: Duration) -> GuestRun {
    let exe = std::env::current_exe().expect("current test executable");
    let mut all: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    all.extend(["--nocapture".into(), "--test-threads=1".into()]);
    let mut env = vec![];
    for key in ["RUST_BACKTRACE", "RUST_LOG", "FLANNEL_RS_BIN_DIR"] {
        if let Ok(v) = std::env::var(key) {
            env.push((key.to_string(), v));
        }
    }
    let run = run_command_in_guest(
        &GuestCommand {
            program: exe,
            args: all,
            env,
            cwd: PathBuf::from(env!("CARGO_MANIFEST_DIR")),
        },
        timeout,
    );
    println!(
        "guest: boot {:?}, total {:?}, exit {:?}",
        run.boot_time, run.total_time, run.exit_code
    );
    assert!(run.success(), "guest run failed: {}", run.report());
    let ran = run
        .output
        .lines()
        .filter_map(|l| l.strip_prefix("test result: ok. "))
        .filter_map(|l| l.split_whitespace().next()?.parse::<u32>().ok())
        .sum::<u32>();
    assert!(
        ran > 0,
        "no test ran in the guest (filter {args:?}): {}",
        run.report()
    );
    run
}

/// Boots the guest, runs one command in it, powers it off; the watchdog kills it after
/// `timeout`. Never panics on the payload's failure (see [`GuestRun`]); panics only if the
/// test-bed itself is missing (run `scripts/install-deps.sh`).
pub fn run_command_in_guest(cmd: &GuestCommand, timeout: Duration) -> GuestRun {
    crate::require_root();
    let _one_at_a_time = GUEST_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let images = guest_images()
        .unwrap_or_else(|e| panic!("QEMU test-bed unavailable: {e} (run scripts/install-deps.sh)"));
    let dir = TempDir::new("qemu");
    std::fs::write(dir.join("stage2.sh"), STAGE2).expect("write stage2.sh");
    std::fs::write(dir.join("payload.sh"), payload_script(cmd)).expect("write payload.sh");
    let console = dir.join("console.log");
    let started = Instant::now();
    let mut child = qemu_command(&images, dir.path(), &console)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn qemu-system-x86_64 (run scripts/install-deps.sh)");
    let mut boot_time = None;
    let mut timed_out = false;
    let status = loop {
        if boot_time.is_none() && dir.join("started").exists() {
            boot_time = Some(started.elapsed());
        }
        if let Some(status) = child.try_wait().expect("wait for qemu") {
            break Some(status);
        }
        if started.elapsed() > timeout {
            timed_out = true;
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let total_time = started.elapsed();
    let mut qemu_err = String::new();
    if let Some(mut e) = child.stderr.take() {
        use std::io::Read;
        let _ = e.read_to_string(&mut qemu_err);
    }
    let mut console_text = std::fs::read_to_string(&console).unwrap_or_default();
    if !qemu_err.is_empty() || status.is_some_and(|s| !s.success()) {
        console_text.push_str(&format!("\n[qemu {status:?}] {qemu_err}"));
    }
    if let Ok(m) = std::fs::read_to_string(dir.join("modprobe.err")) {
        if !m.trim().is_empty() {
            console_text.push_str(&format!("\n[modprobe] {m}"));
        }
    }
    GuestRun {
        exit_code: std::fs::read_to_string(dir.join("status"))
            .ok()
            .and_then(|s| s.trim().parse().ok()),
        output: std::fs::read_to_string(dir.join("output")).unwrap_or_default(),
        console: console_text,
        boot_time,
        total_time,
        timed_out,
    }
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn payload_script(cmd: &GuestCommand) -> String {
    let mut s = String::from("set -e\n");
    s.push_str(&format!("cd {}\n", shell_quote(&cmd.cwd.to_string_lossy())));
    s.push_str(&format!("export {GUEST_ENV}=1\n"));
    for (k, v) in &cmd.env {
        s.push_str(&format!("export {k}={}\n", shell_quote(v)));
    }
    s.push_str("exec");
    s.push_str(&format!(" {}", shell_quote(&cmd.program.to_string_lossy())));
    for a in &cmd.args {
        s.push_str(&format!(" {}", shell_quote(a)));
    }
    s.push('\n');
    s
}

fn qemu_command(images: &GuestImages, run_dir: &Path, console: &Path) -> Command {
    let mut c = Command::new("qemu-system-x86_64");
    c.args([
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        "-M",
        "q35",
        "-accel",
        "tcg,thread=multi",
        "-smp",
        "2",
        "-m",
        "2G",
        "-cpu",
        "qemu64,+ssse3,+sse4.1,+sse4.2,+popcnt",
    ]);
    c.arg("-kernel").arg(&images.vmlinux);
    c.arg("-initrd").arg(&images.initramfs);
    c.args([
        "-append",
        "console=ttyS0 quiet panic=-1 rdinit=/init",
        "-serial",
    ]);
    c.arg(format!("file:{}", console.display()));
    c.args([
        "-fsdev",
        "local,id=hostroot,path=/,security_model=passthrough,multidevs=remap,readonly=on",
        "-device",
        "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot",
        "-fsdev",
    ]);
    c.arg(format!(
        "local,id=frsrun,path={},security_model=passthrough",
        run_dir.display()
    ));
    c.args(["-device", "virtio-9p-pci,fsdev=frsrun,mount_tag=frsrun"]);
    // SAFETY: prctl only sets the parent-death signal: QEMU dies with the test.
    unsafe {
        c.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    c
}

/// The kernel and initramfs the guest boots.
#[derive(Debug, Clone)]
pub struct GuestImages {
    /// Kernel release (`6.1.0-NN-amd64`).
    pub release: String,
    /// The uncompressed kernel (booting it skips a slow emulated decompression).
    pub vmlinux: PathBuf,
    /// busybox + init + the virtio/9p/overlay modules.
    pub initramfs: PathBuf,
}

/// The guest's kernel release: the one Debian's `linux-image-amd64` depends on.
fn guest_release() -> Result<String, String> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f", "${Depends}", "linux-image-amd64"])
        .output()
        .map_err(|e| format!("dpkg-query: {e}"))?;
    let deps = String::from_utf8_lossy(&out.stdout);
    deps.split(',')
        .filter_map(|d| d.split_whitespace().next())
        .find_map(|d| d.strip_prefix("linux-image-"))
        .map(str::to_string)
        .ok_or_else(|| "package linux-image-amd64 is not installed".to_string())
}

/// Extracts (once, cached under /var/cache/flannel-rs/qemu/<release>) the kernel and builds the
/// initramfs. Safe against concurrent test processes (a lock file, then atomic renames).
pub fn guest_images() -> Result<GuestImages, String> {
    let release = guest_release()?;
    let cache = std::env::var("FLANNEL_RS_CACHE").unwrap_or_else(|_| DEFAULT_CACHE.into());
    let dir = Path::new(&cache).join("qemu").join(&release);
    std::fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    let lock = std::fs::File::create(dir.join("lock")).map_err(|e| format!("lock: {e}"))?;
    // SAFETY: flock on a file we own; released when `lock` is dropped.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(format!("flock: {}", std::io::Error::last_os_error()));
    }
    let images = GuestImages {
        vmlinux: dir.join("vmlinux"),
        initramfs: dir.join("initramfs.cpio"),
        release: release.clone(),
    };
    if !images.vmlinux.exists() {
        let bz = PathBuf::from(format!("/boot/vmlinuz-{release}"));
        let elf = extract_vmlinux(&bz)?;
        write_atomic(&images.vmlinux, &elf)?;
    }
    let stamp = dir.join("initramfs.stamp");
    let want = format!("{STAGE1}\n{INITRAMFS_MODULES:?}");
    if !images.initramfs.exists() || std::fs::read_to_string(&stamp).ok().as_deref() != Some(&want)
    {
        let cpio = build_initramfs(&release)?;
        write_atomic(&images.initramfs, &cpio)?;
        write_atomic(&stamp, want.as_bytes())?;
    }
    Ok(images)
}

fn write_atomic(path: &Path, data: &[u8]) -> Result<(), String> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, data).map_err(|e| format!("write {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("rename to {}: {e}", path.display()))
}

/// The ELF kernel inside a bzImage: the first compressed stream (xz, gzip or zstd) that
/// decompresses to an ELF file.
fn extract_vmlinux(bz: &Path) -> Result<Vec<u8>, String> {
    let data = std::fs::read(bz).map_err(|e| format!("read {}: {e}", bz.display()))?;
    let formats: [(&[u8], &[&str]); 3] = [
        (
            &[0xfd, b'7', b'z', b'X', b'Z', 0],
            &["xz", "-dc", "--single-stream"],
        ),
        (&[0x1f, 0x8b, 0x08], &["gzip", "-dc"]),
        (&[0x28, 0xb5, 0x2f, 0xfd], &["zstd", "-dc"]),
    ];
    for (magic, tool) in formats {
        for pos in 0..data.len().saturating_sub(magic.len()) {
            if &data[pos..pos + magic.len()] != magic {
                continue;
            }
            let mut child = match Command::new(tool[0])
                .args(&tool[1..])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
            {
                Ok(c) => c,
                Err(_) => break,
            };
            let mut stdin = child.stdin.take().expect("stdin");
            let input = data[pos..].to_vec();
            let writer = std::thread::spawn(move || {
                let _ = stdin.write_all(&input);
            });
            let out = child
                .wait_with_output()
                .map_err(|e| format!("{}: {e}", tool[0]))?;
            let _ = writer.join();
            if out.stdout.starts_with(b"\x7fELF") {
                return Ok(out.stdout);
            }
        }
    }
    Err(format!("no ELF kernel found inside {}", bz.display()))
}

/// Module paths (relative to /lib/modules/<release>) for `wanted` and their dependencies,
/// dependencies first, from modules.dep.
fn module_load_order(modules_dep: &str, wanted: &[&str]) -> Result<Vec<String>, String> {
    let deps: std::collections::HashMap<String, (String, Vec<String>)> = modules_dep
        .lines()
        .filter_map(|l| {
            let (path, rest) = l.split_once(':')?;
            let name = Path::new(path)
                .file_name()?
                .to_str()?
                .split('.')
                .next()?
                .replace('-', "_");
            Some((
                name,
                (
                    path.to_string(),
                    rest.split_whitespace().map(str::to_string).collect(),
                ),
            ))
        })
        .collect();
    let by_path: std::collections::HashMap<&str, &Vec<String>> =
        deps.values().map(|(p, d)| (p.as_str(), d)).collect();
    let mut order: Vec<String> = vec![];
    fn visit(
        path: &str,
        by_path: &std::collections::HashMap<&str, &Vec<String>>,
        order: &mut Vec<String>,
    ) {
        if order.iter().any(|p| p == path) {
            return;
        }
        if let Some(ds) = by_path.get(path) {
            for d in ds.iter() {
                visit(d, by_path, order);
            }
        }
        order.push(path.to_string());
    }
    for w in wanted {
        let name = w.replace('-', "_");
        match deps.get(&name) {
            Some((path, _)) => visit(path, &by_path, &mut order),
            // Built into this kernel: nothing to load.
            None => continue,
        }
    }
    Ok(order)
}

fn build_initramfs(release: &str) -> Result<Vec<u8>, String> {
    let moddir = PathBuf::from(format!("/lib/modules/{release}"));
    let dep = std::fs::read_to_string(moddir.join("modules.dep"))
        .map_err(|e| format!("read {}/modules.dep: {e}", moddir.display()))?;
    let busybox = std::fs::read("/bin/busybox").map_err(|e| format!("read /bin/busybox: {e}"))?;
    let mut cpio = Cpio::default();
    for d in [
        "bin", "dev", "proc", "sys", "lower", "upper", "newroot", "modules",
    ] {
        cpio.dir(d);
    }
    cpio.char_dev("dev/console", 5, 1);
    cpio.file("bin/busybox", 0o755, &busybox);
    cpio.file("init", 0o755, STAGE1.as_bytes());
    for (i, path) in module_load_order(&dep, INITRAMFS_MODULES)?
        .iter()
        .enumerate()
    {
        let full = moddir.join(path);
        let mut data = std::fs::read(&full).map_err(|e| format!("read {}: {e}", full.display()))?;
        if path.ends_with(".xz") {
            data = decompress("xz", &full)?;
        } else if path.ends_with(".zst") {
            data = decompress("zstd", &full)?;
        }
        let base = Path::new(path)
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.split(".ko").next())
            .unwrap_or("module");
        cpio.file(&format!("modules/{i:02}-{base}.ko"), 0o644, &data);
    }
    Ok(cpio.finish())
}

fn decompress(tool: &str, path: &Path) -> Result<Vec<u8>, String> {
    let out = Command::new(tool)
        .arg("-dc")
        .arg(path)
        .output()
        .map_err(|e| format!("{tool}: {e}"))?;
    if !out.status.success() {
        return Err(format!("{tool} -dc {} failed", path.display()));
    }
    Ok(out.stdout)
}

/// A minimal `newc` cpio writer (what the kernel unpacks as an initramfs).
#[derive(Default)]
struct Cpio {
    buf: Vec<u8>,
    ino: u32,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        self.ino += 1;
        let header = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.ino,
            mode,
            0,
            0,
            1,
            0,
            data.len(),
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() + 1,
            0
        );
        self.buf.extend_from_slice(header.as_bytes());
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad();
        self.buf.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    fn dir(&mut self, name: &str) {
        self.entry(name, 0o040755, (0, 0), &[]);
    }

    fn file(&mut self, name: &str, perm: u32, data: &[u8]) {
        self.entry(name, 0o100000 | perm, (0, 0), data);
    }

    fn char_dev(&mut self, name: &str, major: u32, minor: u32) {
        self.entry(name, 0o020600, (major, minor), &[]);
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modules_come_after_their_dependencies() {
        let dep = "kernel/fs/9p/9p.ko: kernel/net/9p/9pnet.ko kernel/fs/fscache/fscache.ko kernel/fs/netfs/netfs.ko\n\
                   kernel/fs/netfs/netfs.ko:\n\
                   kernel/fs/fscache/fscache.ko: kernel/fs/netfs/netfs.ko\n\
                   kernel/net/9p/9pnet.ko:\n\
                   kernel/net/9p/9pnet_virtio.ko: kernel/net/9p/9pnet.ko\n";
        let order = module_load_order(dep, &["9pnet_virtio", "9p", "builtin_one"]).unwrap();
        assert_eq!(
            order,
            vec![
                "kernel/net/9p/9pnet.ko",
                "kernel/net/9p/9pnet_virtio.ko",
                "kernel/fs/netfs/netfs.ko",
                "kernel/fs/fscache/fscache.ko",
                "kernel/fs/9p/9p.ko",
            ]
        );
    }

    #[test]
    fn payload_script_quotes_everything() {
        let s = payload_script(&GuestCommand {
            program: "/x/test bin".into(),
            args: vec!["--exact".into(), "it's".into()],
            env: vec![("A".into(), "b c".into())],
            cwd: "/work".into(),
        });
        assert!(s.contains("export FRS_IN_GUEST=1\n"), "{s}");
        assert!(s.contains("export A='b c'\n"), "{s}");
        assert!(
            s.ends_with("exec '/x/test bin' '--exact' 'it'\\''s'\n"),
            "{s}"
        );
    }
}
