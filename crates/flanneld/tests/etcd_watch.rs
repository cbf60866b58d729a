//! The lease watch: events reach the backend, and compaction and etcd restarts are survived.

use std::time::Duration;

use testbed::fixture::PREFIX;
use testbed::{wait_for, EtcdHost};

/// The daemon leases from 10.5.200.0 up; the tests write remote leases below that.
const ALLOC: &str =
    r#"{"Network":"10.5.0.0/16","SubnetMin":"10.5.200.0","Backend":{"Type":"alloc"}}"#;
const T: Duration = Duration::from_secs(30);

fn lease_value(ip: &str) -> String {
    format!(r#"{{"PublicIP":"{ip}","PublicIPv6":null}}"#)
}

/// The remote leases in etcd (everything but the daemon's own), as subnet keys.
fn remote_keys(w: &EtcdHost, own_ip: &str) -> Vec<String> {
    let mut keys: Vec<String> = w
        .lease_keys()
        .into_iter()
        .filter(|k| w.etcd.get(k).is_some_and(|v| !v.contains(own_ip)))
        .map(|k| k.rsplit('/').next().unwrap().to_string())
        .collect();
    keys.sort();
    keys
}

#[test]
fn add_and_remove_events_reach_the_backend() {
    let w = EtcdHost::new("watch");
    w.put_config(ALLOC);
    w.etcd.put(
        &format!("{PREFIX}/subnets/10.5.1.0-24"),
        &lease_value("192.168.50.11"),
    );
    let mut f = w.flanneld(&[]);
    f.wait_log("lease added: 10.5.1.0-24 (PublicIP 192.168.50.11", T);
    w.etcd.put(
        &format!("{PREFIX}/subnets/10.5.2.0-24"),
        &lease_value("192.168.50.12"),
    );
    f.wait_log("lease added: 10.5.2.0-24 (PublicIP 192.168.50.12", T);
    w.etcd.del(&format!("{PREFIX}/subnets/10.5.1.0-24"));
    f.wait_log("lease removed: 10.5.1.0-24", T);
    assert_eq!(f.known_leases(), vec!["10.5.2.0-24".to_string()]);
    // The daemon's own lease is never reported to its backend.
    assert!(!f
        .log()
        .contains("lease added: 10.5.2.0-24 (PublicIP 192.168.50.2"));
}

#[test]
fn watch_recovers_from_compaction() {
    let w = EtcdHost::new("compact");
    w.put_config(ALLOC);
    let mut f = w.flanneld(&[]);
    f.wait_log("Running backend", T);
    // Freeze the daemon so its watch falls behind, change a lot, compact the history away.
    f.signal(libc::SIGSTOP);
    // Large values overflow the stream's flow-control windows, so etcd marks the watcher as
    // lagging; the compaction below then removes the history it still needs.
    let filler = "x".repeat(120_000);
    for i in 0..250 {
        let key = format!("{PREFIX}/subnets/10.5.{}.0-24", 100 + (i % 50));
        let value = format!(
            r#"{{"PublicIP":"192.168.51.{}","PublicIPv6":null,"BackendType":"t","BackendData":"{filler}"}}"#,
            i % 50
        );
        w.etcd.put(&key, &value);
    }
    for i in 0..25 {
        w.etcd
            .del(&format!("{PREFIX}/subnets/10.5.{}.0-24", 100 + i));
    }
    w.etcd.compact();
    f.signal(libc::SIGCONT);
    // A marker written after compaction must arrive, and the final view must match etcd.
    w.etcd.put(
        &format!("{PREFIX}/subnets/10.5.3.0-24"),
        &lease_value("192.168.50.33"),
    );
    f.wait_log("lease added: 10.5.3.0-24", T);
    let expected = remote_keys(&w, "192.168.50.2\"");
    wait_for(T, "daemon view to match etcd", || {
        (f.known_leases() == expected).then_some(())
    });
    assert!(
        f.log().contains("lease watch needs a resync"),
        "the compaction recovery path was not taken"
    );
    assert!(f.try_status().is_none());
}

#[test]
fn etcd_restart_is_survived() {
    let mut w = EtcdHost::new("etcdrestart");
    w.put_config(ALLOC);
    let mut f = w.flanneld(&[]);
    f.wait_log("Running backend", T);
    w.etcd.stop();
    std::thread::sleep(Duration::from_millis(500));
    w.etcd.restart();
    w.etcd.put(
        &format!("{PREFIX}/subnets/10.5.9.0-24"),
        &lease_value("192.168.50.99"),
    );
    f.wait_log("lease added: 10.5.9.0-24", T);
    w.etcd.del(&format!("{PREFIX}/subnets/10.5.9.0-24"));
    f.wait_log("lease removed: 10.5.9.0-24", T);
    assert!(f.try_status().is_none(), "daemon exited:\n{}", f.log());
    assert_eq!(w.lease_keys().len(), 1, "own lease must survive");
}
