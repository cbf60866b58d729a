//! The daemon's command line, environment fallback, health endpoint and interface selection.

use std::process::Command;
use std::time::Duration;

use testbed::fixture::PREFIX;
use testbed::{binary, EtcdHost};

const ALLOC: &str = r#"{"Network":"10.5.0.0/16","Backend":{"Type":"alloc"}}"#;
const T: Duration = Duration::from_secs(30);

fn flanneld(args: &[&str]) -> std::process::Output {
    Command::new(binary("flanneld"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .unwrap()
}

#[test]
fn unknown_flag_and_bad_value_exit_nonzero_with_a_clear_message() {
    let out = flanneld(&["--no-such-flag"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("flag provided but not defined: -no-such-flag"));
    let out = flanneld(&["-healthz-port=eighty"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("invalid value \"eighty\" for flag -healthz-port"));
}

#[test]
fn help_and_version_exit_zero() {
    let out = flanneld(&["-h"]);
    assert_eq!(out.status.code(), Some(0));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("Usage: "), "{err}");
    assert!(err.contains("-etcd-endpoints string"));
    let out = flanneld(&["--version"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stderr).starts_with('v'));
}

#[test]
fn renew_margin_out_of_range_exits_1() {
    let out = flanneld(&["--subnet-lease-renew-margin=1440"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("Invalid subnet-lease-renew-margin option, out of acceptable range"));
}

fn http_get(w: &EtcdHost, port: u16, path: &str) -> String {
    let out = w.host.ns.exec(
        "bash",
        &[
            "-c",
            &format!("exec 3<>/dev/tcp/127.0.0.1/{port}; printf 'GET {path} HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n' >&3; cat <&3"),
        ],
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn health_endpoints_follow_readiness() {
    let w = EtcdHost::new("health");
    // Environment fallback: port and prefix come from FLANNELD_* variables.
    let mut f = testbed::Flanneld::start_env(
        &w.host.ns,
        w.dir.path(),
        &[
            format!("--etcd-endpoints={}", w.etcd.url()),
            format!("--subnet-file={}", w.subnet_file().display()),
        ],
        &[
            ("FLANNELD_HEALTHZ_PORT", "18081"),
            ("FLANNELD_HEALTHZ_IP", "127.0.0.1"),
        ],
    );
    f.wait_log("Start healthz server on 127.0.0.1:18081", T);
    f.wait_log("Couldn't fetch network config", T);
    let r = http_get(&w, 18081, "/healthz");
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert!(r.ends_with("\r\n\r\nflanneld is running"), "{r}");
    let r = http_get(&w, 18081, "/readyz");
    assert!(r.starts_with("HTTP/1.1 503"), "{r}");
    assert!(r.ends_with("flanneld is not ready yet"), "{r}");
    assert!(http_get(&w, 18081, "/other").starts_with("HTTP/1.1 404"));
    w.put_config(ALLOC);
    f.wait_subnet_env(&w.subnet_file(), T);
    let r = http_get(&w, 18081, "/readyz");
    assert!(
        r.starts_with("HTTP/1.1 200") && r.ends_with("flanneld is ready"),
        "{r}"
    );
}

fn public_ip_of_lease(w: &EtcdHost) -> String {
    let keys = w.etcd.keys(&format!("{PREFIX}/subnets/"));
    assert_eq!(keys.len(), 1, "{keys:?}");
    let v: serde_json::Value = serde_json::from_str(&w.etcd.get(&keys[0]).unwrap()).unwrap();
    v["PublicIP"].as_str().unwrap().to_string()
}

fn lease_with(w: &EtcdHost, args: &[&str]) -> String {
    let _ = std::fs::remove_file(w.subnet_file());
    for k in w.etcd.keys(&format!("{PREFIX}/subnets/")) {
        w.etcd.del(&k);
    }
    let mut f = w.flanneld(args);
    f.wait_subnet_env(&w.subnet_file(), T);
    let ip = public_ip_of_lease(w);
    f.kill();
    ip
}

#[test]
fn interface_selection_rules() {
    let w = EtcdHost::new("iface");
    w.put_config(ALLOC);
    w.host.add_interface("eth1", "172.16.30.18/24");
    w.host
        .ns
        .ip(&["addr", "add", "172.16.31.200/24", "dev", "eth1"]);
    // Default route interface.
    assert_eq!(lease_with(&w, &[]), "192.168.50.2");
    // By name, by IP, by regex on IPs, by regex on names, first match wins.
    assert_eq!(lease_with(&w, &["--iface=eth1"]), "172.16.30.18");
    assert_eq!(lease_with(&w, &["--iface=172.16.31.200"]), "172.16.31.200");
    assert_eq!(
        lease_with(&w, &["--iface=nope0", "--iface=eth1"]),
        "172.16.30.18"
    );
    assert_eq!(
        lease_with(&w, &[r"--iface-regex=172\.16\.31\.\d+"]),
        "172.16.31.200"
    );
    assert_eq!(lease_with(&w, &["--iface-regex=^eth1$"]), "172.16.30.18");
    // The interface the kernel would use to reach an address.
    assert_eq!(
        lease_with(&w, &["--iface-can-reach=172.16.30.254"]),
        "172.16.30.18"
    );
    // --public-ip is advertised; the interface is the one owning it.
    assert_eq!(
        lease_with(&w, &["--public-ip=172.16.30.18"]),
        "172.16.30.18"
    );
    // --public-ip with --iface: advertised address differs from the interface's (NAT).
    assert_eq!(
        lease_with(&w, &["--iface=eth0", "--public-ip=203.0.113.7"]),
        "203.0.113.7"
    );
}

#[test]
fn no_matching_interface_is_a_clear_fatal_error() {
    let w = EtcdHost::new("noiface");
    w.put_config(ALLOC);
    let mut f = w.flanneld(&["--iface=nope0"]);
    assert_eq!(f.wait_exit(T).code(), Some(1));
    let log = f.log();
    assert!(
        log.contains(
            "Failed to find interface to use that matches the interfaces and/or regexes provided"
        ),
        "{log}"
    );
    let mut f = w.flanneld(&["--public-ip=10.99.99.99"]);
    assert_eq!(f.wait_exit(T).code(), Some(1));
    assert!(f
        .log()
        .contains("error looking up interface 10.99.99.99: no interface with given IP found"));
}
