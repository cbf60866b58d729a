//! Fault tolerance with a real etcd and real traffic: etcd killed or frozen for 40 s, the own
//! lease deleted while running, start-up while etcd is down, an unwritable subnet file.

use std::time::{Duration, Instant};

use testbed::cluster::Pinger;
use testbed::{wait_for, Cluster};

const T: Duration = Duration::from_secs(30);
const OUTAGE: Duration = Duration::from_secs(40);

fn health(c: &Cluster, host: usize) -> bool {
    c.hosts[host]
        .ns
        .http_get("127.0.0.1", 18100, "/healthz")
        .ends_with("\r\n\r\nflanneld is running")
}

/// etcd goes away (killed, or frozen with SIGSTOP) for 40 s while pods ping each other; a
/// renewal falls due during the outage.
fn outage(frozen: bool) {
    let mut c = Cluster::new(3);
    c.put_config(
        None,
        r#"{"Network":"10.41.0.0/16","Backend":{"Type":"vxlan"}}"#,
    );
    // Renew 1439 minutes before the 24 h expiry: the first renewal is due 60 s after start.
    let args = [
        "--subnet-lease-renew-margin=1439",
        "--healthz-port=18100",
        "--healthz-ip=127.0.0.1",
    ];
    let started = Instant::now();
    c.start_flanneld(0, &args);
    c.start_flanneld(1, &args);
    let a = c.add_pod(0);
    let b = c.add_pod(1);
    c.wait_full_mesh(T);
    // Start the outage 25 s after start, so the renewal (due at 60 s) falls inside it.
    let outage_start = started + Duration::from_secs(25);
    std::thread::sleep(outage_start.saturating_duration_since(Instant::now()));
    let pinger = Pinger::start(&c, a, c.pods[b].ip, Some((OUTAGE.as_secs() * 5) as u32));
    let log_lines = |c: &mut Cluster| c.flanneld(0).log().lines().count();
    let before = log_lines(&mut c);
    if frozen {
        c.etcd.freeze(true);
    } else {
        c.etcd.stop();
    }
    let t0 = Instant::now();
    while t0.elapsed() < OUTAGE {
        assert!(health(&c, 0), "/healthz must answer during the outage");
        std::thread::sleep(Duration::from_secs(2));
    }
    let lines = log_lines(&mut c) - before;
    if frozen {
        c.etcd.freeze(false);
    } else {
        c.etcd.restart();
    }
    let back = Instant::now();
    let summary = pinger.finish();
    assert!(
        summary.contains(" 0% packet loss"),
        "pings lost during the outage: {summary}"
    );
    assert!(
        (lines as f64) < 2.0 * OUTAGE.as_secs_f64(),
        "{lines} log lines in {OUTAGE:?}: no backoff"
    );
    for h in 0..2 {
        assert!(c.hosts[h].flanneld.as_mut().unwrap().try_status().is_none());
    }
    // The renewal that fell due during the outage succeeds soon after etcd is back.
    c.flanneld(0)
        .wait_log("Lease renewed", Duration::from_secs(20));
    let renewed = back.elapsed();
    assert!(
        renewed < Duration::from_secs(15),
        "renewed {renewed:?} after etcd's return"
    );
    // A host joining after the outage is routed by the others within 10 s.
    c.start_flanneld(2, &[]);
    let p = c.add_pod(2);
    let joined = Instant::now();
    let ip = c.pods[p].ip;
    c.wait_ping(a, ip, Duration::from_secs(10));
    eprintln!(
        "frozen={frozen}: {summary}; {lines} log lines; renewed {renewed:?} after return; new host routed in {:?}",
        joined.elapsed()
    );
}

#[test]
fn etcd_killed_for_40s_loses_no_packet_and_recovers() {
    outage(false);
}

#[test]
fn etcd_frozen_for_40s_loses_no_packet_and_recovers() {
    outage(true);
}

#[test]
fn own_lease_deleted_is_reacquired_without_a_gap() {
    let mut c = Cluster::new(2);
    c.put_config(
        None,
        r#"{"Network":"10.42.0.0/16","Backend":{"Type":"vxlan"}}"#,
    );
    c.start_all(&[]);
    let a = c.add_pod(0);
    let b = c.add_pod(1);
    c.wait_full_mesh(T);
    let key = c.lease_key(1);
    let value = c.etcd.get(&key).unwrap();
    let pinger = Pinger::start(&c, a, c.pods[b].ip, Some(25));
    std::thread::sleep(Duration::from_millis(500));
    c.etcd.del(&key);
    c.flanneld(1).wait_log(
        &format!(
            "Lease {} re-acquired; data path unchanged",
            key.rsplit('/').next().unwrap()
        ),
        T,
    );
    assert_eq!(c.etcd.get(&key).as_deref(), Some(value.as_str()));
    assert!(c.etcd.lease_id(&key) != 0, "re-acquired lease has a TTL");
    let summary = pinger.finish();
    assert!(summary.contains(" 0% packet loss"), "{summary}");
    assert!(c.flanneld(1).try_status().is_none());
}

