//! Operations: the Prometheus exposition (checked with Debian's `promtool`), systemd readiness
//! notification, and secrets kept out of logs.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use testbed::Cluster;

const T: Duration = Duration::from_secs(30);

/// An HTTP GET inside a host namespace; returns the whole response (head and body).
fn http_get(c: &Cluster, host: usize, port: u16, path: &str) -> String {
    c.hosts[host].ns.http_get("127.0.0.1", port, path)
}

#[test]
fn metrics_exposition_is_valid_and_counts_leases() {
    let mut c = Cluster::new(2);
    c.put_config(
        None,
        r#"{"Network":"10.31.0.0/16","Backend":{"Type":"vxlan"}}"#,
    );
    c.start_flanneld(0, &["--healthz-port=18090", "--healthz-ip=127.0.0.1"]);
    c.start_flanneld(1, &[]);
    let page = testbed::wait_for(T, "one remote lease in /metrics", || {
        let r = http_get(&c, 0, 18090, "/metrics");
        r.contains("flanneld_leases{backend=\"vxlan\"} 1")
            .then_some(r)
    });
    let (head, body) = page.split_once("\r\n\r\n").expect("HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    for family in [
        "flanneld_build_info",
        "flanneld_leases",
        "flanneld_lease_events_total",
        "flanneld_store_errors_total",
        "flanneld_lease_renewals_total",
        "flanneld_lease_expiry_seconds",
    ] {
        assert!(
            body.contains(&format!("# HELP {family} ")),
            "{family}\n{body}"
        );
    }
    assert!(
        body.contains("flanneld_lease_events_total{type=\"added\"} 1"),
        "{body}"
    );
    let expiry: f64 = body
        .lines()
        .find_map(|l| l.strip_prefix("flanneld_lease_expiry_seconds "))
        .expect("expiry sample")
        .parse()
        .expect("number");
    assert!((86_000.0..=86_400.0).contains(&expiry), "{expiry}");
    // promtool (the Prometheus project's own linter) accepts the exposition.
    let mut promtool = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (apt-get install prometheus)");
    std::io::Write::write_all(promtool.stdin.as_mut().unwrap(), body.as_bytes()).unwrap();
    drop(promtool.stdin.take());
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // A peer leaving is counted.
    c.hosts[1].flanneld.as_mut().unwrap().kill();
    c.etcd.del(&c.lease_key(1));
    testbed::wait_for(T, "the removal in /metrics", || {
        let r = http_get(&c, 0, 18090, "/metrics");
        (r.contains("flanneld_leases{backend=\"vxlan\"} 0")
            && r.contains("flanneld_lease_events_total{type=\"removed\"} 1"))
        .then_some(())
    });
    // The probes keep their reference bodies.
    assert!(http_get(&c, 0, 18090, "/healthz").ends_with("\r\n\r\nflanneld is running"));
    assert!(http_get(&c, 0, 18090, "/readyz").ends_with("\r\n\r\nflanneld is ready"));
    assert!(http_get(&c, 0, 18090, "/nope").starts_with("HTTP/1.1 404"));
}

/// The value of one sample line of an exposition (0 when absent).
fn sample(body: &str, series: &str) -> u64 {
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn udp_data_path_counters_count_real_packets() {
    let mut c = Cluster::new(2);
    c.put_config(
        None,
        r#"{"Network":"10.33.0.0/16","Backend":{"Type":"udp"}}"#,
    );
    // The counters belong to the TUN engine; the kernel (BPF) path would bypass it.
    let tun = [("FLANNEL_UDP_DATAPATH", "offload")];
    c.start_flanneld_env(0, &["--healthz-port=18091", "--healthz-ip=127.0.0.1"], &tun);
    c.start_flanneld_env(1, &[], &tun);
    let a = c.add_pod(0);
    let b = c.add_pod(1);
    c.wait_ping(a, c.pods[b].ip, T);
    let scrape = || {
        let r = http_get(&c, 0, 18091, "/metrics");
        r.split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default()
    };
    let out = r#"flanneld_datapath_packets_total{backend="udp",direction="out"}"#;
    let inn = r#"flanneld_datapath_packets_total{backend="udp",direction="in"}"#;
    let before = scrape();
    let pinged = c.pods[a].ns.run(
        "ping",
        &[
            "-c",
            "20",
            "-i",
            "0.01",
            "-W",
            "1",
            &c.pods[b].ip.to_string(),
        ],
    );
    assert!(pinged.contains("20 received"), "{pinged}");
    // A destination inside the network that no lease holds is dropped and counted.
    let _ = c.pods[a]
        .ns
        .exec("ping", &["-c", "3", "-i", "0.01", "-W", "1", "10.33.250.9"]);
    let after = scrape();
    assert!(sample(&after, out) >= sample(&before, out) + 20, "{after}");
    assert!(sample(&after, inn) >= sample(&before, inn) + 20, "{after}");
    assert!(
        sample(
            &after,
            r#"flanneld_datapath_bytes_total{backend="udp",direction="out"}"#
        ) >= sample(
            &before,
            r#"flanneld_datapath_bytes_total{backend="udp",direction="out"}"#
        ) + 20 * 84,
        "{after}"
    );
    let no_peer = r#"flanneld_datapath_dropped_packets_total{backend="udp",reason="no_peer"}"#;
    assert!(
        sample(&after, no_peer) >= sample(&before, no_peer) + 3,
        "{after}"
    );
    assert!(
        after.contains("# HELP flanneld_datapath_packets_total "),
        "{after}"
    );
}

#[test]
fn systemd_is_notified_once_subnet_env_is_written() {
    let mut c = Cluster::new(1);
    c.put_config(
        None,
        r#"{"Network":"10.32.0.0/16","Backend":{"Type":"host-gw"}}"#,
    );
    let sock_path = c.dir.join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).expect("bind notify socket");
    sock.set_read_timeout(Some(T)).unwrap();
    let path = sock_path.to_str().unwrap().to_string();
    c.start_flanneld_env(0, &[], &[("NOTIFY_SOCKET", &path)]);
    let mut buf = [0u8; 256];
    let n = sock.recv(&mut buf).expect("READY=1 within 30 s");
    assert_eq!(&buf[..n], b"READY=1");
    assert!(
        c.hosts[0].subnet_file.exists(),
        "notified before subnet.env"
    );
}

#[test]
fn kube_token_never_reaches_the_log() {
    // (The etcd password case is in etcd_security.rs.)
    let mut c = Cluster::with_kube_api(1);
    c.create_nodes("10.244");
    c.write_net_conf(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw"}}"#);
    c.start_flanneld_kube(0, &["-v=10"]);
    c.flanneld(0).wait_log("FlannelIsUp", T);
    let log = c.flanneld(0).log();
    assert!(log.contains("kubeconfig_file"), "{log}");
    assert!(
        !log.contains(testbed::kubeapi::KubeApiServer::FLANNEL_TOKEN),
        "token in the log:\n{log}"
    );
}
