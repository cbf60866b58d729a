//! Soak: `frs-soak [--hosts 4] [--seconds 1800]` churns flanneld hosts (restarts, lease
//! expiry, leaving and joining) and prints route drift, convergence, packet loss between two
//! stable hosts, and their daemons' memory and descriptor growth. Exit 1 on drift or loss.

use std::time::Duration;

use testbed::bench::{arg, percentile};
use testbed::soak::{run, SoakOptions};

fn main() {
    testbed::require_root();
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "-h" || a == "--help") {
        println!("usage: frs-soak [--hosts N] [--seconds N]");
        return;
    }
    let opts = SoakOptions {
        hosts: arg(&args, "--hosts", 4).max(3),
        duration: Duration::from_secs(arg(&args, "--seconds", 1800) as u64),
        converge_timeout: Duration::from_secs(15),
    };
    println!(
        "== soak: {} hosts for {:?} (restart / lease revoked / leave / join, in turn)",
        opts.hosts, opts.duration
    );
    let r = run(&opts, |line| println!("{line}"));
    let row = |k: &str, v: String| println!("{k:<52} {v:>22}");
    println!();
    row("churn steps", r.steps.to_string());
    row("steps that drifted (goal 0)", r.drift.len().to_string());
    row(
        "convergence p50 / max",
        format!(
            "{:.0} / {:.0} ms",
            percentile(&r.converge_ms, 0.5),
            percentile(&r.converge_ms, 1.0)
        ),
    );
    row(
        "pings between stable hosts' pods (sent/lost)",
        format!("{} / {}", r.pings.0, r.pings.0.saturating_sub(r.pings.1)),
    );
    for (i, ((r0, r1), (f0, f1))) in r.rss_kib.iter().zip(r.fds.iter()).enumerate() {
        row(
            &format!("h{} flanneld RSS start -> end", i + 1),
            format!(
                "{:.1} -> {:.1} MiB ({:+} KiB)",
                *r0 as f64 / 1024.0,
                *r1 as f64 / 1024.0,
                *r1 as i64 - *r0 as i64
            ),
        );
        row(
            &format!("h{} flanneld open fds start -> end", i + 1),
            format!("{f0} -> {f1}"),
        );
    }
    for d in &r.drift {
        println!("DRIFT {d}");
    }
    if !r.drift.is_empty() || r.pings.0 != r.pings.1 || r.pings.0 == 0 {
        std::process::exit(1);
    }
}