#[test]
fn startup_while_etcd_is_down_then_it_comes_up() {
    let mut c = Cluster::new(1);
    c.put_config(
        None,
        r#"{"Network":"10.43.0.0/16","Backend":{"Type":"host-gw"}}"#,
    );
    c.etcd.stop();
    let args = [
        format!("--etcd-endpoints={}", c.etcd.url()),
        format!("--subnet-file={}", c.hosts[0].subnet_file.display()),
    ];
    let mut f = testbed::Flanneld::start(&c.hosts[0].ns, c.dir.path(), &args);
    f.wait_log("Couldn't fetch network config", T);
    c.etcd.restart();
    let path = c.hosts[0].subnet_file.clone();
    f.wait_subnet_env(&path, T);
}

#[test]
fn subnet_file_directory_is_created_or_refused_clearly() {
    let c = Cluster::new(1);
    c.put_config(
        None,
        r#"{"Network":"10.44.0.0/16","Backend":{"Type":"host-gw"}}"#,
    );
    // A missing directory is created.
    let nested = c.dir.join("run/flannel/subnet.env");
    let mut f = testbed::Flanneld::start(
        &c.hosts[0].ns,
        c.dir.path(),
        &[
            format!("--etcd-endpoints={}", c.etcd.url()),
            format!("--subnet-file={}", nested.display()),
        ],
    );
    f.wait_subnet_env(&nested, T);
    f.kill();
    // A file where the directory should be: a clear error naming the path, non-zero exit.
    let blocker = c.dir.join("blocker");
    std::fs::write(&blocker, "not a directory").unwrap();
    let bad = blocker.join("subnet.env");
    let mut f = testbed::Flanneld::start(
        &c.hosts[0].ns,
        c.dir.path(),
        &[
            format!("--etcd-endpoints={}", c.etcd.url()),
            format!("--subnet-file={}", bad.display()),
        ],
    );
    let st = f.wait_exit(T);
    assert_eq!(st.code(), Some(1));
    let log = f.log();
    assert!(
        log.contains(&format!("failed to write subnet file {}", bad.display())),
        "{log}"
    );
    assert!(!bad.exists());
    let _ = c.hosts.iter();
    wait_for(T, "nothing half-written", || {
        (std::fs::read_dir(c.dir.path())
            .unwrap()
            .flatten()
            .all(|e| !e.file_name().to_string_lossy().contains(".tmp")))
        .then_some(())
    });
}

#[test]
fn kube_api_server_gone_for_40s_loses_no_packet_and_recovers() {
    let mut c = Cluster::with_kube_api(3);
    c.create_nodes("10.244");
    c.write_net_conf(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#);
    let args = ["--healthz-port=18100", "--healthz-ip=127.0.0.1"];
    c.start_flanneld_kube(0, &args);
    c.start_flanneld_kube(1, &args);
    let a = c.add_pod(0);
    let b = c.add_pod(1);
    c.wait_full_mesh(T);
    let pinger = Pinger::start(&c, a, c.pods[b].ip, Some((OUTAGE.as_secs() * 5) as u32));
    let before = c.flanneld(0).log().lines().count();
    c.kube().set_down(true);
    let t0 = Instant::now();
    while t0.elapsed() < OUTAGE {
        assert!(health(&c, 0), "/healthz must answer during the outage");
        std::thread::sleep(Duration::from_secs(2));
    }
    let lines = c.flanneld(0).log().lines().count() - before;
    c.kube().set_down(false);
    let summary = pinger.finish();
    assert!(summary.contains(" 0% packet loss"), "{summary}");
    assert!(
        (lines as f64) < 2.0 * OUTAGE.as_secs_f64(),
        "{lines} log lines in {OUTAGE:?}: no backoff"
    );
    // A node joining after the outage is routed by the others within 10 s.
    c.start_flanneld_kube(2, &[]);
    let p = c.add_pod(2);
    let ip = c.pods[p].ip;
    c.wait_ping(a, ip, Duration::from_secs(10));
}
