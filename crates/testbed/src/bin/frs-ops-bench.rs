//! Operations benchmark (etcd mode): one flanneld (vxlan) with N remote leases programmed, then
//! the cost of what operators run against it.
//!
//! `frs-ops-bench [--leases 5000] [--scrapes 1000] [--doctor-runs 5]` prints: the `/metrics`
//! scrape time (p50/p99 over a keep-alive connection, goal < 5 ms) and flanneld's RSS before and
//! after all scrapes (goal: no growth), and `flanneld doctor`'s wall time on this host
//! (process start, etcd list, kernel dump, checks; goal < 1 s).

use std::time::{Duration, Instant};

use testbed::bench::{arg, percentile, status_kib, HttpConn};
use testbed::{wait_for, Cluster};

const PORT: u16 = 9101;

/// Subnet and public IP of synthetic remote host `i` (inside 10.0.0.0/8, off host 1's range).
fn remote(i: usize) -> (String, String, String) {
    let n = i + 1;
    let subnet = format!("10.{}.{}.0", 100 + n / 256, n % 256);
    let ip = format!("172.16.{}.{}", n / 256, n % 256);
    let mac = format!("0e:2a:00:{:02x}:{:02x}:01", (n >> 8) & 0xff, n & 0xff);
    (subnet, ip, mac)
}

fn main() {
    testbed::require_root();
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "-h" || a == "--help") {
        println!("usage: frs-ops-bench [--leases N] [--scrapes N] [--doctor-runs N]");
        return;
    }
    let leases = arg(&args, "--leases", 5000);
    let scrapes = arg(&args, "--scrapes", 1000);
    let doctor_runs = arg(&args, "--doctor-runs", 5).max(1);

    let mut c = Cluster::new(1);
    c.put_config(
        None,
        r#"{"Network":"10.0.0.0/8","SubnetMin":"10.1.0.0","SubnetMax":"10.99.255.0","Backend":{"Type":"vxlan"}}"#,
    );
    let t = Instant::now();
    let kvs: Vec<(String, String)> = (0..leases)
        .map(|i| {
            let (subnet, ip, mac) = remote(i);
            (
                format!("/coreos.com/network/subnets/{subnet}-24"),
                format!(
                    r#"{{"PublicIP":"{ip}","PublicIPv6":null,"BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{mac}"}}}}"#
                ),
            )
        })
        .collect();
    c.etcd.put_many(&kvs);
    println!(
        "== {leases} remote vxlan leases written to etcd in {:.2} s",
        t.elapsed().as_secs_f64()
    );

    let start = Instant::now();
    c.start_flanneld(0, &["--ip-masq", &format!("--healthz-port={PORT}")]);
    let pid = c.flanneld(0).pid().expect("pid");
    let ns = c.hosts[0].ns.clone();
    wait_for(Duration::from_secs(600), "all routes programmed", || {
        let n = ns
            .ip(&["-o", "route", "show", "dev", "flannel.1"])
            .lines()
            .count();
        (n >= leases).then_some(())
    });
    let startup = start.elapsed();

    // /metrics over one keep-alive connection, as Prometheus scrapes.
    let host = c.hosts[0].ip.to_string();
    let mut conn = HttpConn::connect(&ns, &host, PORT).expect("connect to /metrics");
    let (status, body) = conn.request("GET", "/metrics", None).expect("scrape");
    assert_eq!(status, 200);
    let text = String::from_utf8_lossy(&body).into_owned();
    let want = format!("flanneld_leases{{backend=\"vxlan\"}} {leases}");
    assert!(text.contains(&want), "{want} not in /metrics:\n{text}");
    for _ in 0..50 {
        conn.request("GET", "/metrics", None)
            .expect("warm-up scrape");
    }
    let rss_before = status_kib(pid, "VmRSS:");
    let mut scrape_ms = Vec::with_capacity(scrapes);
    for _ in 0..scrapes {
        let t = Instant::now();
        let (status, _) = conn.request("GET", "/metrics", None).expect("scrape");
        scrape_ms.push(t.elapsed().as_secs_f64() * 1000.0);
        assert_eq!(status, 200);
    }
    let rss_after = status_kib(pid, "VmRSS:");
    scrape_ms.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));

    let mut doctor_ms = vec![];
    for _ in 0..doctor_runs {
        let t = Instant::now();
        let (code, out) = c.doctor(0, &["--ip-masq"]);
        doctor_ms.push(t.elapsed().as_secs_f64() * 1000.0);
        assert_eq!(code, 0, "doctor disagrees:\n{out}");
        assert!(out.contains(&format!("{leases} remote lease(s)")), "{out}");
    }
    doctor_ms.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));

    println!("\n== flanneld (etcd mode, vxlan) with {leases} remote leases programmed");
    println!("{:<58} {:>12}", "metric", "value");
    let row = |k: String, v: String| println!("{k:<58} {v:>12}");
    row(
        "start-up to all routes programmed".into(),
        format!("{:.2} s", startup.as_secs_f64()),
    );
    row("/metrics body size".into(), format!("{} B", body.len()));
    row(
        format!("/metrics scrape p50 ({scrapes} scrapes, keep-alive)"),
        format!("{:.3} ms", percentile(&scrape_ms, 0.5)),
    );
    row(
        "/metrics scrape p99 (goal < 5 ms)".into(),
        format!("{:.3} ms", percentile(&scrape_ms, 0.99)),
    );
    row(
        "flanneld RSS before / after the scrapes".into(),
        format!(
            "{:.1} / {:.1} MiB",
            rss_before as f64 / 1024.0,
            rss_after as f64 / 1024.0
        ),
    );
    row(
        "  growth over the scrapes (goal: none)".into(),
        format!("{} KiB", rss_after as i64 - rss_before as i64),
    );
    row(
        format!("`flanneld doctor` wall time, median of {doctor_runs} (exit 0)"),
        format!("{:.0} ms", percentile(&doctor_ms, 0.5)),
    );
    row(
        "`flanneld doctor` wall time, worst (goal < 1 s)".into(),
        format!("{:.0} ms", percentile(&doctor_ms, 1.0)),
    );
}
