//! Benchmark: pod-to-pod TCP throughput and ping latency for the bare underlay, host-gw and
//! vxlan, measured side by side in one run on the test-bed and printed as ratios to the underlay.
//!
//! `frs-bench [--seconds N] [--streams N] [--rounds N] [--modes a,b,..]`. Modes: underlay,
//! host-gw, vxlan, udp (the default kernel BPF data path), udp-tun (TUN engine), udp-batch,
//! udp-simple (one packet per syscall),
//! wireguard (our user-space WireGuard; wireguard-batch without offloads), wireguard-go (a pair
//! of Debian's wireguard-go set up by hand as Go flannel does, the reference); in the UML guest
//! (`--uml`) also ipip and ipsec (kernel ESP keyed by strongSwan's charon). Each
//! round measures every mode once, in turn, so machine noise hits all modes alike; medians over
//! rounds are reported, with flanneld's CPU time per Gbit for the user-space modes.

use std::net::Ipv4Addr;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use testbed::bench::cpu_seconds;
use testbed::netns::NetNs;
use testbed::wggo::HandWg;
use testbed::Cluster;

struct Sample {
    gbps: f64,
    rtt_ms: f64,
    /// flanneld CPU seconds (both hosts) per Gbit transferred.
    cpu_per_gbit: f64,
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
            cpu_per_gbit: 0.0,
        };
    }
    let mut hand = vec![];
    let pids: Vec<u32> = if mode == "wireguard-go" {
        let net = "10.8.0.0/16";
        hand.push(HandWg::start(&c, 0, "10.8.1.0/24", net, None));
        hand.push(HandWg::start(&c, 1, "10.8.2.0/24", net, None));
        hand[0].add_peer(&hand[1].public_key, "192.168.100.12:51820", "10.8.2.0/24");
        hand[1].add_peer(&hand[0].public_key, "192.168.100.11:51820", "10.8.1.0/24");
        hand.iter().map(|h| h.pid()).collect()
    } else {
        let (backend, datapath) = match mode {
            "udp-batch" => ("udp", "batch"),
            "udp-simple" => ("udp", "simple"),
            "udp" => ("udp", "kernel"),
            "udp-tun" => ("udp", "offload"),
            "wireguard-batch" => ("wireguard", "batch"),
            other => (other, "offload"),
        };
        // ipsec: a PSK (>= 96 characters), and --ip-masq so pod traffic keeps its pod source
        // address and matches the XFRM policies.
        let (extra, flags): (String, &[&str]) = if backend == "ipsec" {
            let psk = "frs-bench-psk-".repeat(8);
            (format!(r#","PSK":"{psk}""#), &["--ip-masq"])
        } else {
            (String::new(), &[])
        };
        c.put_config(
            None,
            &format!(r#"{{"Network":"10.8.0.0/16","Backend":{{"Type":"{backend}"{extra}}}}}"#),
        );
        for h in 0..2 {
            let key = c.dir.join(&format!("wgkey-{h}"));
            let key = key.to_string_lossy().into_owned();
            c.start_flanneld_env(
                h,
                flags,
                &[
                    ("FLANNEL_UDP_DATAPATH", datapath),
                    ("TESTBED_PRIVATE_RUN", "1"),
                    ("WIREGUARD_KEY_FILE", &key),
                ],
            );
        }
        (0..2).filter_map(|h| c.flanneld(h).pid()).collect()
    };
    let a = c.add_pod(0);
    let b = c.add_pod(1);
    c.wait_full_mesh(Duration::from_secs(20));
    let ip = c.pods[b].ip;
    let cpu0: f64 = pids.iter().map(|p| cpu_seconds(*p)).sum();
    let gbps = iperf(&c.pods[a].ns, &c.pods[b].ns, ip, seconds, streams);
    let cpu1: f64 = pids.iter().map(|p| cpu_seconds(*p)).sum();
    let gbit = gbps * seconds as f64;
    Sample {
        gbps,
        rtt_ms: ping_ms(&c.pods[a].ns, ip),
        cpu_per_gbit: if gbit > 0.0 {
            (cpu1 - cpu0) / gbit
        } else {
            0.0
        },
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    testbed::require_root();
    // `--uml ARGS`: the same benchmark inside a user-mode-linux guest (a kernel with ipip); the
    // guest has one CPU, so only its ratios mean anything.
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some("--uml") && !testbed::uml::in_guest() {
        let mut cmd = vec![argv[0].clone()];
        cmd.extend(argv[2..].iter().cloned());
        let run = testbed::uml::run_command_in_guest(&cmd, Duration::from_secs(3600));
        print!("{}", run.output);
        eprintln!(
            "uml guest: boot {:?}, total {:?}",
            run.boot_time, run.total_time
        );
        std::process::exit(run.code.unwrap_or(1));
    }
    let mut seconds = 5;
    let mut streams = 1;
    let mut rounds = 3;
    let mut modes_arg = "underlay,host-gw,vxlan".to_string();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut num = || args.next().and_then(|n| n.parse().ok()).expect("a number");
        match a.as_str() {
            "--seconds" => seconds = num(),
            "--streams" => streams = num(),
            "--rounds" => rounds = num(),
            "--modes" => modes_arg = args.next().expect("--modes a,b,c"),
            "--uml" => {}
            _ => {
                eprintln!(
                    "usage: frs-bench [--uml] [--seconds N] [--streams N] [--rounds N] [--modes a,b,..]"
                );
                std::process::exit(2);
            }
        }
    }
    let modes: Vec<&str> = modes_arg.split(',').collect();
    assert_eq!(
        modes[0], "underlay",
        "the first mode must be the underlay (the ratio base)"
    );
    let mut results: Vec<(Vec<f64>, Vec<f64>, Vec<f64>)> =
        vec![(vec![], vec![], vec![]); modes.len()];
    for round in 1..=rounds {
        for (i, m) in modes.iter().enumerate() {
            let s = measure(m, seconds, streams);
            eprintln!(
                "round {round} {m:<15} {:>7.2} Gbit/s  {:>7.1} us",
                s.gbps,
                s.rtt_ms * 1000.0
            );
            results[i].0.push(s.gbps);
            results[i].1.push(s.rtt_ms);
            results[i].2.push(s.cpu_per_gbit);
        }
    }
    let base_gbps = median(results[0].0.clone());
    let base_rtt = median(results[0].1.clone());
    println!(
        "pod-to-pod TCP ({streams} stream(s), {seconds} s) and ping RTT, median of {rounds} rounds"
    );
    println!(
        "{:<15} {:>10} {:>10} {:>10} {:>10} {:>14}",
        "mode", "Gbit/s", "x underlay", "RTT us", "x underlay", "CPU s per Gbit"
    );
    for (i, m) in modes.iter().enumerate() {
        let g = median(results[i].0.clone());
        let r = median(results[i].1.clone());
        let cpu = median(results[i].2.clone());
        println!(
            "{m:<15} {g:>10.2} {:>10.2} {:>10.1} {:>10.2} {:>14}",
            g / base_gbps,
            r * 1000.0,
            r / base_rtt,
            if m.starts_with("udp") || m.starts_with("wireguard") {
                format!("{cpu:.3}")
            } else {
                "-".to_string()
            }
        );
    }
}
