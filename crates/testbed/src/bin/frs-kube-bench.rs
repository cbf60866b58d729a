//! Kube-mode benchmark: one flanneld (vxlan) against the test API server holding N Nodes shaped
//! like a kubelet's (~5 KB each) with Go flannel vxlan annotations.
//!
//! `frs-kube-bench [--nodes 5000] [--adds 200] [--heartbeats 1000]` prints: flanneld's peak RSS
//! with every route programmed, start-up to all routes programmed, node-annotated ->
//! route-programmed latency (p50/p99) for nodes added one by one, flanneld CPU time and kernel
//! changes for heartbeats that change nothing flannel reads, and API requests per event.

use std::io::{BufRead, BufReader};
use std::net::Ipv4Addr;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use testbed::bench::{arg, cpu_seconds, percentile, status_kib};
use testbed::kubeapi::{kubelet_like_node, KubeApiServer};
use testbed::{wait_for, Cluster};

const P: &str = "flannel.alpha.coreos.com";

/// Pod CIDR and announced address of synthetic node `i` (inside 10.0.0.0/8, off host 1's /24).
fn node_addrs(i: usize) -> (String, Ipv4Addr) {
    let n = i + 1;
    (
        format!("10.{}.{}.0/24", n / 256, n % 256),
        Ipv4Addr::new(
            172,
            16 + (n / 65536) as u8,
            ((n / 256) % 256) as u8,
            (n % 256) as u8,
        ),
    )
}

fn node_mac(i: usize) -> String {
    format!(
        "0e:2a:{:02x}:{:02x}:{:02x}:01",
        (i >> 16) & 0xff,
        (i >> 8) & 0xff,
        i & 0xff
    )
}

