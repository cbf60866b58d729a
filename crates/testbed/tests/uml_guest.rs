//! The user-mode-linux test-bed itself: the guest boots, has the modules the ipip/ipsec tests
//! need, uses legacy iptables, and nothing it writes reaches the host's disk.

use std::time::{Duration, Instant};

use testbed::uml;

const LEAK_PROBE: &str = "/var/tmp/frs-uml-leak-probe";

/// Host half: boots the guest, runs `guest_part` there, checks the host's disk is untouched.
#[test]
fn guest_has_ipip_and_legacy_iptables_and_writes_do_not_leak() {
    if uml::in_guest() {
        return;
    }
    let _ = std::fs::remove_file(LEAK_PROBE);
    let t = Instant::now();
    let run = uml::run_in_guest(&["--exact", "guest_part"], Duration::from_secs(300));
    eprintln!(
        "uml: boot {:?}, total {:?} (wall {:?})",
        run.boot_time,
        run.total_time,
        t.elapsed()
    );
    run.assert_success();
    assert!(run.output.contains("guest checks passed"), "{}", run.output);
    assert!(
        !std::path::Path::new(LEAK_PROBE).exists(),
        "a file written in the guest reached the host"
    );
}

/// Guest half (returns at once outside the guest).
#[test]
fn guest_part() {
    if !uml::in_guest() {
        return;
    }
    let sh = |cmd: &str| {
        let out = std::process::Command::new("sh")
            .args(["-c", cmd])
            .output()
            .expect("sh");
        assert!(
            out.status.success(),
            "{cmd}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    std::fs::write(LEAK_PROBE, "guest").expect("write probe");
    sh("ip netns add frs-uml-probe");
    sh("ip -n frs-uml-probe link add t1 type ipip local 10.9.9.1");
    sh("ip -n frs-uml-probe xfrm state list");
    assert!(sh("iptables --version").contains("legacy"));
    sh("iptables -t nat -S");
    assert!(std::path::Path::new("/proc/sys/net/bridge/bridge-nf-call-iptables").exists());
    sh("ip netns del frs-uml-probe");
    println!("guest checks passed");
}

/// The watchdog kills a guest that overruns its time, with all of linux.uml's processes.
#[test]
fn watchdog_kills_an_overrunning_guest_and_all_its_processes() {
    if uml::in_guest() {
        return;
    }
    let run = uml::run_command_in_guest(&["sleep".into(), "600".into()], Duration::from_secs(10));
    assert!(run.timed_out);
    assert_eq!(run.code, None);
    let marker = run.result_dir.display().to_string();
    let survivors = || -> Vec<String> {
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
            .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
            .filter(|c| c.contains(&marker))
            .collect()
    };
    // SIGKILL is delivered asynchronously: every process must be gone within a few seconds.
    let left = testbed::wait_for(
        Duration::from_secs(5),
        "linux.uml processes to be gone",
        || {
            let s = survivors();
            s.is_empty().then_some(s)
        },
    );
    assert!(left.is_empty(), "{left:?}");
}
