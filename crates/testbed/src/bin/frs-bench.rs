//! Benchmark: pod-to-pod TCP throughput and ping latency for the bare underlay, host-gw and
//! vxlan, measured side by side in one run on the test-bed and printed as ratios to the underlay.
//!
//! `frs-bench [--seconds N] [--streams N] [--rounds N]`. Each round measures every mode once, in
//! turn, so machine noise hits all modes alike; the median over rounds is reported.

use std::net::Ipv4Addr;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use testbed::netns::NetNs;
use testbed::Cluster;

struct Sample {
    gbps: f64,
    rtt_ms: f64,
}

fn iperf(client: &NetNs, server: &NetNs, dst: Ipv4Addr, seconds: u32, streams: u32) -> f64 {
    let mut srv = server
        .command("iperf3")
        .args(["-s", "-1", "-p", "5201"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("iperf3 server (apt-get install iperf3)");
    std::thread::sleep(Duration::from_millis(300));
    let out = client.exec(
        "iperf3",
        &[
            "-c",
            &dst.to_string(),
            "-p",
            "5201",
            "-t",
            &seconds.to_string(),
            "-P",
            &streams.to_string(),
            "-J",
        ],
    );
    let _ = srv.wait();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("iperf3 JSON output");
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .expect("bits_per_second")
        / 1e9
}

fn ping_ms(client: &NetNs, dst: Ipv4Addr) -> f64 {
    let out = client.exec(
        "ping",
        &["-q", "-c", "200", "-i", "0.005", &dst.to_string()],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    // rtt min/avg/max/mdev = 0.030/0.045/0.120/0.010 ms
    let line = text
        .lines()
        .find(|l| l.contains("min/avg/max"))
        .expect("ping summary");
    line.split('=')
        .nth(1)
        .unwrap()
        .trim()
        .split('/')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap()
}

fn measure(mode: &str, seconds: u32, streams: u32) -> Sample {
    let mut c = Cluster::new(2);
    if mode == "underlay" {
        let a: Arc<NetNs> = c.hosts[0].ns.clone();
        let b: Arc<NetNs> = c.hosts[1].ns.clone();
        let ip = c.hosts[1].ip;
        return Sample {
            gbps: iperf(&a, &b, ip, seconds, streams),
            rtt_ms: ping_ms(&a, ip),
        };
    }
    c.put_config(
        None,
        &format!(r#"{{"Network":"10.8.0.0/16","Backend":{{"Type":"{mode}"}}}}"#),
    );
    c.start_all(&[]);
    let a = c.add_pod(0);
    let b = c.add_pod(1);
    c.wait_full_mesh(Duration::from_secs(20));
    let ip = c.pods[b].ip;
    Sample {
        gbps: iperf(&c.pods[a].ns, &c.pods[b].ns, ip, seconds, streams),
        rtt_ms: ping_ms(&c.pods[a].ns, ip),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    testbed::require_root();
    let mut seconds = 5;
    let mut streams = 1;
    let mut rounds = 3;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut num = || args.next().and_then(|n| n.parse().ok()).expect("a number");
        match a.as_str() {
            "--seconds" => seconds = num(),
            "--streams" => streams = num(),
            "--rounds" => rounds = num(),
            _ => {
                eprintln!("usage: frs-bench [--seconds N] [--streams N] [--rounds N]");
                std::process::exit(2);
            }
        }
    }
    let modes = ["underlay", "host-gw", "vxlan"];
    let mut results: Vec<(Vec<f64>, Vec<f64>)> = vec![(vec![], vec![]); modes.len()];
    for round in 1..=rounds {
        for (i, m) in modes.iter().enumerate() {
            let s = measure(m, seconds, streams);
            eprintln!(
                "round {round} {m:<9} {:>7.2} Gbit/s  {:>7.1} us",
                s.gbps,
                s.rtt_ms * 1000.0
            );
            results[i].0.push(s.gbps);
            results[i].1.push(s.rtt_ms);
        }
    }
    let base_gbps = median(results[0].0.clone());
    let base_rtt = median(results[0].1.clone());
    println!(
        "pod-to-pod TCP ({streams} stream(s), {seconds} s) and ping RTT, median of {rounds} rounds"
    );
    println!(
        "{:<10} {:>12} {:>10} {:>12} {:>10}",
        "mode", "Gbit/s", "x underlay", "RTT us", "x underlay"
    );
    for (i, m) in modes.iter().enumerate() {
        let g = median(results[i].0.clone());
        let r = median(results[i].1.clone());
        println!(
            "{m:<10} {g:>12.2} {:>10.2} {:>12.1} {:>10.2}",
            g / base_gbps,
            r * 1000.0,
            r / base_rtt
        );
    }
}
