//! Soak run: N namespace hosts with churn for a given time, checking after every step that
//! every running flanneld routes exactly the leases in etcd, while two never-churned hosts'
//! pods ping each other and their daemons' memory and descriptors are watched.
//!
//! Steps, in turn, on the churned hosts (all but the first two): a daemon restart, the own lease
//! revoked in etcd (expiry; the daemon re-acquires it in-process), a host leaving (daemon
//! stopped, lease deleted) and coming back.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use crate::bench::{fd_count, status_kib};
use crate::cluster::{ping_counts, Pinger};
use crate::Cluster;

/// What to run.
#[derive(Debug, Clone)]
pub struct SoakOptions {
    /// Hosts (at least 3: two stable, the rest churned).
    pub hosts: usize,
    /// How long to keep churning.
    pub duration: Duration,
    /// How long a step may take to converge before it counts as drift.
    pub converge_timeout: Duration,
}

/// What happened.
#[derive(Debug, Clone, Default)]
pub struct SoakReport {
    /// Churn steps done.
    pub steps: usize,
    /// Steps after which some host's routes never matched etcd within the timeout, with why.
    pub drift: Vec<String>,
    /// Convergence time of each step, ms (sorted).
    pub converge_ms: Vec<f64>,
    /// Pings between the stable hosts' pods: (sent, received).
    pub pings: (u64, u64),
    /// RSS of the two stable daemons after warm-up and at the end, KiB.
    pub rss_kib: [(u64, u64); 2],
    /// Open descriptors of the two stable daemons after warm-up and at the end.
    pub fds: [(usize, usize); 2],
}

const CONFIG: &str = r#"{"Network":"10.77.0.0/16","Backend":{"Type":"vxlan"}}"#;
const PREFIX: &str = "/coreos.com/network/subnets/";

/// Subnets leased in etcd (as `A.B.C.D/24`).
fn leased(c: &Cluster) -> BTreeSet<String> {
    c.etcd
        .keys(PREFIX)
        .iter()
        .filter_map(|k| k.strip_prefix(PREFIX))
        .map(|k| k.replace('-', "/"))
        .collect()
}

/// Subnets host `i` routes through flannel.1.
fn routed(c: &Cluster, i: usize) -> BTreeSet<String> {
    c.hosts[i]
        .ns
        .ip(&["-o", "route", "show", "dev", "flannel.1"])
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

/// Whether every running host routes exactly the other leases; else what differs.
fn check(c: &Cluster, running: &[bool]) -> Result<(), String> {
    let leases = leased(c);
    let expected_hosts = running.iter().filter(|r| **r).count();
    if leases.len() != expected_hosts {
        return Err(format!(
            "etcd holds {} leases for {expected_hosts} running hosts: {leases:?}",
            leases.len()
        ));
    }
    for (i, _) in running.iter().enumerate().filter(|(_, r)| **r) {
        let own = c.subnet(i).to_string();
        let want: BTreeSet<String> = leases.iter().filter(|l| **l != own).cloned().collect();
        let got = routed(c, i);
        if got != want {
            return Err(format!("h{} routes {got:?}, etcd says {want:?}", i + 1));
        }
    }
    Ok(())
}

/// Runs the soak; panics only on test-bed failures, never on product misbehaviour (reported).
pub fn run(opts: &SoakOptions, mut progress: impl FnMut(&str)) -> SoakReport {
    assert!(opts.hosts >= 3, "a soak needs at least 3 hosts");
    let mut c = Cluster::new(opts.hosts);
    c.put_config(None, CONFIG);
    c.start_all(&[]);
    let a = c.add_pod(0);
    let b = c.add_pod(1);
    c.wait_ping(a, c.pods[b].ip, Duration::from_secs(30));
    let mut running = vec![true; opts.hosts];
    let mut report = SoakReport::default();
    if let Err(e) = crate::poll_until_ok(opts.converge_timeout, || check(&c, &running)) {
        report.drift.push(format!("initial: {e}"));
    }
    let pids = [
        c.flanneld(0).pid().expect("pid"),
        c.flanneld(1).pid().expect("pid"),
    ];
    let pinger = Pinger::start(&c, a, c.pods[b].ip, None);
    let rss0 = pids.map(|p| status_kib(p, "VmRSS:"));
    let fd0 = pids.map(fd_count);

    let start = Instant::now();
    let churned: Vec<usize> = (2..opts.hosts).collect();
    while start.elapsed() < opts.duration {
        let h = churned[report.steps % churned.len()];
        let kind = (report.steps / churned.len()) % 4;
        let what = match kind {
            0 if running[h] => {
                c.flanneld(h).stop();
                c.start_flanneld(h, &[]);
                format!("restart h{}", h + 1)
            }
            1 if running[h] => {
                let id = c.etcd.lease_id(&c.lease_key(h));
                c.etcd.ctl(&["lease", "revoke", &format!("{id:x}")]);
                format!("lease of h{} revoked", h + 1)
            }
            2 if running[h] => {
                c.flanneld(h).stop();
                c.etcd.del(&c.lease_key(h));
                running[h] = false;
                format!("h{} left", h + 1)
            }
            _ if !running[h] => {
                c.start_flanneld(h, &[]);
                running[h] = true;
                format!("h{} joined", h + 1)
            }
            _ => {
                c.flanneld(h).stop();
                c.start_flanneld(h, &[]);
                format!("restart h{}", h + 1)
            }
        };
        let t = Instant::now();
        match crate::poll_until_ok(opts.converge_timeout, || check(&c, &running)) {
            Ok(()) => report.converge_ms.push(t.elapsed().as_secs_f64() * 1000.0),
            Err(e) => report.drift.push(format!("after {what}: {e}")),
        }
        report.steps += 1;
        progress(&format!(
            "[{:>5.0} s] step {}: {what}, converged in {:.0} ms",
            start.elapsed().as_secs_f64(),
            report.steps,
            t.elapsed().as_secs_f64() * 1000.0
        ));
    }
    report.pings = ping_counts(&pinger.finish());
    let rss1 = pids.map(|p| status_kib(p, "VmRSS:"));
    let fd1 = pids.map(fd_count);
    report.rss_kib = [(rss0[0], rss1[0]), (rss0[1], rss1[1])];
    report.fds = [(fd0[0], fd1[0]), (fd0[1], fd1[1])];
    report
        .converge_ms
        .sort_by(|x, y| x.partial_cmp(y).unwrap_or(std::cmp::Ordering::Equal));
    report
}