fn go_node(i: usize, prefix: &str) -> serde_json::Value {
    let (cidr, ip) = node_addrs(i);
    let mac = node_mac(i);
    let data = format!(r#"{{"VNI":1,"VtepMAC":"{mac}"}}"#);
    let ip_text = ip.to_string();
    let ann = [
        (format!("{P}/backend-data"), data),
        (format!("{P}/backend-type"), "vxlan".to_string()),
        (format!("{P}/kube-subnet-manager"), "true".to_string()),
        (format!("{P}/public-ip"), ip_text),
    ];
    let refs: Vec<(&str, &str)> = ann.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    kubelet_like_node(&format!("{prefix}{i}"), &cidr, ip, &refs)
}

fn route_count(c: &Cluster) -> usize {
    c.hosts[0]
        .ns
        .ip(&["-o", "route", "show", "dev", "flannel.1"])
        .lines()
        .count()
}

fn main() {
    testbed::require_root();
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "-h" || a == "--help") {
        println!("usage: frs-kube-bench [--nodes N] [--adds N] [--heartbeats N]");
        return;
    }
    let nodes = arg(&args, "--nodes", 5000);
    let adds = arg(&args, "--adds", 200);
    let heartbeats = arg(&args, "--heartbeats", 1000);

    let mut c = Cluster::with_kube_api(1);
    c.create_node(0, &["10.0.0.0/24"]);
    c.write_net_conf(r#"{"Network":"10.0.0.0/8","Backend":{"Type":"vxlan"}}"#);
    let t = Instant::now();
    for i in 0..nodes {
        c.kube().create_object(go_node(i, "n"));
    }
    let size = serde_json::to_string(&c.kube().node("n0").expect("node"))
        .map(|s| s.len())
        .unwrap_or(0);
    println!(
        "== {nodes} kubelet-shaped Nodes ({size} bytes of JSON each) with Go flannel vxlan annotations, created in {:?}",
        t.elapsed()
    );

    // Start-up: flanneld from exec to every route programmed.
    let start = Instant::now();
    c.start_flanneld_kube(0, &[]);
    let pid = c.flanneld(0).pid().expect("pid");
    wait_for(Duration::from_secs(600), "all routes programmed", || {
        (route_count(&c) >= nodes).then_some(())
    });
    let startup = start.elapsed();
    let rss_peak = status_kib(pid, "VmHWM:");
    let rss_now = status_kib(pid, "VmRSS:");

    // `flanneld doctor` against all of it (lists every Node, reads the kernel), 3 runs.
    let mut doctor_ms = vec![];
    for _ in 0..3 {
        let t = Instant::now();
        let (code, out) = c.doctor_kube(0, &[]);
        doctor_ms.push(t.elapsed().as_secs_f64() * 1000.0);
        assert_eq!(code, 0, "doctor disagrees:\n{out}");
    }
    doctor_ms.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));

    // Kernel changes seen by `ip monitor`, timestamped on arrival.
    let mut monitor = c.hosts[0]
        .ns
        .command("ip")
        .args(["monitor", "route", "neigh", "link"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("ip monitor");
    let seen: Arc<Mutex<Vec<(Instant, String)>>> = Arc::default();
    {
        let seen = seen.clone();
        let out = monitor.stdout.take().expect("stdout");
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                seen.lock().unwrap().push((Instant::now(), line));
            }
        });
    }
    std::thread::sleep(Duration::from_millis(300));

    // Heartbeats: status-only updates flannel must ignore.
    seen.lock().unwrap().clear();
    c.kube().clear_requests();
    let cpu0 = cpu_seconds(pid);
    let hb_start = Instant::now();
    for k in 0..heartbeats {
        c.kube().heartbeat(&format!("n{}", k % nodes.max(1)));
    }
    // Let flanneld drain the watch: a marker node proves every heartbeat before it was read.
    c.kube().create_object(go_node(nodes + adds + 10, "marker"));
    let (marker_cidr, _) = node_addrs(nodes + adds + 10);
    wait_for(Duration::from_secs(60), "marker route", || {
        c.hosts[0]
            .ns
            .ip(&["route", "show", &marker_cidr])
            .contains("via")
            .then_some(())
    });
    let hb_cpu = cpu_seconds(pid) - cpu0;
    let hb_elapsed = hb_start.elapsed();
    let kernel_changes = seen
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, l)| {
            let base = marker_cidr.trim_end_matches("/24");
            !l.contains(&format!("{base} "))
                && !l.contains(&format!("{base}/"))
                && !l.contains(&node_mac(nodes + adds + 10))
        })
        .count();
    let hb_requests = c
        .kube()
        .requests()
        .iter()
        .filter(|r| r.user.as_deref() == Some(testbed::kubeapi::FLANNEL_USER) && !r.is_watch())
        .count();

    // Node added -> route programmed, one node at a time.
    seen.lock().unwrap().clear();
    c.kube().clear_requests();
    let mut lat = vec![];
    for k in 0..adds {
        let i = nodes + 1 + k;
        let (cidr, _) = node_addrs(i);
        let t0 = Instant::now();
        c.kube().create_object(go_node(i, "add"));
        let needle = format!("{cidr} via");
        let at = wait_for(Duration::from_secs(30), "route of an added node", || {
            seen.lock()
                .unwrap()
                .iter()
                .find(|(_, l)| l.contains(&needle))
                .map(|(t, _)| *t)
        });
        lat.push(at.duration_since(t0).as_secs_f64() * 1000.0);
    }
    let add_requests: Vec<String> = c
        .kube()
        .requests()
        .iter()
        .filter(|r| r.user.as_deref() == Some(testbed::kubeapi::FLANNEL_USER))
        .map(|r| {
            format!(
                "{} {}{}",
                r.method,
                r.path,
                if r.is_watch() { " (watch)" } else { "" }
            )
        })
        .collect();
    let add_non_watch = add_requests
        .iter()
        .filter(|r| !r.contains("(watch)"))
        .count();
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    let _ = monitor.kill();
    let _ = monitor.wait();
    let final_rss = status_kib(pid, "VmHWM:");

    println!("\n== flanneld in kube mode, {nodes} remote nodes (vxlan)");
    println!("{:<58} {:>12}", "metric", "value");
    println!(
        "{:<58} {:>12}",
        "start-up to all routes programmed",
        format!("{:.2} s", startup.as_secs_f64())
    );
    println!(
        "{:<58} {:>12}",
        "peak RSS with all routes programmed (goal < 30 MiB)",
        format!("{:.1} MiB", rss_peak as f64 / 1024.0)
    );
    println!(
        "{:<58} {:>12}",
        "RSS after start-up",
        format!("{:.1} MiB", rss_now as f64 / 1024.0)
    );
    println!(
        "{:<58} {:>12}",
        "peak RSS at the end of the run",
        format!("{:.1} MiB", final_rss as f64 / 1024.0)
    );
    println!(
        "{:<58} {:>12}",
        "`flanneld doctor` wall time, median of 3 (exit 0)",
        format!("{:.0} ms", percentile(&doctor_ms, 0.5))
    );
    println!(
        "{:<58} {:>12}",
        format!("added node -> route programmed p50 ({adds} nodes)"),
        format!("{:.1} ms", percentile(&lat, 0.5))
    );
    println!(
        "{:<58} {:>12}",
        "added node -> route programmed p99 (goal < 100 ms)",
        format!("{:.1} ms", percentile(&lat, 0.99))
    );
    println!(
        "{:<58} {:>12}",
        format!("flanneld CPU for {heartbeats} heartbeats"),
        format!("{:.3} s", hb_cpu)
    );
    println!(
        "{:<58} {:>12}",
        "  per 1000 heartbeats",
        format!(
            "{:.1} ms",
            hb_cpu * 1000.0 / heartbeats.max(1) as f64 * 1000.0
        )
    );
    println!(
        "{:<58} {:>12}",
        "  kernel changes (routes/neighbours/links) they caused", kernel_changes
    );
    println!(
        "{:<58} {:>12}",
        "  API requests they caused (besides the open watch)", hb_requests
    );
    println!(
        "{:<58} {:>12}",
        "  wall time to send them and drain the watch",
        format!("{:.2} s", hb_elapsed.as_secs_f64())
    );
    println!(
        "{:<58} {:>12}",
        format!("API requests for {adds} added nodes (besides watches)"),
        add_non_watch
    );
    println!(
        "{:<58} {:>12}",
        "  per event",
        format!("{:.3}", add_non_watch as f64 / adds.max(1) as f64)
    );
    let _ = KubeApiServer::ADMIN_TOKEN;
}
