//! The QEMU test-bed itself: the guest runs Debian's kernel, sees the host's files, returns the
//! payload's output and exit code, and nothing it writes reaches the host.

use std::time::Duration;

use testbed::qemu::{in_guest, run_command_in_guest, run_in_guest, GuestCommand};

/// A path the guest writes to outside its run directory; must never appear on the host.
const LEAK_PROBE: &str = "/var/lib/frs-qemu-leak-probe";

#[test]
fn guest_runs_debian_kernel_and_leaks_nothing() {
    testbed::require_root();
    let _ = std::fs::remove_file(LEAK_PROBE);
    let run = run_in_guest(
        &["--exact", "guest_part_of_the_self_test"],
        Duration::from_secs(300),
    );
    assert!(run.output.contains("guest kernel ok"), "{}", run.report());
    assert!(
        !std::path::Path::new(LEAK_PROBE).exists(),
        "a file the guest wrote reached the host"
    );
}

#[test]
fn guest_part_of_the_self_test() {
    if !in_guest() {
        return;
    }
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").expect("osrelease");
    assert!(release.trim().ends_with("-amd64"), "guest kernel {release}");
    // The host's files are there (this test executable runs), and writable through the overlay.
    std::fs::write(LEAK_PROBE, "guest").expect("write through the overlay");
    // Modules are there: a wireguard link can be made (in a namespace of the guest).
    let ns = testbed::NetNs::new("probe");
    ns.ip(&["link", "add", "wgprobe", "type", "wireguard"]);
    println!("guest kernel ok: {}", release.trim());
}

#[test]
fn guest_exit_code_and_output_come_back() {
    testbed::require_root();
    let run = run_command_in_guest(
        &GuestCommand {
            program: "/bin/sh".into(),
            args: vec!["-c".into(), "echo from-guest; exit 7".into()],
            env: vec![],
            cwd: "/".into(),
        },
        Duration::from_secs(300),
    );
    assert_eq!(run.exit_code, Some(7), "{}", run.report());
    assert!(run.output.contains("from-guest"), "{}", run.report());
    println!("guest boot {:?}, total {:?}", run.boot_time, run.total_time);
}

#[test]
fn watchdog_kills_a_guest_that_runs_too_long() {
    testbed::require_root();
    let timeout = Duration::from_secs(20);
    let run = run_command_in_guest(
        &GuestCommand {
            program: "/bin/sleep".into(),
            args: vec!["600".into()],
            env: vec![],
            cwd: "/".into(),
        },
        timeout,
    );
    assert!(run.timed_out, "{}", run.report());
    assert_eq!(run.exit_code, None, "{}", run.report());
    // Killed at the deadline, not when the payload would have ended.
    assert!(
        run.total_time < timeout + Duration::from_secs(10),
        "{}",
        run.report()
    );
}
